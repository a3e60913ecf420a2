"""The upload engine against the real database, files and Redis (RELIABILITY §3, A, B, D, F, G, L).

Clients are simulated by small streams (objects with `read(n)`): one that ends early, one that
raises mid-body, one that watches what is committed while it is being read. Disk faults are
injected by wrapping `os.pwrite` / `os.fsync`. Every failure test also checks nothing changed.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.core.cache import caches
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django_redis import get_redis_connection

from uploads import digests, locks, progress, services, storage
from uploads.exceptions import (
    ChecksumMismatch,
    DataLost,
    IncompleteBody,
    InvalidRequest,
    OffsetMismatch,
    StorageFailure,
    StorageFull,
    TooLarge,
    TooManyUploads,
    UploadComplete,
    UploadConflict,
    UploadGone,
)
from uploads.models import Status, UploadSession
from uploads.validation import ChunkDigest

from .invariants import assert_invariants, final_files, partial_bytes

KiB = 1024
MiB = 1024 * KiB


# --- Helpers -------------------------------------------------------------------------------------


@pytest.fixture
def small_commits(settings):
    """Read 1 KiB blocks and commit every 4 KiB, never on a timer, so commits are deterministic."""
    settings.UPLOADS_BLOCK_SIZE = 1 * KiB
    settings.UPLOADS_COMMIT_BYTES = 4 * KiB
    settings.UPLOADS_COMMIT_INTERVAL = 3600


def source(size: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"\xab" * (size % 32)


def create(user, data: bytes, filename: str = "data.bin", checksum: str = "") -> UploadSession:
    upload, created = services.upload_create(owner=user, filename=filename, size=len(data), checksum=checksum)
    assert created
    return upload


def append(upload: UploadSession, data: bytes, start: int, end: int | None = None, **kwargs) -> UploadSession:
    end = len(data) if end is None else end
    return services.upload_append(
        upload=upload, offset=start, stream=io.BytesIO(data[start:end]), length=end - start, **kwargs
    )


def sha256_digest(chunk: bytes) -> ChunkDigest:
    return ChunkDigest("sha256", hashlib.sha256(chunk).digest())


def state(upload: UploadSession) -> tuple:
    """What must not change when a request is refused: the row's progress and the bytes on disk."""
    row = UploadSession.objects.get(pk=upload.pk)
    return row.offset, row.status, row.expires_at, partial_bytes(row), final_files(row)


def redis_offset(upload: UploadSession) -> int | None:
    raw = get_redis_connection("uploads").get(caches["uploads"].make_key(progress.key_for(upload)))
    return None if raw is None else int(raw)


