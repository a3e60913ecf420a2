"""uploads/serializers.py: the fields UploadSerializer builds once per class."""
from __future__ import annotations

import pytest
from rest_framework import serializers

from uploads import services
from uploads.serializers import UploadSerializer


@pytest.fixture
def upload(db, user):
    return services.upload_create(owner=user, filename="a.bin", size=10)[0]


def test_every_instance_gets_its_own_fields_bound_to_itself(upload):
    first, second = UploadSerializer(upload), UploadSerializer(upload)
    for name in first.fields:
        assert first.fields[name] is not second.fields[name]
        assert first.fields[name].parent is first and second.fields[name].parent is second


def test_the_fields_are_those_the_model_serializer_builds(upload):
    """The same fields, types and flags as ModelSerializer builds per instance (and so the same
    OpenAPI schema)."""
    serializer = UploadSerializer(upload)
    built = serializers.ModelSerializer.get_fields(serializer)
    cached = serializer.get_fields()
    assert list(cached) == list(built) == UploadSerializer.Meta.fields
    for name, field in built.items():
        assert type(cached[name]) is type(field), name
        assert (cached[name].read_only, cached[name].allow_null, cached[name].help_text) == (
            field.read_only, field.allow_null, field.help_text,
        ), name


def test_the_representation_follows_the_upload(upload, rf):
    request = rf.get("/")
    before = UploadSerializer(upload, context={"request": request}).data
    upload.offset, upload.filename = 4, "b.bin"
    after = UploadSerializer(upload, context={"request": request}).data
    assert (before["offset"], before["filename"]) == (0, "a.bin")
    assert (after["offset"], after["filename"]) == (4, "b.bin")
    assert after["url"] == f"http://testserver/api/uploads/{upload.pk}"


def test_binding_leaves_the_class_fields_untouched(upload, rf):
    """The instances' fields are copies: serializing binds them, never the fields kept per class."""
    one = UploadSerializer(upload, context={"request": rf.get("/")}).data
    many = UploadSerializer([upload], many=True, context={"request": rf.get("/")}).data
    assert many == [one]
    kept = UploadSerializer._built_fields
    assert all(field.parent is None and field.field_name is None for field in kept.values())
    assert kept["url"].method_name is None  # set by `bind` on each copy, from its own name
