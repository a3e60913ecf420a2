"""uploads.rows: the hot path's statements, composed once, must read and write exactly as the ORM does."""
from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from rest_framework.authtoken.models import Token

from uploads import rows
from uploads.models import Protocol, Status, UploadSession

pytestmark = pytest.mark.django_db


def field_values(instance) -> dict:
    return {field.attname: getattr(instance, field.attname) for field in type(instance)._meta.concrete_fields}


@pytest.fixture
def upload(user):
    return UploadSession.objects.create(
        owner=user, filename="ünïcode.bin", size=100, offset=40, protocol=Protocol.TUS,
        tus_metadata="filename dGVzdA==", expires_at=timezone.now() + timedelta(hours=1),
    )


def test_get_reads_every_field_as_the_orm_does(upload):
    read = rows.get(UploadSession, pk=upload.pk, owner=upload.owner_id)
    assert field_values(read) == field_values(UploadSession.objects.get(pk=upload.pk))
    assert isinstance(read.pk, uuid.UUID)
    assert timezone.is_aware(read.created_at) and timezone.is_aware(read.expires_at)
    assert read._state.adding is False and read._state.db == connection.alias


def test_get_matches_every_condition(upload, other_user):
    assert rows.get(UploadSession, pk=upload.pk, owner=other_user.pk) is None
    assert rows.get(UploadSession, pk=uuid.uuid4()) is None
    assert rows.get(UploadSession, pk=str(upload.pk)) is not None  # prepared as the ORM prepares it


def test_get_with_related_reads_both_rows_in_one_statement(user, django_assert_num_queries):
    token = Token.objects.create(user=user)
    with django_assert_num_queries(1):
        read = rows.get(Token, key=token.key, related="user")
        assert read.user == user  # cached: no second query
    assert field_values(read.user) == field_values(type(user).objects.get(pk=user.pk))
    assert field_values(read) == field_values(token)


def test_reload_takes_every_change_made_elsewhere(upload):
    later = timezone.now() + timedelta(days=2)
    UploadSession.objects.filter(pk=upload.pk).update(offset=90, status=Status.FAILED, expires_at=later, error="x")
    rows.reload(upload)
    assert field_values(upload) == field_values(UploadSession.objects.get(pk=upload.pk))


def test_reload_of_a_deleted_row_raises(upload):
    UploadSession.objects.filter(pk=upload.pk).delete()
    with pytest.raises(UploadSession.DoesNotExist):
        rows.reload(upload)


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="the lock-and-read functions are PostgreSQL's")
def test_flagged_reads_every_field_as_the_orm_does(upload, django_assert_num_queries):
    """The functions of migration 0004 return the table's row type; `flagged` reads it field by
    field as the ORM would, with the flag, in one statement."""
    with django_assert_num_queries(1):
        held, row = rows.flagged(UploadSession, "uploads_look_and_read", 12345, upload.pk)
    assert held is False
    assert field_values(row) == field_values(UploadSession.objects.get(pk=upload.pk))
    assert rows.flagged(UploadSession, "uploads_look_and_read", 12345, uuid.uuid4()) is None


def test_update_is_conditional_and_counts_rows(upload):
    now = timezone.now()
    assert rows.update(UploadSession, values={"offset": 60, "updated_at": now}, where={"pk": upload.pk, "offset": 50}) == 0
    assert UploadSession.objects.get(pk=upload.pk).offset == 40  # unchanged
    assert rows.update(
        UploadSession, values={"offset": 60, "updated_at": now}, where={"pk": upload.pk, "offset": 40, "status": Status.PARTIAL}
    ) == 1
    stored = UploadSession.objects.get(pk=upload.pk)
    assert (stored.offset, stored.updated_at) == (60, now)


def test_update_that_breaks_a_constraint_marks_the_atomic_block_for_rollback(upload):
    with transaction.atomic():
        with pytest.raises(IntegrityError):
            rows.update(UploadSession, values={"offset": 101}, where={"pk": upload.pk})  # past its size
        # As after a failed `QuerySet.update`: the block is rolled back when it exits, and the
        # connection (on PostgreSQL, an aborted transaction) is usable again after it.
        assert transaction.get_connection().needs_rollback
    assert UploadSession.objects.get(pk=upload.pk).offset == 40
