"""The file layer: partial files, in-place writes, fault handling and publishing (RELIABILITY D, I, X6)."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.files.base import ContentFile

from uploads import storage
from uploads.exceptions import DataLost, StorageFailure, StorageFull


@pytest.fixture
def upload_id():
    return uuid.uuid4()


@pytest.fixture
def partial(upload_id):
    storage.create_partial(upload_id)
    return storage.partial_path(upload_id)


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))


# --- Creating partial files ----------------------------------------------------------------------


def test_create_partial_makes_an_empty_file_under_media_root(media_root, upload_id):
    storage.create_partial(upload_id)
    path = storage.partial_path(upload_id)
    assert path.is_file() and path.stat().st_size == 0
    assert path.parent == media_root.resolve() / "partial"
    assert path.name == f"{upload_id.hex}.part"
    assert storage.partial_size(upload_id) == 0


def test_create_partial_is_exclusive(partial, upload_id):
    partial.write_bytes(b"acknowledged bytes")
    with pytest.raises(StorageFailure):
        storage.create_partial(upload_id)
    assert partial.read_bytes() == b"acknowledged bytes"


def test_create_partial_refuses_a_planted_symlink(tmp_path, media_root, upload_id):
    # RELIABILITY I7: a symlink planted at the partial path must not be followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "victim.txt"
    target.write_bytes(b"do not touch")
    before = target.stat()
    storage.partial_dir().mkdir(parents=True)
    storage.partial_path(upload_id).symlink_to(target)

    with pytest.raises(StorageFailure):
        storage.create_partial(upload_id)

    assert target.read_bytes() == b"do not touch"
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_mode) == (before.st_size, before.st_mtime_ns, before.st_mode)


def test_create_partial_refuses_a_dangling_symlink(tmp_path, upload_id):
    # O_CREAT through a dangling link would create the target outside MEDIA_ROOT.
    target = tmp_path / "outside-created.txt"
    storage.partial_dir().mkdir(parents=True)
    storage.partial_path(upload_id).symlink_to(target)

    with pytest.raises(StorageFailure):
        storage.create_partial(upload_id)

    assert not target.exists()


def test_writer_refuses_a_symlink_swapped_in_for_the_partial(tmp_path, partial, upload_id):
    # Opening for writing truncates to the offset: following a link would cut someone else's file.
    target = tmp_path / "victim.bin"
    target.write_bytes(b"x" * 100)
    partial.unlink()
    partial.symlink_to(target)

    with pytest.raises(StorageFailure):
        storage.PartialWriter(upload_id, 10)

    assert target.read_bytes() == b"x" * 100


def test_create_partial_fsync_failure_is_a_storage_failure(monkeypatch, upload_id):
    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageFailure):
        storage.create_partial(upload_id)


def test_create_partial_out_of_space_is_storage_full(monkeypatch, upload_id):
    real_open = os.open

    def full_open(path, flags, *args, **kwargs):
        if str(path).endswith(storage.PARTIAL_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_open)
    with pytest.raises(StorageFull):
        storage.create_partial(upload_id)


# --- Writing ------------------------------------------------------------------------------------


def test_writer_appends_at_the_offset(partial, upload_id):
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(b"hello ")
        writer.write(b"world")
        writer.sync()
        assert writer.position == 11
        assert writer.size_on_disk == 11
    with storage.PartialWriter(upload_id, 11) as writer:
        writer.write(b"!")
    assert partial.read_bytes() == b"hello world!"


def cached_bytes(path: Path) -> int:
    """How much of the file is in the page cache (util-linux's fincore, i.e. mincore(2))."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


requires_fincore = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux's fincore")


@requires_fincore
@pytest.mark.parametrize("drop", [True, False])
def test_sync_drops_the_durable_pages_from_the_cache_only_when_asked(partial, upload_id, settings, drop):
    settings.UPLOADS_FSYNC = True
    block = os.urandom(1 << 20)
    with storage.PartialWriter(upload_id, 0) as writer:
        for _ in range(4):
            writer.write(block)
        writer.sync(drop_cached=drop)
        first = cached_bytes(partial)
        writer.write(block)  # then the next commit's bytes: only they were cached since
        writer.sync(drop_cached=drop)
    if drop:
        assert first < 64 * 1024 and cached_bytes(partial) < 64 * 1024
    else:
        assert first >= 4 << 20
    assert partial.read_bytes() == block * 5  # dropped from memory, never from the file


@requires_fincore
def test_without_fsync_nothing_is_dropped(partial, upload_id, settings):
    # Unsynced pages are dirty: dropping them would only start their write-back early.
    settings.UPLOADS_FSYNC = False
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(os.urandom(2 << 20))
        writer.sync(drop_cached=True)
    assert cached_bytes(partial) >= 2 << 20


def test_sync_file_range_is_bound_on_linux():
    assert sys.platform != "linux" or storage._sync_file_range is not None


@pytest.mark.parametrize("fsync", [True, False])
def test_the_write_back_starts_every_two_mib_behind_the_writes_with_fsync(
    monkeypatch, partial, upload_id, settings, fsync
):
    settings.UPLOADS_FSYNC = fsync
    started = []

    def start_writeback(fd, offset, length):
        started.append((offset, length))
        real_start_writeback(fd, offset, length)

    real_start_writeback = storage._start_writeback
    monkeypatch.setattr(storage, "_start_writeback", start_writeback)
    block = os.urandom(64 * 1024)
    with storage.PartialWriter(upload_id, 0) as writer:
        for _ in range(80):  # 5 MiB
            writer.write(block)
        writer.sync()
        for _ in range(40):  # 2.5 MiB more: counted from the sync
            writer.write(block)
    mib = 1 << 20
    assert started == ([(0, 2 * mib), (2 * mib, 2 * mib), (5 * mib, 2 * mib)] if fsync else [])
    assert partial.read_bytes() == block * 120


def test_writer_truncates_an_unacknowledged_tail(partial, upload_id):
    # Bytes past the committed offset were never acked (a crash between write and commit).
    partial.write_bytes(b"committedGARBAGE-TAIL")
    with storage.PartialWriter(upload_id, 9) as writer:
        assert writer.size_on_disk == 9
        writer.write(b"+more")
    assert partial.read_bytes() == b"committed+more"


def test_writer_truncate_drops_a_rejected_tail(partial, upload_id):
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(b"keep-drop")
        writer.truncate(4)
        assert writer.position == 4
        writer.write(b"!")
    assert partial.read_bytes() == b"keep!"


def test_writer_on_a_missing_partial_is_data_lost(upload_id):
    with pytest.raises(DataLost) as caught:
        storage.PartialWriter(upload_id, 0)
    assert caught.value.status_code == 410
    assert storage.partial_size(upload_id) is None


def test_writer_never_extends_a_file_shorter_than_the_offset(partial, upload_id):
    # Zero-filling up to the offset would turn lost bytes into wrong bytes (INV2).
    partial.write_bytes(b"abc")
    with pytest.raises(DataLost):
        storage.PartialWriter(upload_id, 10)
    assert partial.read_bytes() == b"abc"


def test_writer_loops_over_short_writes(monkeypatch, partial, upload_id):
    # os.write/pwrite may land only part of the buffer (RELIABILITY X6).
    real_pwrite = os.pwrite
    calls = []

    def short_pwrite(fd, data, offset):
        calls.append(len(data))
        return real_pwrite(fd, bytes(data[:3]), offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = bytes(range(256)) * 4
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(data)
        assert writer.position == len(data)
    assert partial.read_bytes() == data
    assert len(calls) == -(-len(data) // 3)


def test_writer_enospc_is_storage_full(monkeypatch, partial, upload_id):
    real_pwrite = os.pwrite
    state = {"calls": 0}

    def filling_pwrite(fd, data, offset):
        # Like a tmpfs that fills: one short write lands, the next call fails (X6).
        state["calls"] += 1
        if state["calls"] == 1:
            return real_pwrite(fd, bytes(data[:100]), offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    with storage.PartialWriter(upload_id, 0) as writer:
        with pytest.raises(StorageFull) as excinfo:
            writer.write(b"x" * 1000)
        assert excinfo.value.status_code == 507
        # The writer reports where it got to; the caller truncates back to what was committed.
        assert writer.position == 100
        writer.truncate(0)
    assert partial.read_bytes() == b""


def test_writer_quota_exceeded_is_storage_full(monkeypatch, partial, upload_id):
    def over_quota(fd, data, offset):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "pwrite", over_quota)
    with storage.PartialWriter(upload_id, 0) as writer, pytest.raises(StorageFull):
        writer.write(b"x")


def test_writer_eio_is_storage_failure(monkeypatch, partial, upload_id):
    def broken(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", broken)
    with storage.PartialWriter(upload_id, 0) as writer, pytest.raises(StorageFailure) as excinfo:
        writer.write(b"x")
    assert excinfo.value.status_code == 503


def test_writer_fsync_eio_is_storage_failure(monkeypatch, partial, upload_id):
    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(b"data")
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(StorageFailure):
            writer.sync()


def test_writer_skips_fsync_when_disabled(monkeypatch, settings, partial, upload_id):
    settings.UPLOADS_FSYNC = False
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(b"data")
        writer.sync()
    assert calls == []


def test_sha256_of_partial_hashes_the_file_from_disk(partial, upload_id):
    data = os.urandom(storage.HASH_BLOCK + 123)
    partial.write_bytes(data)
    assert storage.sha256_of_partial(upload_id) == hashlib.sha256(data).hexdigest()


def test_delete_partial_removes_data_and_lock_file_and_is_idempotent(partial, upload_id):
    os.close(storage.open_lock_file(upload_id))
    assert storage.lock_path(upload_id).exists()
    storage.delete_partial(upload_id)
    assert not partial.exists()
    assert not storage.lock_path(upload_id).exists()
    storage.delete_partial(upload_id)  # again: nothing to do, no error


def test_delete_partial_also_removes_a_release_request(partial, upload_id):
    # A deleted upload must not leave a `.release` file behind for the cleanup command to find.
    os.close(storage.open_lock_file(upload_id))
    storage.request_release(upload_id)
    storage.delete_partial(upload_id)
    assert not partial.exists()
    assert not storage.lock_path(upload_id).exists()
    assert not storage.release_path(upload_id).exists()
    assert not storage.release_requested(upload_id)
    assert list(storage.partial_dir().iterdir()) == []


# --- Publishing ---------------------------------------------------------------------------------


def test_publish_moves_the_partial_to_its_final_name(media_root, partial, upload_id):
    data = os.urandom(10_000)
    partial.write_bytes(data)
    inode = partial.stat().st_ino

    name = storage.publish(upload_id, "Holiday Photo.JPG")

    assert name == f"uploads/{upload_id.hex}/{upload_id.hex}.jpg"
    assert not partial.exists()
    final = media_root / name
    assert final.read_bytes() == data
    assert final.stat().st_ino == inode  # a rename on the same file system, not a copy
    assert [p for p in (media_root / "uploads").rglob("*") if p.is_file()] == [final]
    assert storage.final_size(name) == len(data)
    with storage.open_final(name) as handle:
        assert handle.read() == data


def test_publish_is_idempotent_after_a_crash_after_the_rename(media_root, partial, upload_id):
    partial.write_bytes(b"payload")
    first = storage.publish(upload_id, "a.txt")
    # The process died before the database recorded completion; finalize runs again.
    second = storage.publish(upload_id, "a.txt")
    assert first == second
    assert [p for p in (media_root / "uploads").rglob("*") if p.is_file()] == [media_root / first]
    assert (media_root / first).read_bytes() == b"payload"


def test_publish_replaces_a_leftover_final_copy(media_root, partial, upload_id):
    # A copying backend died after writing the final file but before removing the partial.
    partial.write_bytes(b"the real data")
    name = storage.final_name(upload_id, "a.txt")
    (media_root / name).parent.mkdir(parents=True)
    (media_root / name).write_bytes(b"the real d")
    assert storage.publish(upload_id, "a.txt") == name
    assert (media_root / name).read_bytes() == b"the real data"
    assert not partial.exists()
    assert len([p for p in (media_root / "uploads").rglob("*") if p.is_file()]) == 1


def test_publish_without_any_data_is_data_lost(upload_id):
    with pytest.raises(DataLost):
        storage.publish(upload_id, "a.txt")


def test_publish_keeps_the_lock_file_its_holder_still_locks(partial, upload_id):
    """The finishing request still holds the flock when it publishes: unlinking the file then would
    let the next request lock a fresh file and get in beside it. Cleanup removes it later."""
    os.close(storage.open_lock_file(upload_id))
    storage.publish(upload_id, "a.txt")
    assert storage.lock_path(upload_id).exists()


def test_create_empty_final(media_root, upload_id):
    name = storage.create_empty_final(upload_id, "empty.txt")
    assert (media_root / name).read_bytes() == b""
    assert storage.partial_size(upload_id) is None
    assert storage.final_size(name) == 0
    assert storage.sha256_of_final(name) == hashlib.sha256(b"").hexdigest()


def test_delete_final(media_root, partial, upload_id):
    name = storage.publish(upload_id, "a.txt")
    storage.delete_final(name)
    assert not (media_root / name).exists()
    storage.delete_final("")  # no name: nothing to delete, no error


@pytest.mark.parametrize(
    "filename, extension",
    [
        ("report.pdf", ".pdf"),
        ("Photo.JPEG", ".jpeg"),
        ("archive.tar.gz", ".gz"),
        ("noext", ""),
        (".bashrc", ""),  # a dot file has no extension
        ("../../etc/passwd", ""),
        ("shell.php.jpg", ".jpg"),
        ("evil.<script>", ""),
        ("x.ext with space", ""),
        ("x." + "a" * 17, ""),  # longer than any real extension
        ("x.日本", ""),
        ("x.tx\u0000t", ""),
        ("x.", ""),
    ],
)
def test_final_name_holds_no_user_text_but_a_safe_extension(upload_id, filename, extension):
    name = storage.final_name(upload_id, filename)
    assert name == f"uploads/{upload_id.hex}/{upload_id.hex}{extension}"
    assert name.isascii()


def test_final_name_is_stable(upload_id):
    # Finalising twice (after a crash) must target the same name.
    assert storage.final_name(upload_id, "a.txt") == storage.final_name(str(upload_id), "a.txt")


def test_every_path_stays_inside_media_root(media_root, upload_id):
    storage.create_partial(upload_id)
    os.close(storage.open_lock_file(upload_id))
    name = storage.publish(upload_id, "../../../../tmp/evil.sh")
    for path in (
        storage.partial_dir(),
        storage.partial_path(upload_id),
        storage.lock_path(upload_id),
        Path(storage.final_storage().path(name)),
    ):
        assert _inside(path, media_root), path
    assert not (media_root.parent / "tmp").exists()


@pytest.mark.parametrize("partial_dir", ["../escape", "/tmp", "", "."])
def test_partial_dir_outside_media_root_is_refused(settings, partial_dir):
    settings.UPLOADS_PARTIAL_DIR = partial_dir
    with pytest.raises(StorageFailure):
        storage.partial_dir()


def test_partial_dir_symlinked_outside_media_root_is_refused(settings, tmp_path, media_root):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (media_root / "partial").symlink_to(outside)
    with pytest.raises(StorageFailure):
        storage.partial_dir()


def test_partial_dir_follows_changed_settings(settings, media_root):
    # The folder is resolved once per settings, not per call: new settings are honoured at once.
    assert storage.partial_dir() == media_root.resolve() / "partial"
    settings.UPLOADS_PARTIAL_DIR = "elsewhere"
    assert storage.partial_dir() == media_root.resolve() / "elsewhere"
    settings.UPLOADS_PARTIAL_DIR = "../escape"
    with pytest.raises(StorageFailure):
        storage.partial_dir()


# --- Housekeeping -------------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_stale_partial_files(tmp_path, upload_id):
    old_id, young_id, lock_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for an_id in (old_id, young_id):
        storage.create_partial(an_id)
    os.close(storage.open_lock_file(lock_id))
    directory = storage.partial_dir()
    junk = directory / "not-an-upload.tmp"
    junk.write_bytes(b"")
    (directory / "subdir").mkdir()
    link = directory / f"{uuid.uuid4().hex}.part"
    link.symlink_to(tmp_path)
    for path in (storage.partial_path(old_id), storage.lock_path(lock_id), junk, directory / "subdir", link):
        _age(path, 3600)

    stale = dict((path.name, an_id) for an_id, path in storage.stale_partial_files(older_than_seconds=600))

    assert stale == {
        f"{old_id.hex}.part": old_id,
        f"{lock_id.hex}.lock": lock_id,
        "not-an-upload.tmp": None,
    }


def test_stale_partial_files_without_a_directory():
    assert list(storage.stale_partial_files(older_than_seconds=0)) == []


def test_remove_file_is_idempotent(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"x")
    storage.remove_file(path)
    storage.remove_file(path)
    assert not path.exists()


# --- Release requests ---------------------------------------------------------------------------


def test_release_request_round_trip(media_root, upload_id):
    # No partial directory yet: asking and checking must still work (the waiter creates it).
    assert not storage.partial_dir().exists()
    assert not storage.release_requested(upload_id)

    storage.request_release(upload_id)
    assert storage.release_requested(upload_id)
    path = storage.release_path(upload_id)
    assert path.is_file()
    assert path == storage.partial_dir() / f"{upload_id.hex}.release"
    assert _inside(path, media_root)

    storage.request_release(upload_id)  # asking again (waiters repeat) is harmless
    assert storage.release_requested(upload_id)

    storage.clear_release_request(upload_id)
    assert not storage.release_requested(upload_id)
    assert not path.exists()
    storage.clear_release_request(upload_id)  # nothing to clear: no error


def test_release_requests_are_per_upload(upload_id):
    other = uuid.uuid4()
    storage.request_release(upload_id)
    assert not storage.release_requested(other)
    storage.clear_release_request(other)
    assert storage.release_requested(upload_id)


def test_release_request_accepts_the_id_as_a_string(upload_id):
    storage.request_release(str(upload_id))
    assert storage.release_requested(upload_id)
    storage.clear_release_request(str(upload_id))
    assert not storage.release_requested(upload_id)


def test_release_request_does_not_follow_a_planted_symlink(tmp_path, upload_id):
    # O_NOFOLLOW, as for every file this module creates (RELIABILITY I7).
    target = tmp_path / "outside-created.txt"
    storage.partial_dir().mkdir(parents=True)
    storage.release_path(upload_id).symlink_to(target)
    storage.request_release(upload_id)  # no error: the waiter then just waits for the lock
    assert not target.exists()


def test_publish_removes_a_release_request(partial, upload_id):
    storage.request_release(upload_id)
    storage.publish(upload_id, "a.txt")
    assert not storage.release_requested(upload_id)


# --- Concatenation (tus concatenation extension) ----------------------------------------------------


def _save_final(name: str, data: bytes) -> str:
    return storage.final_storage().save(name, ContentFile(data))


def _read_all(stream, size: int) -> list[bytes]:
    blocks = []
    for _ in range(10_000):  # bounded: a stream that never ends fails the test instead of hanging
        block = stream.read(size)
        if not block:
            return blocks
        assert len(block) <= size
        blocks.append(block)
    pytest.fail("the concatenation never reached its end")


PARTS = [b"abc", b"", b"defgh", b"", b"", b"i", b"jklmnopqrstuvwxyz"]


@pytest.fixture
def part_names():
    return [_save_final(f"uploads/part{index}/part{index}.bin", data) for index, data in enumerate(PARTS)]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 64, 1024 * 1024])
def test_open_concatenation_reads_the_files_in_order_as_one_stream(part_names, size):
    with storage.open_concatenation(part_names) as stream:
        blocks = _read_all(stream, size)
        assert stream.read(size) == b""  # the end stays the end
    assert b"".join(blocks) == b"".join(PARTS)


def test_open_concatenation_follows_the_order_given(part_names):
    with storage.open_concatenation(list(reversed(part_names))) as stream:
        assert b"".join(_read_all(stream, 4)) == b"".join(reversed(PARTS))


def test_open_concatenation_may_name_a_file_twice(part_names):
    with storage.open_concatenation([part_names[0], part_names[0], part_names[2]]) as stream:
        assert b"".join(_read_all(stream, 2)) == b"abcabcdefgh"


def test_open_concatenation_does_not_change_the_list_it_was_given(part_names):
    names = list(part_names)
    with storage.open_concatenation(names) as stream:
        _read_all(stream, 5)
    assert names == part_names


def test_open_concatenation_of_only_empty_files_is_empty():
    names = [_save_final(f"uploads/e{index}/e{index}.bin", b"") for index in range(3)]
    with storage.open_concatenation(names) as stream:
        assert stream.read(10) == b""


def test_open_concatenation_of_nothing_is_empty():
    with storage.open_concatenation([]) as stream:
        assert stream.read(10) == b""


def test_open_concatenation_of_large_files(media_root):
    first, second = os.urandom(storage.HASH_BLOCK + 17), os.urandom(100_003)
    names = [_save_final("uploads/big1/big1.bin", first), _save_final("uploads/big2/big2.bin", second)]
    with storage.open_concatenation(names) as stream:
        assert b"".join(_read_all(stream, 65536)) == first + second


def test_open_concatenation_missing_file_is_data_lost(part_names):
    storage.final_storage().delete(part_names[2])
    with storage.open_concatenation(part_names) as stream:
        with pytest.raises(DataLost) as excinfo:
            _read_all(stream, 2)
    assert excinfo.value.status_code == 410


def test_open_concatenation_missing_first_file_is_data_lost_on_first_read(part_names):
    with storage.open_concatenation(["uploads/nope/nope.bin", *part_names]) as stream:
        with pytest.raises(DataLost):
            stream.read(10)


def test_open_concatenation_close_is_idempotent(part_names):
    stream = storage.open_concatenation(part_names)
    assert stream.read(2) == b"ab"
    stream.close()
    stream.close()


def test_writers_log_their_intervals_for_the_single_writer_check(partial, upload_id, tmp_path, monkeypatch):
    """INV7's evidence: with the test hooks' write log on, every writer logs when it held the file,
    and the checker finds writers that overlapped (which the upload lock must prevent)."""
    from uploads import faults

    from .faults.writelog import overlapping_writers, writers
    from .invariants import assert_single_writer

    log = tmp_path / "writes.log"
    monkeypatch.setattr(storage, "write_log", faults._WriteLog(str(log)))
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(b"abc")
    with storage.PartialWriter(upload_id, 3) as writer:
        writer.write(b"def")
    assert assert_single_writer(log) == 2
    assert [(w.upload, w.pid) for w in writers(log)] == [(upload_id.hex, str(os.getpid()))] * 2

    with storage.PartialWriter(upload_id, 6), storage.PartialWriter(upload_id, 6):
        pass  # two at once: what two workers without the lock would do
    checked, overlaps = overlapping_writers(log)
    assert checked == 4 and len(overlaps) == 1 and upload_id.hex in overlaps[0]
    # A writer killed while holding the file logs no end; opening inside a known interval still counts.
    start = time.monotonic_ns()
    with log.open("a") as handle:
        handle.write(f"open 1 {upload_id.hex} {start}\nclose 2 {upload_id.hex} {start - 5} {start + 5}\n")
        handle.write(f"open 2 {upload_id.hex} {start - 5}\n")
    assert len(overlapping_writers(log)[1]) == 2