class BrokenStream:
    """A client that sends `fail_at` bytes of `data`, then disconnects (the read raises)."""

    def __init__(self, data: bytes, fail_at: int, exc: BaseException | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.position = 0
        self.exc = exc or ConnectionResetError("client went away")

    def read(self, size: int) -> bytes:
        if self.position >= self.fail_at:
            raise self.exc
        block = self.data[self.position : min(self.position + size, self.fail_at)]
        self.position += len(block)
        return block


class WatchingStream(io.BytesIO):
    """A body whose every read() first samples Redis, then the committed DB offset, from another
    connection (its own thread): what any other worker could see while this request streams."""

    def __init__(self, data: bytes, upload: UploadSession) -> None:
        super().__init__(data)
        self.upload = upload
        self.samples: list[tuple[int | None, int]] = []
        self._observer = ThreadPoolExecutor(max_workers=1)

    def _sample(self) -> tuple[int | None, int]:
        cached = progress.read(self.upload)  # INV3: the cache before the truth
        committed = UploadSession.objects.filter(pk=self.upload.pk).values_list("offset", flat=True).get()
        return cached, committed

    def read(self, size: int = -1) -> bytes:
        self.samples.append(self._observer.submit(self._sample).result(10))
        return super().read(size)

    def close(self) -> None:
        # A lambda, so `connection` is looked up in the observer thread: its own connection.
        self._observer.submit(lambda: connection.close()).result(10)
        self._observer.shutdown()
        super().close()


def fail_fsync_after(monkeypatch, successes: int) -> None:
    """fsync works `successes` more times, then fails with EIO (fsyncgate)."""
    real_fsync = os.fsync
    remaining = {"n": successes}

    def fsync(fd):
        if remaining["n"] <= 0:
            raise OSError(errno.EIO, "Input/output error")
        remaining["n"] -= 1
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def fill_disk_after(monkeypatch, limit: int) -> None:
    """The disk takes `limit` more bytes, with a short write at the edge, then ENOSPC (X6)."""
    real_pwrite = os.pwrite
    room = {"n": limit}

    def pwrite(fd, data, offset):
        if room["n"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_pwrite(fd, bytes(data[: room["n"]]), offset)
        room["n"] -= written
        return written

    monkeypatch.setattr(os, "pwrite", pwrite)


# --- Creating ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_new_upload(settings, user, django_capture_on_commit_callbacks):
    settings.UPLOADS_EXPIRY = 600
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        upload, created = services.upload_create(owner=user, filename="../x/report.pdf", size=100)
    assert created
    row = UploadSession.objects.get(pk=upload.pk)
    assert (row.owner, row.filename, row.size, row.offset, row.status) == (user, "report.pdf", 100, 0, Status.PARTIAL)
    assert before + timedelta(seconds=600) <= row.expires_at <= timezone.now() + timedelta(seconds=600)
    assert storage.partial_size(upload.pk) == 0
    assert redis_offset(upload) == 0
    assert_invariants(upload, source(100))


@pytest.mark.django_db
def test_create_same_name_and_size_resumes_the_partial_upload(user):
    data = source(10_000)
    upload = create(user, data)
    append(upload, data, 0, 3000)
    again, created = services.upload_create(owner=user, filename="data.bin", size=len(data))
    assert not created
    assert again.pk == upload.pk
    assert again.offset == 3000
    assert UploadSession.objects.count() == 1


@pytest.mark.django_db
def test_create_resume_is_per_name_size_owner_and_status(user, other_user):
    data = source(1000)
    upload = create(user, data)
    assert services.upload_create(owner=user, filename="data.bin", size=999)[1]
    assert services.upload_create(owner=user, filename="other.bin", size=1000)[1]
    assert services.upload_create(owner=other_user, filename="data.bin", size=1000)[1]
    # Completed, failed and expired uploads are never resumed.
    append(upload, data, 0)
    assert services.upload_create(owner=user, filename="data.bin", size=1000)[0].pk != upload.pk


@pytest.mark.django_db
def test_create_does_not_resume_an_expired_upload(user):
    upload = create(user, source(1000))
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    again, created = services.upload_create(owner=user, filename="data.bin", size=1000)
    assert created and again.pk != upload.pk
    # The stale one was expired on the way, so the name is free and its data gone.
    upload.refresh_from_db()
    assert upload.status == Status.EXPIRED and storage.partial_size(upload.pk) is None


@pytest.mark.django_db
def test_create_with_a_different_checksum_conflicts_and_changes_nothing(user):
    data = source(1000)
    first = create(user, data, checksum=f"sha256:{hashlib.sha256(data).hexdigest()}")
    append(first, data[:100], 0)
    other_sha = f"sha256:{hashlib.sha256(b'other').hexdigest()}"
    with pytest.raises(UploadConflict) as caught:
        services.upload_create(owner=user, filename="data.bin", size=1000, checksum=other_sha)
    assert caught.value.status_code == 409
    assert caught.value.extra() == {"id": str(first.pk), "offset": 100}
    assert UploadSession.objects.count() == 1
    # Same checksum (in any case) resumes; no checksum resumes too.
    same, created = services.upload_create(
        owner=user, filename="data.bin", size=1000, checksum=f"sha256:{hashlib.sha256(data).hexdigest().upper()}"
    )
    assert not created and same.pk == first.pk and same.offset == 100
    assert not services.upload_create(owner=user, filename="data.bin", size=1000)[1]


@pytest.mark.django_db
def test_resume_adopts_a_checksum_declared_later(user):
    data = source(1000)
    first = create(user, data)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    again, created = services.upload_create(owner=user, filename="data.bin", size=1000, checksum=digest)
    assert not created and again.pk == first.pk
    first.refresh_from_db()
    assert first.checksum == digest


@pytest.mark.django_db
def test_one_unfinished_upload_per_owner_name_and_size_in_the_database(user):
    create(user, source(1000))
    with pytest.raises(IntegrityError), transaction.atomic():
        UploadSession.objects.create(owner=user, filename="data.bin", size=1000)


@pytest.mark.django_db
def test_create_empty_upload_is_complete_at_once(media_root, user):
    upload, created = services.upload_create(owner=user, filename="empty.txt", size=0)
    assert created
    assert upload.status == Status.COMPLETE
    assert upload.sha256 == hashlib.sha256(b"").hexdigest()
    assert (media_root / upload.file).read_bytes() == b""
    assert storage.partial_size(upload.pk) is None
    assert_invariants(upload, b"")


@pytest.mark.django_db
def test_create_empty_upload_with_its_checksum(user):
    upload, _ = services.upload_create(
        owner=user, filename="e", size=0, checksum=f"sha256:{hashlib.sha256(b'').hexdigest()}"
    )
    assert_invariants(upload, b"")


@pytest.mark.django_db
def test_create_empty_upload_with_a_wrong_checksum_creates_nothing(media_root, user):
    with pytest.raises(ChecksumMismatch):
        services.upload_create(owner=user, filename="e", size=0, checksum=f"sha256:{'0' * 64}")
    assert UploadSession.objects.count() == 0
    assert [p for p in media_root.rglob("*") if p.is_file()] == []


@pytest.mark.django_db
def test_create_too_large_creates_nothing(settings, media_root, user):
    settings.UPLOADS_MAX_SIZE = 1000
    with pytest.raises(TooLarge) as excinfo:
        services.upload_create(owner=user, filename="big.bin", size=1001)
    assert excinfo.value.status_code == 413
    assert UploadSession.objects.count() == 0
    assert list(media_root.rglob("*")) == []
    assert services.upload_create(owner=user, filename="big.bin", size=1000)[1]  # the limit itself is fine


@pytest.mark.django_db
@pytest.mark.parametrize("size", [2**63, 10**30])
def test_create_size_past_bigint_is_invalid_not_a_db_error(settings, user, size):
    # RELIABILITY F9: past the bigint column is malformed input (400), whatever UPLOADS_MAX_SIZE says.
    settings.UPLOADS_MAX_SIZE = 2**70
    with pytest.raises(InvalidRequest):
        services.upload_create(owner=user, filename="big.bin", size=size)
    assert UploadSession.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("size", [-1, True, False, "5", 5.0, None, [5]])
def test_create_invalid_size_creates_nothing(media_root, user, size):
    with pytest.raises(InvalidRequest) as excinfo:
        services.upload_create(owner=user, filename="a.bin", size=size)
    assert excinfo.value.status_code == 400
    assert UploadSession.objects.count() == 0
    assert list(media_root.rglob("*")) == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "filename, checksum", [("a\x00.png", ""), ("..", ""), (None, ""), ("a.bin", "md5:abc"), ("a.bin", 5)]
)
def test_create_invalid_name_or_checksum_creates_nothing(media_root, user, filename, checksum):
    with pytest.raises(InvalidRequest):
        services.upload_create(owner=user, filename=filename, size=10, checksum=checksum)
    assert UploadSession.objects.count() == 0
    assert list(media_root.rglob("*")) == []


@pytest.mark.django_db
def test_create_caps_active_uploads_per_user(settings, user, other_user):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = 2
    first = create(user, source(10), filename="1")
    create(user, source(10), filename="2")
    with pytest.raises(TooManyUploads) as excinfo:
        services.upload_create(owner=user, filename="3", size=10)
    assert excinfo.value.status_code == 429
    assert UploadSession.objects.filter(owner=user).count() == 2
    # Resuming an existing upload is not a new one; other users have their own allowance.
    assert services.upload_create(owner=user, filename="1", size=10)[0].pk == first.pk
    assert services.upload_create(owner=other_user, filename="3", size=10)[1]
    # Finished uploads do not count.
    append(first, source(10), 0)
    assert services.upload_create(owner=user, filename="3", size=10)[1]


@pytest.mark.django_db
def test_create_without_a_cap(settings, user):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = 0
    for i in range(5):
        create(user, source(10), filename=str(i))
    assert UploadSession.objects.count() == 5


# --- Appending -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_multi_chunk_upload_completes(media_root, user):
    data = source(10_000)
    upload = create(user, data, filename="My Report.PDF")
    for start in range(0, len(data), 3000):
        end = min(start + 3000, len(data))
        upload = append(upload, data, start, end)
        assert upload.offset == end
        assert_invariants(upload, data, acked=end)
    assert upload.status == Status.COMPLETE
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert upload.file == f"uploads/{upload.pk.hex}/{upload.pk.hex}.pdf"
    assert (media_root / upload.file).read_bytes() == data
    assert upload.expires_at is None


@pytest.mark.django_db
def test_one_request_for_the_whole_file(user):
    data = source(3 * MiB + 7)
    upload = append(create(user, data), data, 0)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_append_renews_the_expiry(settings, user):
    settings.UPLOADS_EXPIRY = 600
    data = source(1000)
    upload = create(user, data)
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() + timedelta(seconds=5))
    upload = append(upload, data, 0, 10)
    assert upload.expires_at > timezone.now() + timedelta(seconds=500)


