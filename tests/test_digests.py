"""The per-worker running digests (uploads/digests.py)."""
from __future__ import annotations

import hashlib
import os
import threading
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


# --- Running: the digest a request feeds, hashed on a helper thread when it streams alone ----------


def helper_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "uploads-digest"]


def blocks(count: int, size: int = 64 * 1024) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def test_a_small_body_is_hashed_inline(upload_id):
    with digests.running(upload_id, 0) as running:
        data = blocks(3)  # less than a batch
        for block in data:
            running.update(block)
        assert helper_threads() == []
        assert running.settled().hexdigest() == hashlib.sha256(b"".join(data)).hexdigest()


def test_a_long_body_alone_is_hashed_on_a_helper_and_settles_at_every_commit(upload_id):
    expected = hashlib.sha256()
    with digests.running(upload_id, 0) as running:
        for _ in range(3):  # three commits
            data = blocks(digests.BATCH_BYTES // (64 * 1024) * 5 + 1)
            for block in data:
                running.update(block)
                expected.update(block)
            assert len(helper_threads()) == 1
            assert running.settled().hexdigest() == expected.hexdigest()
    assert helper_threads() == []  # ended with the request


def test_with_another_request_streaming_the_body_is_hashed_inline(upload_id):
    with digests.running(uuid.uuid4(), 0) as other, digests.running(upload_id, 0) as running:
        assert other is not None
        data = blocks(digests.BATCH_BYTES // (64 * 1024) * 3)
        for block in data:
            running.update(block)
        assert helper_threads() == []
        assert running.settled().hexdigest() == hashlib.sha256(b"".join(data)).hexdigest()


def test_no_digest_held_means_no_running_digest(upload_id):
    with digests.running(upload_id, 10) as running:
        assert running is None


def test_a_failure_on_the_helper_is_raised_by_settled(upload_id):
    with digests.running(upload_id, 0) as running:
        for block in blocks(digests.BATCH_BYTES // (64 * 1024)):
            running.update(block)
        running.update("not bytes")  # hashlib refuses it, on the helper thread
        for block in blocks(digests.BATCH_BYTES // (64 * 1024)):
            running.update(block)
        with pytest.raises(TypeError):
            running.settled()
    assert helper_threads() == []
