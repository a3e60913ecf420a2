"""What the REST API accepts and returns."""
from __future__ import annotations

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from . import selectors
from .models import Status, UploadSession


class UploadCreateSerializer(serializers.Serializer):
    """Only the shape is checked here; the engine (services.upload_create) owns the rules."""

    filename = serializers.CharField(max_length=4096, trim_whitespace=False)
    size = serializers.JSONField(help_text="Declared size in bytes, a non-negative JSON integer.")
    checksum = serializers.CharField(
        required=False, allow_blank=True, max_length=128,
        help_text="Optional whole-file digest, `sha256:<64 hex digits>`; verified when the last byte lands.",
    )


class UploadSerializer(serializers.ModelSerializer):
    status = serializers.SerializerMethodField()
    checksum = serializers.SerializerMethodField()
    sha256 = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()
    content_url = serializers.SerializerMethodField()

    class Meta:
        model = UploadSession
        fields = [
            "id", "filename", "size", "offset", "status", "protocol", "checksum", "sha256", "error",
            "created_at", "updated_at", "completed_at", "expires_at", "url", "content_url",
        ]
        read_only_fields = fields

    def get_fields(self) -> dict[str, serializers.Field]:
        # ModelSerializer builds the fields from the model for every instance: a third of a REST
        # GET of one upload (bench/inprocess.py --profile). They depend on the class alone, so they
        # are built once, and each instance gets shallow copies: a field's own state is what `bind`
        # sets on it (name, parent, label, source), and the rest (choices, error messages,
        # validators) is only ever read by these read-only fields, so it may be shared. Building
        # them anew from their arguments, as `Field.__deepcopy__` does, cost 58 µs per instance
        # against 8 for the copies.
        built = type(self).__dict__.get("_built_fields")
        if built is None:
            built = super().get_fields()
            type(self)._built_fields = built
        return {name: _unbound_copy(field) for name, field in built.items()}

    @extend_schema_field(serializers.ChoiceField(choices=Status.choices))
    def get_status(self, upload: UploadSession) -> str:
        return selectors.upload_effective_status(upload)

    def get_checksum(self, upload: UploadSession) -> str | None:
        return upload.checksum or None

    def get_sha256(self, upload: UploadSession) -> str | None:
        return upload.sha256 or None

    def _absolute(self, path: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path

    def get_url(self, upload: UploadSession) -> str:
        return self._absolute(reverse("upload-detail", args=[upload.pk]))

    def get_content_url(self, upload: UploadSession) -> str | None:
        if upload.status != Status.COMPLETE:
            return None
        return self._absolute(reverse("upload-content", args=[upload.pk]))


def _unbound_copy(field: serializers.Field) -> serializers.Field:
    copy = object.__new__(type(field))  # not Field.__new__, which records constructor arguments
    copy.__dict__.update(field.__dict__)  # those recorded for `field`, among the rest
    return copy


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField()
    offset = serializers.IntegerField(required=False, help_text="The committed offset, where relevant.")