@pytest.mark.django_db
def test_a_commit_leaves_an_expiry_renewed_less_than_a_step_ago(settings, user):
    """The stored expiry moves only once it lags by EXPIRY_STEP (1 % of UPLOADS_EXPIRY when that
    is shorter), so most chunks' UPDATEs change no indexed column (a HOT update on PostgreSQL)."""
    settings.UPLOADS_EXPIRY = 600  # a step of 6 s
    data = source(1000)
    upload = create(user, data)
    stored = timezone.now() + timedelta(seconds=597)  # renewed 3 s ago
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=stored)
    upload = append(upload, data, 0, 10)
    assert UploadSession.objects.get(pk=upload.pk).expires_at == stored == upload.expires_at
    assert UploadSession.objects.get(pk=upload.pk).offset == 10

    lagging = timezone.now() + timedelta(seconds=593)  # renewed 7 s ago: past the step
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=lagging)
    before = timezone.now()
    upload = append(upload, data, 10, 20)
    row = UploadSession.objects.get(pk=upload.pk)
    assert row.expires_at == upload.expires_at >= before + timedelta(seconds=600)

    settings.UPLOADS_EXPIRY = 86400  # a step of a minute, not 1 % (14.4 min)
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() + timedelta(seconds=86400 - 61))
    before = timezone.now()
    upload = append(upload, data, 20, 30)
    assert upload.expires_at >= before + timedelta(seconds=86400)


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="HOT updates are PostgreSQL's")
@pytest.mark.django_db
def test_chunk_commits_update_the_row_in_place_on_postgresql(user):
    """No indexed column changes on a chunk's commit, so PostgreSQL updates the row without new
    index entries (HOT). Counted within the test's transaction, where the engine commits with a
    plain UPDATE of the same columns and values as the procedure's."""
    data = source(4000)
    upload = create(user, data)
    table = UploadSession._meta.db_table

    def hot_updates() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_get_xact_tuples_hot_updated(%s::regclass)", [table])
            return cursor.fetchone()[0]

    before = hot_updates()
    for start in range(0, 3000, 1000):
        upload = append(upload, data, start, start + 1000)
    assert UploadSession.objects.get(pk=upload.pk).offset == 3000
    assert hot_updates() - before == 3


@pytest.mark.django_db
def test_long_chunks_hashed_on_the_helper_thread_record_the_files_sha(settings, user):
    # Bodies longer than a batch are hashed on a helper thread (digests.Running), settled at each
    # commit; a chunk cut off part-way keeps its committed prefix, and the digest still matches.
    settings.UPLOADS_BLOCK_SIZE = 64 * KiB
    settings.UPLOADS_COMMIT_BYTES = 1 * MiB
    data = source(5 * MiB + 12_345)
    upload = create(user, data)
    upload = append(upload, data, 0, 2 * MiB + 7)
    with pytest.raises(IncompleteBody) as excinfo:
        services.upload_append(
            upload=upload, offset=upload.offset, stream=BrokenStream(data[upload.offset:], 2 * MiB + 100),
            length=len(data) - upload.offset,
        )
    committed = excinfo.value.extra()["offset"]
    assert 2 * MiB + 7 < committed <= 4 * MiB + 107
    upload = append(UploadSession.objects.get(pk=upload.pk), data, committed)
    assert upload.status == Status.COMPLETE
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_empty_append_changes_nothing(user):
    data = source(1000)
    upload = create(user, data)
    append(upload, data, 0, 100)
    before = state(upload)
    services.upload_append(upload=upload, offset=100, stream=io.BytesIO(b""), length=0)
    assert state(upload) == before


@pytest.mark.django_db
@pytest.mark.parametrize("wrong", [0, 99, 101, 999])
def test_wrong_offset_is_refused_with_the_current_offset(user, wrong):
    data = source(1000)
    upload = create(user, data)
    append(upload, data, 0, 100)
    before = state(upload)
    with pytest.raises(OffsetMismatch) as excinfo:
        append(upload, data, wrong, min(wrong + 1, len(data)))
    assert excinfo.value.status_code == 409
    assert excinfo.value.extra()["offset"] == 100
    assert state(upload) == before
    assert_invariants(upload, data, acked=100)


@pytest.mark.django_db
def test_chunk_past_the_declared_size_is_refused(user):
    data = source(1000)
    upload = create(user, data)
    append(upload, data, 0, 100)
    before = state(upload)
    with pytest.raises(TooLarge) as excinfo:
        services.upload_append(upload=upload, offset=100, stream=io.BytesIO(b"x" * 901), length=901)
    assert excinfo.value.extra()["offset"] == 100
    assert state(upload) == before


@pytest.mark.django_db
def test_short_body_keeps_the_received_prefix(user, small_commits):
    # The client declared 16 KiB but the body ended after 10000 bytes (RELIABILITY X3).
    data = source(20 * KiB)
    upload = create(user, data)
    with pytest.raises(IncompleteBody) as excinfo:
        services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data[:10_000]), length=16 * KiB)
    row = assert_invariants(upload, data)
    assert row.offset == 10_000  # durably received, so kept (tus semantics, §6.2)
    assert excinfo.value.extra()["offset"] == row.offset
    assert len(partial_bytes(row)) == row.offset
    append(upload, data, row.offset)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_short_body_keeps_only_what_was_committed_when_the_last_commit_fails(monkeypatch, user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    # Commits at 4 KiB and 8 KiB succeed; the final one for the received prefix cannot fsync.
    fail_fsync_after(monkeypatch, successes=2)
    with pytest.raises(IncompleteBody) as excinfo:
        services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data[:10_000]), length=16 * KiB)
    monkeypatch.undo()
    row = assert_invariants(upload, data)
    assert row.offset == 8 * KiB
    assert excinfo.value.extra()["offset"] == 8 * KiB
    assert len(partial_bytes(row)) == 8 * KiB  # the unsynced tail was cut


