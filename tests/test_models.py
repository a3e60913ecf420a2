"""The row's invariants live in the database too, so no code path (admin, shell, a bug) can break them."""
from __future__ import annotations

import uuid

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F

from uploads.models import Status, UploadSession

pytestmark = pytest.mark.django_db


def _row(user, **fields) -> UploadSession:
    return UploadSession(owner=user, filename="a.bin", **{"size": 10, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"offset": 11},  # offset > size
        {"offset": -1},
        {"size": -1, "offset": 0},
        {"size": -5, "offset": -5},
        {"status": Status.COMPLETE, "offset": 9},  # complete without every byte
    ],
)
def test_check_constraints_reject_bad_rows(user, fields):
    with pytest.raises(IntegrityError), transaction.atomic():
        _row(user, **fields).save()
    assert UploadSession.objects.count() == 0


@pytest.mark.parametrize(
    "update",
    [
        {"offset": F("size") + 1},
        {"offset": -1},
        {"size": 5},  # shrinking below the offset
        {"status": Status.COMPLETE},
    ],
)
def test_check_constraints_reject_bad_updates(user, update):
    row = _row(user, offset=7)
    row.save()
    with pytest.raises(IntegrityError), transaction.atomic():
        UploadSession.objects.filter(pk=row.pk).update(**update)
    row.refresh_from_db()
    assert (row.size, row.offset, row.status) == (10, 7, Status.PARTIAL)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"offset": 10},
        {"size": 0, "offset": 0, "status": Status.COMPLETE},
        {"offset": 10, "status": Status.COMPLETE},
        {"offset": 3, "status": Status.FAILED},
        {"size": 2**63 - 1, "offset": 2**63 - 1},  # the bigint limit fits on both backends
    ],
)
def test_valid_rows_are_accepted(user, fields):
    row = _row(user, **fields)
    row.save()
    row.refresh_from_db()
    assert (row.size, row.offset) == (fields.get("size", 10), fields.get("offset", 0))


def test_full_clean_reports_the_constraint(user):
    # Forms and the admin validate against the same constraints before hitting the database.
    with pytest.raises(ValidationError):
        _row(user, offset=11).full_clean()


def test_ids_are_random_uuids(user):
    # RELIABILITY K2: ids are not guessable or derived from the name.
    # Two rows with the same name (one complete, so both may exist at once).
    first, second = _row(user, status=Status.COMPLETE, offset=10), _row(user)
    first.save()
    second.save()
    assert isinstance(first.pk, uuid.UUID) and first.pk.version == 4
    assert first.pk != second.pk


def test_defaults_and_helpers(user):
    row = _row(user, offset=5)
    assert row.status == Status.PARTIAL
    assert not row.is_complete
    assert row.percent == 50.0
    assert str(row) == "a.bin (5/10)"
    assert _row(user, size=0, offset=0).percent == 100.0
    assert _row(user, offset=10, status=Status.COMPLETE).is_complete
