"""The per-worker running digests (uploads/digests.py)."""
from __future__ import annotations

import hashlib
import uuid

import pytest

from uploads import digests


@pytest.fixture
def upload_id():
    upload_id = uuid.uuid4()
    yield upload_id
    digests.forget(upload_id)


def test_a_new_upload_starts_an_empty_digest(upload_id):
    assert digests.resume(upload_id, 0).hexdigest() == hashlib.sha256().hexdigest()


def test_a_digest_resumes_only_at_its_offset(upload_id):
    digests.record(upload_id, 3, hashlib.sha256(b"abc"))
    assert digests.resume(upload_id, 2) is None and digests.resume(upload_id, 4) is None
    resumed = digests.resume(upload_id, 3)
    resumed.update(b"def")
    # A copy: continuing it does not move what is kept.
    assert resumed.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()
    assert digests.take(upload_id, 3) == hashlib.sha256(b"abc").hexdigest()


def test_take_answers_once_and_only_for_the_complete_offset(upload_id):
    digests.record(upload_id, 3, hashlib.sha256(b"abc"))
    assert digests.take(upload_id, 4) is None
    assert digests.take(upload_id, 3) is None  # the mismatched take forgot it: it was stale anyway
    digests.record(upload_id, 3, hashlib.sha256(b"abc"))
    assert digests.take(upload_id, 3) == hashlib.sha256(b"abc").hexdigest()
    assert digests.take(upload_id, 3) is None


def test_the_oldest_digests_are_dropped_past_the_bound(monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 3)
    ids = [uuid.uuid4() for _ in range(4)]
    for upload_id in ids:
        digests.record(upload_id, 1, hashlib.sha256(b"x"))
    assert digests.resume(ids[0], 1) is None
    assert all(digests.resume(upload_id, 1) is not None for upload_id in ids[1:])
    for upload_id in ids:
        digests.forget(upload_id)