@pytest.mark.django_db
@pytest.mark.parametrize("exc", [ConnectionResetError(), OSError("timed out"), ValueError("bad chunk encoding")])
def test_client_disconnect_mid_body_keeps_the_received_prefix(user, small_commits, exc):
    data = source(20 * KiB)
    upload = create(user, data)
    with pytest.raises(IncompleteBody) as excinfo:
        services.upload_append(upload=upload, offset=0, stream=BrokenStream(data, 6000, exc), length=len(data))
    row = assert_invariants(upload, data)
    assert row.offset == 6000
    assert excinfo.value.extra()["offset"] == 6000
    append(upload, data, 6000)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_right_chunk_digest_appends(user):
    data = source(5000)
    upload = create(user, data)
    upload = append(upload, data, 0, 2000, digest=sha256_digest(data[:2000]))
    assert upload.offset == 2000
    upload = append(upload, data, 2000, digest=ChunkDigest("sha512", hashlib.sha512(data[2000:]).digest()))
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_wrong_chunk_digest_changes_nothing(user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    before = state(upload)
    with pytest.raises(ChecksumMismatch) as excinfo:
        append(upload, data, 1000, 15_000, digest=sha256_digest(b"something else"))
    assert excinfo.value.status_code == 422
    assert excinfo.value.extra()["offset"] == 1000
    # All or nothing: not even the 4 KiB commit points were committed.
    assert state(upload)[:2] == before[:2]
    assert partial_bytes(upload) == before[3]
    assert_invariants(upload, data, acked=1000)


@pytest.mark.django_db
def test_interrupted_chunk_with_a_digest_keeps_nothing(user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    with pytest.raises(IncompleteBody) as excinfo:
        services.upload_append(
            upload=upload, offset=0, stream=BrokenStream(data, 10_000), length=len(data),
            digest=sha256_digest(data),
        )
    assert excinfo.value.extra()["offset"] == 0
    row = assert_invariants(upload, data)
    assert row.offset == 0 and partial_bytes(row) == b""


@pytest.mark.django_db
def test_disk_full_mid_chunk_truncates_to_the_committed_offset(monkeypatch, user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    fill_disk_after(monkeypatch, 10_000)
    with pytest.raises(StorageFull) as excinfo:
        append(upload, data, 0)
    assert excinfo.value.status_code == 507
    monkeypatch.undo()
    row = assert_invariants(upload, data)
    assert row.offset == 8 * KiB  # the last commit point before the disk filled
    assert len(partial_bytes(row)) == 8 * KiB
    append(upload, data, row.offset)  # space is back: the upload resumes
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_fsync_failure_refuses_the_chunk(monkeypatch, user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    before = state(upload)
    fail_fsync_after(monkeypatch, successes=0)
    with pytest.raises(StorageFailure) as excinfo:
        append(upload, data, 1000, 3000)
    assert excinfo.value.status_code == 503
    monkeypatch.undo()
    assert state(upload) == before  # never acked after a failed fsync (fsyncgate)
    assert_invariants(upload, data, acked=1000)


@pytest.mark.django_db
def test_fsync_failure_at_an_intermediate_commit(monkeypatch, user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    fail_fsync_after(monkeypatch, successes=1)  # the 4 KiB commit works, the 8 KiB one does not
    with pytest.raises(StorageFailure):
        append(upload, data, 0)
    monkeypatch.undo()
    row = assert_invariants(upload, data)
    assert row.offset == 4 * KiB


@pytest.mark.django_db(transaction=True)
def test_a_long_request_commits_progress_while_it_streams(user, small_commits):
    data = source(64 * KiB)
    upload = create(user, data)
    stream = WatchingStream(data[: 40 * KiB], upload)
    try:
        services.upload_append(upload=upload, offset=0, stream=stream, length=40 * KiB)
    finally:
        stream.close()
    committed = [offset for _, offset in stream.samples]
    # Other connections saw the offset grow in 4 KiB steps before the request ended.
    assert committed == sorted(committed)
    assert {4 * KiB, 8 * KiB, 36 * KiB} <= set(committed)
    assert max(committed) < 40 * KiB
    # INV3 during the request: Redis never ahead of the committed offset, and it kept up.
    assert all(cached is None or cached <= offset for cached, offset in stream.samples)
    assert any(cached == offset > 0 for cached, offset in stream.samples)
    assert_invariants(upload, data, acked=40 * KiB)


@pytest.mark.django_db(transaction=True)
def test_a_request_with_a_digest_commits_only_at_the_end(user, small_commits):
    data = source(16 * KiB)
    upload = create(user, data)
    stream = WatchingStream(data[: 12 * KiB], upload)
    try:
        services.upload_append(
            upload=upload, offset=0, stream=stream, length=12 * KiB, digest=sha256_digest(data[: 12 * KiB])
        )
    finally:
        stream.close()
    assert {offset for _, offset in stream.samples} == {0}
    assert_invariants(upload, data, acked=12 * KiB)


@pytest.mark.django_db
def test_a_writer_fenced_out_does_not_move_the_offset(user, small_commits):
    # Belt and braces behind the lock: the conditional UPDATE refuses a writer whose start is stale.
    data = source(20 * KiB)
    upload = create(user, data)

    class Interloper(io.BytesIO):
        def read(self, size=-1):
            if self.tell() == 2 * KiB:
                UploadSession.objects.filter(pk=upload.pk).update(offset=1)
            return super().read(size)

    with pytest.raises(OffsetMismatch) as excinfo:
        services.upload_append(upload=upload, offset=0, stream=Interloper(data[: 8 * KiB]), length=8 * KiB)
    assert excinfo.value.extra()["offset"] == 1
    assert UploadSession.objects.get(pk=upload.pk).offset == 1


# --- Completing -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_whole_file_checksum_verified_at_the_end(user):
    data = source(5000)
    upload = create(user, data, checksum=f"sha256:{hashlib.sha256(data).hexdigest()}")
    upload = append(append(upload, data, 0, 2500), data, 2500)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db(transaction=True)
def test_whole_file_checksum_mismatch_fails_the_upload(user):
    data = source(5000)
    upload = create(user, data, checksum=f"sha256:{hashlib.sha256(b'not this').hexdigest()}")
    append(upload, data, 0, 2500)
    with pytest.raises(ChecksumMismatch) as excinfo:
        append(upload, data, 2500)
    assert excinfo.value.extra()["status"] == Status.FAILED
    row = assert_invariants(upload, data, acked=2500)
    assert row.status == Status.FAILED
    assert "does not match" in row.error
    assert partial_bytes(row) is None and final_files(row) == []
    assert redis_offset(upload) is None
    with pytest.raises(UploadGone) as gone:
        append(upload, data, row.offset)
    assert gone.value.status_code == 410


@pytest.mark.django_db
def test_a_retried_last_chunk_after_completion_is_refused(media_root, user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 3000)
    done = append(upload, data, 3000)
    final = media_root / done.file
    final_stat = final.stat()
    # The response to the last chunk was lost; the client sends it again.
    with pytest.raises(UploadComplete) as excinfo:
        append(upload, data, 3000)
    assert excinfo.value.status_code == 409
    assert excinfo.value.extra()["offset"] == len(data)
    row = assert_invariants(upload, data, acked=len(data))
    assert row.completed_at == done.completed_at  # finalize ran once
    assert final.stat().st_mtime_ns == final_stat.st_mtime_ns and final.stat().st_ino == final_stat.st_ino


@pytest.mark.django_db
def test_crash_after_write_before_commit_tail_is_replaced(user):
    data = source(10_000)
    upload = create(user, data)
    append(upload, data, 0, 4000)
    # A worker wrote 4800 bytes past the offset and was killed before committing them: more than
    # the next chunk, so a writer that merely overwrote instead of truncating would leave a tail.
    with open(storage.partial_path(upload.pk), "ab") as handle:
        handle.write(b"\x00garbage" * 600)
    assert_invariants(upload, data, acked=4000, reconciled=False)
    # The client never got an ack for them; it resumes from the committed offset.
    upload = append(upload, data, 4000, 7000)
    assert_invariants(upload, data, acked=7000)
    upload = append(upload, data, 7000)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_crash_after_the_last_commit_before_finalize(user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    # All bytes were committed, then the worker died before publishing.
    storage.partial_path(upload.pk).write_bytes(data)
    UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))
    assert_invariants(upload, data, acked=1000, reconciled=False)
    upload = services.upload_append(upload=upload, offset=len(data), stream=io.BytesIO(b""), length=0)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db
def test_crash_after_the_rename_before_the_status_commit(media_root, user):
    data = source(5000)
    upload = create(user, data, filename="photo.png")
    append(upload, data, 0, 1000)
    storage.partial_path(upload.pk).write_bytes(data)
    UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))
    # finalize renamed the partial into place and died before recording it (RELIABILITY A3).
    final = media_root / storage.final_name(upload.pk, upload.filename)
    final.parent.mkdir(parents=True)
    os.rename(storage.partial_path(upload.pk), final)
    upload = services.upload_append(upload=upload, offset=len(data), stream=io.BytesIO(b""), length=0)
    row = assert_invariants(upload, data, acked=len(data))
    assert final_files(row) == [final]


@pytest.mark.django_db
def test_crash_after_the_rename_with_a_wrong_checksum_unpublishes(media_root, user):
    data = source(5000)
    upload = create(user, data, checksum=f"sha256:{'0' * 64}")
    storage.partial_path(upload.pk).write_bytes(data)
    UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))
    final = media_root / storage.final_name(upload.pk, upload.filename)
    final.parent.mkdir(parents=True)
    os.rename(storage.partial_path(upload.pk), final)
    with pytest.raises(ChecksumMismatch):
        services.upload_append(upload=upload, offset=len(data), stream=io.BytesIO(b""), length=0)
    row = assert_invariants(upload, data)
    assert row.status == Status.FAILED
    assert not final.exists()


