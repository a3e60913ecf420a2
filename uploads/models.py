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


class Protocol(models.TextChoices):
    REST = "rest", "REST API"
    TUS = "tus", "tus 1.0.0"
    FORM = "form", "HTML form"  # the page without JavaScript: one request per file, not resumable


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
    size = models.BigIntegerField(
        null=True, blank=True, help_text="Declared size in bytes; empty while a tus client defers it."
    )
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
    protocol = models.CharField(
        max_length=8, choices=Protocol.choices, default=Protocol.REST, help_text="The front end that created it."
    )
    tus_metadata = models.TextField(
        blank=True, default="", help_text="`Upload-Metadata` exactly as the tus client sent it (echoed on HEAD)."
    )
    tus_concat = models.TextField(
        blank=True, default="", help_text="`Upload-Concat`: `partial`, or `final;<partial URLs>` as sent."
    )
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
            models.CheckConstraint(
                condition=Q(size__isnull=True) | Q(offset__lte=F("size")), name="upload_offset_lte_size"
            ),
            models.CheckConstraint(
                condition=~Q(status=Status.COMPLETE) | Q(size__isnull=False, offset=F("size")),
                name="upload_complete_has_all_bytes",
            ),
            # Resume by name (REST) must find exactly one upload, and its Redis running total is
            # keyed by owner, size and name: one unfinished upload per key keeps both unambiguous.
            # tus uploads are found by their URL only, so two of the same name may coexist.
            models.UniqueConstraint(
                fields=["owner", "filename", "size"],
                condition=Q(status=Status.PARTIAL, protocol=Protocol.REST),
                name="upload_one_partial_per_file",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.filename} ({self.offset}/{self.size})"

    @property
    def is_complete(self) -> bool:
        return self.status == Status.COMPLETE

    @property
    def length_deferred(self) -> bool:
        return self.size is None

    @property
    def concat_partial(self) -> bool:
        return self.tus_concat == "partial"

    @property
    def concat_final(self) -> bool:
        return self.tus_concat.startswith("final;")

    @property
    def percent(self) -> float | None:
        if self.size is None:
            return None
        return 100.0 if self.size == 0 else 100.0 * self.offset / self.size
