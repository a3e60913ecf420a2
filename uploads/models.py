"""The upload session: one row per upload, the source of truth for how many bytes are durable."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone


class Status(models.TextChoices):
    PARTIAL = "partial", "Partial"
    COMPLETE = "complete", "Complete"
    FAILED = "failed", "Failed"
    EXPIRED = "expired", "Expired"


class UploadSession(models.Model):
    """An upload in progress or done.

    `offset` only grows, and only through a conditional UPDATE in `services` (never `save()` of a
    possibly stale instance), after the bytes below it were written and fsynced.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="upload_sessions"
    )
    filename = models.CharField(max_length=255, help_text="Display name, sanitised; never a path.")
    size = models.BigIntegerField(help_text="Declared size in bytes.")
    offset = models.BigIntegerField(default=0, help_text="Bytes durably received.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PARTIAL)
    checksum = models.CharField(
        max_length=71, blank=True, default="", help_text="Expected whole-file digest, `sha256:<hex>`."
    )
    file = models.CharField(
        max_length=512, blank=True, default="", help_text="Storage name of the completed file."
    )
    sha256 = models.CharField(max_length=64, blank=True, default="")
    error = models.CharField(max_length=255, blank=True, default="", help_text="Why it failed.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "filename", "size", "status"], name="upload_resume_idx"),
            models.Index(fields=["status", "expires_at"], name="upload_expiry_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(size__gte=0), name="upload_size_gte_0"),
            models.CheckConstraint(condition=Q(offset__gte=0), name="upload_offset_gte_0"),
            models.CheckConstraint(condition=Q(offset__lte=F("size")), name="upload_offset_lte_size"),
            models.CheckConstraint(
                condition=~Q(status=Status.COMPLETE) | Q(offset=F("size")),
                name="upload_complete_has_all_bytes",
            ),
            # Resume by name must find exactly one upload, and the Redis running total is keyed
            # by owner, size and name: one unfinished upload per key keeps both unambiguous.
            models.UniqueConstraint(
                fields=["owner", "filename", "size"],
                condition=Q(status=Status.PARTIAL),
                name="upload_one_partial_per_file",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.filename} ({self.offset}/{self.size})"

    @property
    def is_complete(self) -> bool:
        return self.status == Status.COMPLETE

    @property
    def percent(self) -> float:
        return 100.0 if self.size == 0 else 100.0 * self.offset / self.size