@pytest.mark.django_db
def test_partial_file_lost_fails_the_upload_never_a_silent_rewind(user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    storage.partial_path(upload.pk).unlink()
    with pytest.raises(DataLost) as caught:
        append(upload, data, 1000)
    assert caught.value.status_code == 410
    upload.refresh_from_db()
    assert upload.offset == 1000  # never rewound (INV4)
    assert upload.status == Status.FAILED


# --- Ending uploads -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_expired_upload_is_gone_and_its_data_deleted(user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    assert redis_offset(upload) == 1000
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(UploadGone) as excinfo:
        append(upload, data, 1000)
    assert excinfo.value.status_code == 410
    row = assert_invariants(upload, data, acked=1000)
    assert row.status == Status.EXPIRED
    assert storage.partial_size(upload.pk) is None
    assert redis_offset(upload) is None


@pytest.mark.django_db
@pytest.mark.parametrize("status", [Status.FAILED, Status.EXPIRED])
def test_failed_or_expired_upload_is_gone(user, status):
    data = source(100)
    upload = create(user, data)
    UploadSession.objects.filter(pk=upload.pk).update(status=status)
    with pytest.raises(UploadGone):
        append(upload, data, 0)


@pytest.mark.django_db(transaction=True)
def test_delete_partial_upload(user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    assert redis_offset(upload) == 1000
    services.upload_delete(upload=upload)
    assert not UploadSession.objects.filter(pk=upload.pk).exists()
    assert storage.partial_size(upload.pk) is None
    assert not storage.lock_path(upload.pk).exists()
    assert redis_offset(upload) is None


@pytest.mark.django_db(transaction=True)
def test_delete_complete_upload(media_root, user):
    data = source(5000)
    upload = append(create(user, data), data, 0)
    assert redis_offset(upload) == len(data)
    services.upload_delete(upload=upload)
    assert not UploadSession.objects.filter(pk=upload.pk).exists()
    assert [p for p in media_root.rglob("*") if p.is_file()] == []
    assert redis_offset(upload) is None


@pytest.mark.django_db(transaction=True)
def test_abort_partial_upload(user):
    data = source(5000)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    upload = services.upload_abort(upload=upload, reason="Cancelled by the user.")
    row = assert_invariants(upload, data, acked=1000)
    assert (row.status, row.error, row.offset) == (Status.FAILED, "Cancelled by the user.", 1000)
    assert storage.partial_size(upload.pk) is None
    assert redis_offset(upload) is None
    with pytest.raises(UploadGone):
        append(upload, data, 1000)


@pytest.mark.django_db
def test_abort_complete_upload_changes_nothing(user):
    data = source(100)
    upload = append(create(user, data), data, 0)
    before = state(upload)
    services.upload_abort(upload=upload)
    assert state(upload) == before
    assert_invariants(upload, data, acked=100)


def _expire(upload: UploadSession) -> None:
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


@pytest.mark.django_db
def test_expire_idle_upload(user):
    data = source(100)
    upload = create(user, data)
    assert services.upload_expire(upload=upload) is False  # not idle yet
    _expire(upload)
    assert services.upload_expire(upload=upload) is True
    row = assert_invariants(upload, data)
    assert row.status == Status.EXPIRED
    assert services.upload_expire(upload=upload) is False  # already expired


@pytest.mark.django_db
def test_expire_skips_an_upload_renewed_since_it_was_selected(user):
    data = source(100)
    upload = create(user, data)
    _expire(upload)
    stale_copy = UploadSession.objects.get(pk=upload.pk)
    # The cleaner selected it; then a chunk committed and renewed it before the cleaner got the lock.
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() + timedelta(seconds=60))
    assert services.upload_expire(upload=stale_copy) is False
    assert UploadSession.objects.get(pk=upload.pk).status == Status.PARTIAL


@pytest.mark.django_db
def test_expire_never_touches_a_complete_upload(user):
    data = source(100)
    upload = append(create(user, data), data, 0)
    assert services.upload_expire(upload=upload) is False
    assert_invariants(upload, data, acked=100)


@pytest.mark.django_db(transaction=True)
def test_expire_skips_a_locked_upload(user):
    # RELIABILITY L2: the cleaner never deletes a file under a live writer.
    data = source(100)
    upload = create(user, data)
    _expire(upload)
    acquired, release = threading.Event(), threading.Event()

    def writer():
        try:
            with locks.upload_lock(upload.pk, timeout=5):
                acquired.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert acquired.wait(5)
        started = time.monotonic()
        assert services.upload_expire(upload=upload) is False
        assert time.monotonic() - started < 1  # it does not wait for the writer
        assert UploadSession.objects.get(pk=upload.pk).status == Status.PARTIAL
        assert storage.partial_size(upload.pk) == 0
    finally:
        release.set()
        thread.join(10)
    assert services.upload_expire(upload=upload) is True


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def cleanup_scene(settings, media_root, user):
    """An idle partial, a live partial with an old file, a completed upload, old and young orphans."""
    settings.UPLOADS_EXPIRY = 600
    idle = create(user, source(100), filename="idle")
    _expire(idle)
    live = create(user, source(100), filename="live")
    _age(storage.partial_path(live.pk), 3600)
    complete_data = source(100, seed=1)
    complete = append(create(user, complete_data, filename="done.txt"), complete_data, 0)
    old_orphan, young_orphan = uuid.uuid4(), uuid.uuid4()
    storage.create_partial(old_orphan)
    storage.create_partial(young_orphan)
    _age(storage.partial_path(old_orphan), 3600)
    return {
        "idle": idle,
        "live": live,
        "complete": complete,
        "complete_data": complete_data,
        "old_orphan": storage.partial_path(old_orphan),
        "young_orphan": storage.partial_path(young_orphan),
    }


@pytest.mark.django_db
def test_cleanup_dry_run_changes_nothing(media_root, cleanup_scene):
    files_before = sorted(p for p in media_root.rglob("*"))
    report = services.uploads_cleanup(dry_run=True)
    assert [u.pk for u in report.expired] == [cleanup_scene["idle"].pk]
    assert report.orphaned_files == [str(cleanup_scene["old_orphan"])]
    assert sorted(p for p in media_root.rglob("*")) == files_before
    assert UploadSession.objects.get(pk=cleanup_scene["idle"].pk).status == Status.PARTIAL


@pytest.mark.django_db
def test_cleanup_expires_idle_uploads_and_removes_old_orphans(media_root, cleanup_scene):
    report = services.uploads_cleanup()
    idle, live, complete = cleanup_scene["idle"], cleanup_scene["live"], cleanup_scene["complete"]
    assert [u.pk for u in report.expired] == [idle.pk]
    assert report.skipped_busy == []
    assert report.orphaned_files == [str(cleanup_scene["old_orphan"])]
    assert UploadSession.objects.get(pk=idle.pk).status == Status.EXPIRED
    assert storage.partial_size(idle.pk) is None
    assert not cleanup_scene["old_orphan"].exists()
    assert cleanup_scene["young_orphan"].exists()  # may belong to an upload being created right now
    # A live upload's file is kept however old it is; a completed upload is never touched.
    assert storage.partial_size(live.pk) == 0
    assert_invariants(live, source(100))
    assert_invariants(complete, cleanup_scene["complete_data"], acked=100)
    # Idempotent: a second run (e.g. after being killed half-way) finds nothing more to do.
    again = services.uploads_cleanup()
    assert (again.expired, again.orphaned_files) == ([], [])


# --- Redis trails the database (RELIABILITY B) ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_redis_equals_the_committed_offset_after_each_chunk(user):
    data = source(10_000)
    upload = create(user, data)
    assert redis_offset(upload) == 0
    for start in range(0, len(data), 2500):
        upload = append(upload, data, start, start + 2500)
        assert redis_offset(upload) == upload.offset == start + 2500
        assert_invariants(upload, data, acked=upload.offset)


@pytest.mark.django_db
def test_redis_follows_commits_inside_a_transaction(user, django_capture_on_commit_callbacks):
    # Nothing reaches Redis before the offset is committed; then it does (transaction.on_commit).
    data = source(1000)
    upload = create(user, data)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        append(upload, data, 0, 400)
    assert redis_offset(upload) is None
    for callback in callbacks:
        callback()
    assert redis_offset(upload) == 400


@pytest.mark.django_db(transaction=True)
def test_redis_keeps_the_committed_offset_after_an_interrupted_body(user, small_commits):
    data = source(20 * KiB)
    upload = create(user, data)
    with pytest.raises(IncompleteBody):
        services.upload_append(upload=upload, offset=0, stream=BrokenStream(data, 6000), length=len(data))
    assert redis_offset(upload) == 6000
    assert_invariants(upload, data)


@pytest.mark.django_db(transaction=True)
def test_redis_flushed_mid_upload(user):
    # RELIABILITY B2/B3: the upload goes on from the database and Redis refills.
    data = source(10_000)
    upload = create(user, data)
    append(upload, data, 0, 4000)
    # FLUSHALL as far as this test process can see: every key under its prefix (conftest gives each
    # process its own, so a real FLUSHDB here would wipe a parallel run's keys too).
    caches["uploads"].delete_pattern("*")
    assert redis_offset(upload) is None
    assert_invariants(upload, data, acked=4000)
    again, created = services.upload_create(owner=user, filename="data.bin", size=len(data))
    assert not created and again.offset == 4000  # resume by name never consults Redis for the offset
    assert redis_offset(upload) == 4000  # refilled from the database
    upload = append(upload, data, 4000, 8000)
    assert redis_offset(upload) == 8000
    upload = append(upload, data, 8000)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db(transaction=True)
def test_redis_ahead_of_the_database_is_never_trusted(user):
    # RELIABILITY B4: a bad value (or an old snapshot) says more was stored than the DB committed.
    data = source(2 * MiB)
    upload = create(user, data)
    append(upload, data, 0, 1000)
    bogus = 1000 + MiB
    get_redis_connection("uploads").set(caches["uploads"].make_key(progress.key_for(upload)), bogus)
    before = state(upload)
    with pytest.raises(OffsetMismatch) as excinfo:
        append(upload, data, bogus)
    assert excinfo.value.extra()["offset"] == 1000
    assert state(upload) == before
    assert_invariants(upload, data, acked=1000)  # ... and Redis no longer leads (INV3)
    upload = append(upload, data, 1000)
    assert_invariants(upload, data, acked=len(data))


@pytest.mark.django_db(transaction=True)
def test_upload_completes_with_redis_down(settings, user):
    # RELIABILITY B1: Redis is a cache; with it unreachable uploads go on at full speed.
    caches_setting = {alias: dict(config) for alias, config in settings.CACHES.items()}
    caches_setting["uploads"]["LOCATION"] = "redis://127.0.0.1:1/0"
    caches_setting["uploads"]["OPTIONS"] = {
        **caches_setting["uploads"]["OPTIONS"], "SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2,
    }
    settings.CACHES = caches_setting
    progress.reset_backoff()
    data = source(10_000)
    started = time.monotonic()
    upload = create(user, data)
    for start in range(0, len(data), 1000):
        upload = append(upload, data, start, start + 1000)
    assert time.monotonic() - started < 5  # no per-chunk Redis timeout (0.2 s each would show)
    assert progress.read(upload) is None
    assert_invariants(upload, data, acked=len(data))


# --- Acknowledged bytes that vanished from disk ------------------------------------------------


@pytest.mark.django_db
def test_lost_tail_fails_the_upload_instead_of_rewinding_or_zero_filling(user):
    # RELIABILITY A7/INV4: fewer bytes on disk than acknowledged (power loss without fsync, a
    # restored backup): never zero-fill, never silently rewind; deactivate the upload (410).
    data = source(1000)
    upload = create(user, data)
    append(upload, data, 0, 600)
    os.truncate(storage.partial_path(upload.pk), 300)
    with pytest.raises(DataLost) as caught:
        append(upload, data, 600)
    assert caught.value.status_code == 410
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and "300 of 600" in upload.error
    assert upload.offset == 600  # the acknowledged offset is never shown decreasing
    assert storage.partial_size(upload.pk) is None and final_files(upload) == []


@pytest.mark.django_db
def test_finalize_refuses_a_file_of_the_wrong_length(user):
    data = source(1000)
    upload = create(user, data)
    append(upload, data, 0, 999)
    # Something cut the file after the last acknowledgement but before the last byte's request.
    os.truncate(storage.partial_path(upload.pk), 999)
    UploadSession.objects.filter(pk=upload.pk).update(offset=1000)  # as if acked, then lost
    with pytest.raises(DataLost):
        append(upload, data, 1000)
    upload.refresh_from_db()
    assert upload.status == Status.FAILED and final_files(upload) == []


# --- tus-facing engine features: creation, deferred size, unframed bodies, release, concatenation ---


def create_tus(user, size: int | None, **kwargs) -> UploadSession:
    return services.upload_create_tus(owner=user, filename=kwargs.pop("filename", "t.bin"), size=size, **kwargs)


class InterruptedStream(io.BytesIO):
    """A body that a newer request interrupts after `after` bytes (what http.BodyStream does)."""

    def __init__(self, data: bytes, after: int) -> None:
        super().__init__(data)
        self.after = after
        self.interrupted = False

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.after:
            self.interrupted = True
        return b"" if self.interrupted else super().read(min(size, self.after - self.tell()))

    def interrupt(self) -> None:
        self.interrupted = True


@pytest.mark.django_db
def test_tus_create_is_always_a_new_upload(user):
    """tus clients resume by URL: the same name and size twice are two uploads, and a REST create
    of that name and size does not pick either of them up."""
    first, second = create_tus(user, 10), create_tus(user, 10)
    assert first.pk != second.pk
    assert {first.protocol, second.protocol} == {"tus"}
    rest, created = services.upload_create(owner=user, filename="t.bin", size=10)
    assert created and rest.pk not in (first.pk, second.pk)


@pytest.mark.django_db
def test_tus_create_without_a_name_or_size(user, media_root):
    upload = services.upload_create_tus(owner=user, filename=None, size=None)
    assert upload.filename == services.UNNAMED and upload.size is None and upload.length_deferred
    assert upload.status == Status.PARTIAL and storage.partial_path(upload.pk).exists()
    assert progress.key_for(upload) == f"progress:{user.pk}:tus:{upload.pk.hex}"


@pytest.mark.django_db
def test_tus_create_counts_against_the_active_cap(settings, user):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = 1
    create_tus(user, 5)
    with pytest.raises(TooManyUploads):
        create_tus(user, None)


@pytest.mark.django_db
def test_declaring_a_deferred_size_with_the_last_chunk_completes(user):
    data = source(10 * KiB)
    upload = create_tus(user, None)
    append(upload, data, 0, 4 * KiB)
    assert UploadSession.objects.get(pk=upload.pk).size is None
    upload = append(upload, data, 4 * KiB, declare_size=len(data))
    assert upload.size == len(data)
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE


@pytest.mark.django_db
def test_declaring_the_same_size_again_is_a_harmless_retry(user):
    data = source(100)
    upload = create_tus(user, None)
    append(upload, data, 0, 50, declare_size=100)
    upload = append(upload, data, 50, declare_size=100)
    assert upload.status == Status.COMPLETE


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("declared", "error"),
    [(99, InvalidRequest), (50, InvalidRequest), (2**63, InvalidRequest)],
)
def test_a_size_cannot_change_or_fall_below_the_offset(user, declared, error):
    data = source(100)
    upload = create_tus(user, None)
    append(upload, data, 0, 60)
    append(upload, data, 60, 60, declare_size=100)  # an empty chunk declaring the size
    before = state(upload)
    with pytest.raises(error):
        append(upload, data, 60, 70, declare_size=declared)
    assert state(upload) == before


@pytest.mark.django_db
def test_a_declared_size_below_the_offset_is_refused(user):
    data = source(100)
    upload = create_tus(user, None)
    append(upload, data, 0, 60)
    before = state(upload)
    with pytest.raises(InvalidRequest, match="smaller than the 60 bytes"):
        append(upload, data, 60, 70, declare_size=59)
    assert state(upload) == before
    assert UploadSession.objects.get(pk=upload.pk).size is None


@pytest.mark.django_db
def test_a_deferred_upload_is_bounded_by_the_maximum_size(settings, user):
    settings.UPLOADS_MAX_SIZE = 100
    upload = create_tus(user, None)
    with pytest.raises(TooLarge):
        append(upload, source(101), 0)
    with pytest.raises(TooLarge):
        append(upload, source(10), 0, declare_size=101)
    assert state(upload)[0] == 0


@pytest.mark.django_db
def test_an_unframed_body_is_read_to_its_end(user, small_commits):
    data = source(10 * KiB + 5)
    upload = create_tus(user, len(data))
    upload = services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data[:6 * KiB]), length=None)
    assert upload.offset == 6 * KiB
    upload = services.upload_append(upload=upload, offset=6 * KiB, stream=io.BytesIO(data[6 * KiB:]), length=None)
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE


@pytest.mark.django_db
def test_an_unframed_body_past_the_size_is_refused_and_its_tail_dropped(user, small_commits):
    """Commits made while it streamed stay (as for any interrupted body); nothing past the size."""
    data = source(10 * KiB)
    upload = create_tus(user, len(data))
    with pytest.raises(TooLarge) as caught:
        services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data + b"x"), length=None)
    committed = caught.value.extra()["offset"]
    assert committed < len(data)
    assert assert_invariants(upload, data, acked=committed).status == Status.PARTIAL
    assert len(partial_bytes(upload)) == committed


@pytest.mark.django_db
def test_an_interrupted_body_is_released_with_what_it_received(user, small_commits):
    data = source(20 * KiB)
    upload = create_tus(user, len(data))
    with pytest.raises(services.UploadReleased) as caught:
        services.upload_append(upload=upload, offset=0, stream=InterruptedStream(data, 9 * KiB), length=len(data))
    assert caught.value.status_code == 409 and caught.value.extra()["offset"] == 9 * KiB
    assert assert_invariants(upload, data, acked=9 * KiB).offset == 9 * KiB


@pytest.mark.django_db
def test_settle_finalizes_an_upload_whose_last_bytes_were_committed_but_not_finalized(user):
    """A crash between the last commit and finalize: the next HEAD finishes the job."""
    data = source(3 * KiB)
    upload = create_tus(user, len(data))
    with storage.PartialWriter(upload.pk, 0) as writer:
        writer.write(data)
        writer.sync()
    UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))
    upload = services.upload_settle(upload=upload)
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE


@pytest.mark.django_db
@pytest.mark.parametrize("fault", ["wrong-checksum", "bytes-missing"])
def test_settle_returns_a_crashed_finalize_that_fails_as_failed(user, fault):
    """Found by the model-based test: finishing the job may fail the upload; the read that did it
    then describes the failed upload (as every later read does) instead of raising."""
    data = source(3 * KiB)
    checksum = "sha256:" + hashlib.sha256(b"another file").hexdigest() if fault == "wrong-checksum" else ""
    upload = create(user, data, checksum=checksum)
    kept = data if fault == "wrong-checksum" else data[:-1]
    with storage.PartialWriter(upload.pk, 0) as writer:
        writer.write(kept)
        writer.sync()
    UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))
    upload = services.upload_settle(upload=upload)
    assert upload.status == Status.FAILED and upload.error
    assert storage.partial_size(upload.pk) is None and not upload.file
    assert services.upload_settle(upload=upload).status == Status.FAILED


def _settle_together(upload_id: uuid.UUID, barrier: threading.Barrier) -> UploadSession:
    try:
        barrier.wait(timeout=10)
        return services.upload_settle(upload=UploadSession.objects.get(pk=upload_id))
    finally:
        connection.close()  # this thread's own connection


@pytest.mark.django_db(transaction=True)
def test_two_finalizes_at_once_publish_exactly_once(user, caplog):
    """E6: two requests (a REST GET and a tus HEAD, say) find every byte committed and both try to
    finish the upload at the same moment, 8 times over. One publishes; the other sees it done. Both
    answers agree, there is one final file and one `complete` transition."""
    caplog.set_level("INFO", logger="uploads.services")
    for round_ in range(8):
        data = source(256 * KiB, seed=round_)
        upload = create(user, data, filename=f"e6-{round_}.bin")
        with storage.PartialWriter(upload.pk, 0) as writer:
            writer.write(data)
            writer.sync()
        UploadSession.objects.filter(pk=upload.pk).update(offset=len(data))  # the finalize that died
        barrier = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(_settle_together, upload.pk, barrier) for _ in range(2)]
            first, second = [future.result() for future in futures]
        assert first.status == second.status == Status.COMPLETE
        assert (first.file, first.sha256, first.completed_at) == (second.file, second.sha256, second.completed_at)
        assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE
        completions = [r for r in caplog.records if f"upload {upload.pk} complete" in r.getMessage()]
        assert len(completions) == 1, completions


def _part(user, data: bytes) -> UploadSession:
    part = create_tus(user, len(data), concat="partial", filename=None)
    return append(part, data, 0) if data else part


@pytest.mark.django_db
def test_concatenation_joins_finished_parts_in_order(user):
    a, b = source(5 * KiB, seed=1), source(3 * KiB + 1, seed=2)
    first, second = _part(user, a), _part(user, b)
    final = services.upload_concatenate(
        owner=user, part_ids=[second.pk, first.pk, second.pk], filename="joined.bin", concat="final;x"
    )
    joined = b + a + b
    assert final.filename == "joined.bin" and final.size == len(joined) and final.concat_final
    assert assert_invariants(final, joined, acked=len(joined)).status == Status.COMPLETE
    # The parts are kept for reuse, but only for the expiry window.
    for part in (first, second):
        part.refresh_from_db()
        assert part.status == Status.COMPLETE and part.expires_at is not None


@pytest.mark.django_db
def test_concatenation_of_empty_parts_is_complete_at_once(user):
    final = services.upload_concatenate(owner=user, part_ids=[_part(user, b"").pk], concat="final;x")
    assert final.status == Status.COMPLETE and final.size == 0


@pytest.mark.django_db
def test_a_final_upload_cannot_be_appended_to(user):
    part = _part(user, source(10))
    final = services.upload_concatenate(owner=user, part_ids=[part.pk], concat="final;x")
    with pytest.raises(services.FinalNotWritable):
        append(final, source(10), 10)


@pytest.mark.django_db
def test_concatenation_refuses_parts_it_cannot_use(settings, user, other_user):
    unfinished = create_tus(user, 10, concat="partial")
    plain = create_tus(user, 3)
    append(plain, source(3), 0)
    foreign = _part(other_user, source(4))
    before = UploadSession.objects.count()
    for part_id, message in [
        (unfinished.pk, "not finished"),
        (plain.pk, "not created with 'Upload-Concat: partial'"),
        (foreign.pk, "not one of your uploads"),
        (uuid.uuid4(), "not one of your uploads"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            services.upload_concatenate(owner=user, part_ids=[part_id], concat="final;x")
    with pytest.raises(InvalidRequest):
        services.upload_concatenate(owner=user, part_ids=[], concat="final;x")
    settings.UPLOADS_MAX_SIZE = 7
    big = _part(user, source(4))
    with pytest.raises(TooLarge):
        services.upload_concatenate(owner=user, part_ids=[big.pk, big.pk], concat="final;x")
    assert UploadSession.objects.count() == before + 1  # only the part made for the last case


@pytest.mark.django_db
def test_cleanup_removes_concatenation_parts_after_their_window_only(settings, media_root, user):
    part = _part(user, source(10))
    final = services.upload_concatenate(owner=user, part_ids=[part.pk], concat="final;x")
    plain = create_tus(user, 3)
    append(plain, source(3), 0)
    assert services.uploads_cleanup().expired == []
    UploadSession.objects.filter(pk__in=[part.pk, final.pk, plain.pk]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    report = services.uploads_cleanup()
    assert [u.pk for u in report.expired] == [part.pk]
    part.refresh_from_db()
    assert part.status == Status.EXPIRED and final_files(part) == []
    for kept in (final, plain):
        kept.refresh_from_db()
        assert kept.status == Status.COMPLETE and final_files(kept)


@pytest.mark.django_db
def test_receive_file_records_a_whole_file_as_a_new_upload(user):
    """The form without JavaScript: never resumes by name, goes through the append path, completes."""
    data = source(5 * KiB)
    rest, _ = services.upload_create(owner=user, filename="same.bin", size=len(data))
    upload = services.upload_receive_file(owner=user, filename="same.bin", stream=io.BytesIO(data), size=len(data))
    assert upload.pk != rest.pk and upload.protocol == "form"
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE
    empty = services.upload_receive_file(owner=user, filename="e", stream=io.BytesIO(b""), size=0)
    assert empty.status == Status.COMPLETE


# --- Reservations at creation (RELIABILITY D2, H1) ------------------------------------------------


@pytest.mark.django_db
def test_a_user_may_claim_only_so_many_unreceived_bytes(settings, user, other_user):
    settings.UPLOADS_MAX_RESERVED_PER_USER = 1000
    first = create_tus(user, 600)
    append(first, source(600), 0, 200)  # 400 still claimed
    create_tus(user, 600)  # 1000 claimed: at the limit
    before = UploadSession.objects.count()
    with pytest.raises(services.QuotaExceeded) as caught:
        services.upload_create(owner=user, filename="more.bin", size=1)
    assert caught.value.status_code == 413 and "limit of 1000" in caught.value.detail
    assert UploadSession.objects.count() == before
    create_tus(other_user, 1000)  # per user
    create_tus(user, None)  # a deferred size claims nothing yet


@pytest.mark.django_db
def test_a_create_that_cannot_fit_on_the_disk_is_507(settings, user, media_root):
    free = storage.free_space()
    settings.UPLOADS_MAX_RESERVED_PER_USER = 0
    settings.UPLOADS_MAX_SIZE = free
    settings.UPLOADS_MIN_FREE_SPACE = free  # nothing more may be claimed
    with pytest.raises(StorageFull) as caught:
        services.upload_create(owner=user, filename="big.bin", size=1)
    assert caught.value.status_code == 507
    assert not UploadSession.objects.exists()
    assert list(storage.partial_dir().iterdir()) == []
    settings.UPLOADS_MIN_FREE_SPACE = 0
    upload = create_tus(user, free // 2)
    with pytest.raises(StorageFull):  # claims count, not only bytes already written
        create_tus(user, free // 2 + 1)
    services.upload_delete(upload=upload)
    create_tus(user, free // 2 + 1)


# --- Running digests (uploads/digests.py) -----------------------------------------------------------


@pytest.fixture
def no_cold_hash(monkeypatch):
    """Completion must not read the partial file back to hash it."""

    def refuse(upload_id):
        raise AssertionError("completion hashed the file cold")

    monkeypatch.setattr(storage, "sha256_of_partial", refuse)


@pytest.mark.django_db
def test_completion_uses_the_digest_kept_across_chunks(user, small_commits, no_cold_hash):
    """Issue 6: a worker that received every chunk completes with the digest it kept while writing
    (no re-read of the file), through interrupted bodies and refused chunks alike."""
    data = os.urandom(50 * KiB + 7)
    upload = create(user, data)
    append(upload, data, 0, 9 * KiB)
    with pytest.raises(IncompleteBody):  # commits at 4 KiB steps, then what arrived
        services.upload_append(upload=upload, offset=9 * KiB, stream=BrokenStream(data[9 * KiB:], 6001), length=20 * KiB)
    offset = UploadSession.objects.get(pk=upload.pk).offset
    with pytest.raises(ChecksumMismatch):  # written, then discarded: the digest must not include it
        append(upload, data, offset, offset + 10 * KiB, digest=sha256_digest(b"other bytes"))
    with pytest.raises(OffsetMismatch):
        append(upload, data, 0, 1000)
    upload = append(upload, data, offset)
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE


@pytest.mark.django_db
def test_a_chunk_from_another_worker_falls_back_to_the_cold_hash(user, small_commits):
    """The digest is per worker: when a chunk was received elsewhere (here: forgotten, as a new
    worker would have it), completion hashes the file from disk and the SHA-256 is still right."""
    data = os.urandom(30 * KiB)
    upload = create(user, data)
    append(upload, data, 0, 10 * KiB)
    digests.forget(upload.pk)  # what a restarted or different worker knows of it
    append(upload, data, 10 * KiB, 20 * KiB)
    upload = append(upload, data, 20 * KiB)
    assert assert_invariants(upload, data, acked=len(data)).status == Status.COMPLETE
