"""The only module that touches files: partial files, lock files, and publishing completed files.

Partial data lives at `MEDIA_ROOT/<UPLOADS_PARTIAL_DIR>/<upload id>.part`, a name the server makes
from the upload's random id, never from anything the client sent. It is written in place at explicit
offsets (`pwrite`), so truncating an unacknowledged tail and writing again is always safe. Completed
files are handed to a Django storage backend (`UPLOADS_STORAGE`) under a name derived from the id;
with the file-system backend that is a rename on the same file system, so it costs no copy.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import Storage, storages

from .conf import conf
from .exceptions import DataLost, StorageFailure, StorageFull
from .faults import write_log

PARTIAL_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
RELEASE_SUFFIX = ".release"
HASH_BLOCK = 4 * 1024 * 1024
_SAFE_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,16}\Z", re.ASCII)
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


# Write-behind: a partial file's pages are sent to the disk every WRITE_BEHIND bytes as they are
# written, so the fsync before a chunk's acknowledgement waits for the last stretch only, instead
# of starting the write-back of the whole chunk then (`PartialWriter.write`).
WRITE_BEHIND = 2 * 1024 * 1024
# Linux's sync_file_range(2), which Python's os module lacks; None elsewhere (no write-behind).
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # start the write-back of the range's dirty pages; do not wait


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the range's dirty pages to the disk, without waiting and without durability:
    only `fsync` makes bytes durable. An error here changes nothing; the fsync reports it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _raise_storage_error(exc: OSError) -> None:
    if exc.errno in _NO_SPACE:
        raise StorageFull() from exc
    raise StorageFailure() from exc


# The resolved folder for the settings it was resolved from: resolving walks every component of
# the path with a system call each, and every request of every upload needs the folder.
_resolved: tuple[tuple[str, str], Path] | None = None


def partial_dir() -> Path:
    global _resolved
    configured = (str(settings.MEDIA_ROOT), str(conf.PARTIAL_DIR))
    if _resolved is not None and _resolved[0] == configured:
        return _resolved[1]
    media_root = Path(settings.MEDIA_ROOT).resolve()
    path = (media_root / conf.PARTIAL_DIR).resolve()
    # UPLOADS_PARTIAL_DIR is configuration, but a symlink or '..' must still not lead outside.
    # Checked when the settings are first seen: a symlink swapped in later needs write access to
    # MEDIA_ROOT, and with that the files are the intruder's anyway.
    if media_root not in path.parents:
        raise StorageFailure("UPLOADS_PARTIAL_DIR must be inside MEDIA_ROOT.")
    _resolved = (configured, path)
    return path


def partial_path(upload_id: uuid.UUID) -> Path:
    return partial_dir() / f"{uuid.UUID(str(upload_id)).hex}{PARTIAL_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_partial(upload_id: uuid.UUID, *, lock_file: bool = False) -> None:
    """Create the empty partial file durably (file and directory entry) before the row exists.

    `lock_file`: create the upload's lock file now too (where locks are files, see locks.py), so
    that a later request (a DELETE on a disk out of inodes, say) never needs a new inode to lock.
    """
    directory = partial_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if lock_file:
            os.close(open_lock_file(upload_id))
        # O_EXCL|O_NOFOLLOW: never reuse or follow something planted at this name (RELIABILITY I7).
        fd = os.open(
            partial_path(upload_id),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            settings.FILE_UPLOAD_PERMISSIONS or 0o640,
        )
        try:
            if conf.FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)
        if conf.FSYNC:
            _fsync_dir(directory)
    except (OSError, StorageFull, StorageFailure) as exc:
        lock_path(upload_id).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_storage_error(exc)
        raise


def free_space() -> int:
    """Bytes free (for this process) on the file system holding the partial files."""
    directory = partial_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stats = os.statvfs(directory)
    except OSError as exc:
        _raise_storage_error(exc)
    return stats.f_bavail * stats.f_frsize


def partial_size(upload_id: uuid.UUID) -> int | None:
    try:
        return os.stat(partial_path(upload_id), follow_symlinks=False).st_size
    except FileNotFoundError:
        return None


def delete_partial(upload_id: uuid.UUID) -> None:
    for path in (partial_path(upload_id), lock_path(upload_id), release_path(upload_id)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class PartialWriter:
    """Writes one request's bytes into a partial file at explicit offsets.

    Opening truncates the file to the committed offset first: anything past it was never
    acknowledged (a crash between write and commit), and the chunk being written replaces it.
    """

    def __init__(self, upload_id: uuid.UUID, offset: int) -> None:
        self.position = offset
        self._synced = offset  # where the bytes not yet made durable by `sync` start
        self._written_back = offset  # where the bytes whose write-back has not been started begin
        self._fsync = conf.FSYNC  # read once per writer: `write` runs for every block
        self._upload_id = upload_id
        self._log_start: int | None = None  # set once open: the write log's interval start (INV7)
        try:
            self._fd = os.open(partial_path(upload_id), os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            # The row says partial but its file is gone (deleted by hand, lost disk): the bytes
            # the client was told are stored no longer are, so the upload cannot go on.
            raise DataLost("The partial data of this upload is missing; start a new upload.") from exc
        except OSError as exc:
            _raise_storage_error(exc)
        try:
            size = os.fstat(self._fd).st_size
            if size > offset:
                os.ftruncate(self._fd, offset)
        except OSError as exc:
            self.close()
            _raise_storage_error(exc)
        if size < offset:
            # Never ftruncate upwards: that would zero-fill acknowledged bytes (RELIABILITY INV2).
            self.close()
            raise DataLost(f"Only {size} of {offset} acknowledged bytes are on disk; start a new upload.")
        self._log_start = write_log.opened(upload_id)

    @property
    def size_on_disk(self) -> int:
        return os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                # A write may land only partly (RELIABILITY X6); loop until done or an error.
                written = os.pwrite(self._fd, view, self.position)
                self.position += written
                view = view[written:]
        except OSError as exc:
            _raise_storage_error(exc)
        if self._fsync and self.position - self._written_back >= WRITE_BEHIND:
            # 8 MiB chunks on a fast disk: 1.2x MB/s (bench/README.md). Without fsync the kernel
            # writes back when it likes, and nothing waits for it.
            _start_writeback(self._fd, self._written_back, self.position - self._written_back)
            self._written_back = self.position

    def sync(self, *, drop_cached: bool = False) -> None:
        """Make every byte written so far durable.

        `drop_cached`: the bytes will not be read again (the caller keeps their digest), so once
        they are on disk their pages leave the page cache. An upload is written once; kept, its
        pages would push the rest of the cache out, and each chunk would need fresh memory. On the
        benchmark VM, whose free memory goes back to the host, writing a chunk into fresh pages
        cost 3x writing into the pages just dropped (6.7 against 2.4 ms per 8 MiB; bench/README.md).
        """
        if not self._fsync:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            # fsyncgate: after a failed fsync the page cache may have dropped the data; never retry
            # and ack. The caller truncates back to the committed offset and refuses the chunk.
            _raise_storage_error(exc)
        if drop_cached and self.position > self._synced:
            # Clean after fsync, so this only frees them. Advice: a failure changes nothing.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, self._synced, self.position - self._synced, os.POSIX_FADV_DONTNEED)
        self._synced = self._written_back = self.position

    def truncate(self, offset: int) -> None:
        """Drop everything past `offset` (used to discard an unacknowledged or rejected tail)."""
        try:
            os.ftruncate(self._fd, offset)
            self.position = offset
            self._synced = min(self._synced, offset)
            self._written_back = min(self._written_back, offset)
        except OSError:
            # Not fatal: the next writer truncates to the committed offset before writing.
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._log_start is not None:
                write_log.closed(self._upload_id, self._log_start)

    def __enter__(self) -> PartialWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sha256_of_partial(upload_id: uuid.UUID) -> str:
    """Hash the partial file cold from disk: the only digest that survives crashes (RELIABILITY G6)."""
    digest = hashlib.sha256()
    try:
        with open(partial_path(upload_id), "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    except OSError as exc:
        _raise_storage_error(exc)
    return digest.hexdigest()


# --- Completed files --------------------------------------------------------------------------


def final_storage() -> Storage:
    return storages[conf.STORAGE]


def final_name(upload_id: uuid.UUID, filename: str) -> str:
    """`uploads/<id>/<id><.ext>`: derived from the id, so finalising twice targets the same name,
    and never containing user text beyond a plain ASCII extension."""
    upload_hex = uuid.UUID(str(upload_id)).hex
    ext = os.path.splitext(filename)[1]
    ext = ext.lower() if _SAFE_EXTENSION.match(ext) else ""
    return f"{conf.COMPLETE_PREFIX}/{upload_hex}/{upload_hex}{ext}"


class _PartialFile(File):
    """Lets FileSystemStorage move the partial into place instead of copying it."""

    def temporary_file_path(self) -> str:
        return self.name


def publish(upload_id: uuid.UUID, filename: str) -> str:
    """Move the finished partial file to its final storage name and return that name.

    Idempotent: when an earlier attempt already moved the file (a crash before the database
    recorded it), the file found at the final name is adopted.
    """
    storage = final_storage()
    name = final_name(upload_id, filename)
    source = partial_path(upload_id)
    if not source.exists():
        if storage.exists(name):
            return name
        raise DataLost("The data of this upload is missing; start a new upload.")
    if storage.exists(name):
        # A copy to a non-local backend was interrupted before the partial was removed.
        storage.delete(name)
    try:
        with _PartialFile(open(source, "rb"), name=str(source)) as content:
            saved = storage.save(name, content)
    except OSError as exc:
        # A copy that failed half-way (another file system, a full disk) must not stay at the
        # final name: nothing half-written is ever reachable there (RELIABILITY A3, D3).
        try:
            storage.delete(name)
        except OSError:
            pass
        _raise_storage_error(exc)
    if source.exists():  # backends that copy rather than move
        source.unlink()
    try:
        local_path = Path(storage.path(saved))
    except NotImplementedError:
        local_path = None
    if local_path is not None and conf.FSYNC:
        _fsync_dir(local_path.parent)
        _fsync_dir(partial_dir())
    # The lock file stays: the finishing request still holds its flock, and a lock file unlinked
    # under a holder lets the next request lock a new file and get in too. Cleanup removes it.
    release_path(upload_id).unlink(missing_ok=True)
    return saved


def create_empty_final(upload_id: uuid.UUID, filename: str) -> str:
    """A zero-byte upload is complete at creation; give it a real (empty) file."""
    create_partial(upload_id)
    return publish(upload_id, filename)


def open_final(name: str) -> File:
    try:
        return final_storage().open(name, "rb")
    except FileNotFoundError as exc:
        # Deleted behind the app's back (by hand, a storage lifecycle rule): say so, not a 500.
        raise DataLost("The stored file of this upload is missing.") from exc


def final_size(name: str) -> int:
    return final_storage().size(name)


def delete_final(name: str) -> None:
    if name:
        final_storage().delete(name)


def final_ends_with(name: str, offset: int, stream: BinaryIO) -> bool:
    """Whether `stream`, read to its end, holds exactly the stored file's bytes from `offset` to
    its end. Stops reading at the first difference."""
    with open_final(name) as handle:
        handle.seek(offset)
        while True:
            stored = handle.read(HASH_BLOCK)
            received = _read_exactly(stream, len(stored)) if stored else stream.read(1)
            if received != stored:
                return False
            if not stored:
                return True


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts, wanted = [], size
    while wanted:
        part = stream.read(wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


def sha256_of_final(name: str) -> str:
    digest = hashlib.sha256()
    with final_storage().open(name, "rb") as handle:
        for block in handle.chunks(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --- Locks and housekeeping -------------------------------------------------------------------


def lock_path(upload_id: uuid.UUID) -> Path:
    return partial_dir() / f"{uuid.UUID(str(upload_id)).hex}{LOCK_SUFFIX}"


def open_lock_file(upload_id: uuid.UUID) -> int:
    """An fd on the upload's lock file, for `flock` (see locks.py). Out of space or inodes is a
    StorageFull (507), so even a DELETE that would free space says why rather than failing."""
    try:
        partial_dir().mkdir(parents=True, exist_ok=True)
        return os.open(lock_path(upload_id), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        _raise_storage_error(exc)


def open_existing_lock_file(upload_id: uuid.UUID) -> int | None:
    """An fd on the upload's lock file if it exists (a reader's look never creates one)."""
    try:
        return os.open(lock_path(upload_id), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _raise_storage_error(exc)


def release_path(upload_id: uuid.UUID) -> Path:
    return partial_dir() / f"{uuid.UUID(str(upload_id)).hex}{RELEASE_SUFFIX}"


def request_release(upload_id: uuid.UUID) -> None:
    """Ask the request holding the upload to let go (see locks.py)."""
    try:
        partial_dir().mkdir(parents=True, exist_ok=True)
        os.close(os.open(release_path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError:
        pass  # the waiter then simply waits for the lock, as without release requests


def release_requested(upload_id: uuid.UUID) -> bool:
    return os.path.lexists(release_path(upload_id))


def clear_release_request(upload_id: uuid.UUID) -> None:
    try:
        release_path(upload_id).unlink()
    except FileNotFoundError:
        pass


class _Concatenation:
    """The completed files `names`, read one after another as a single stream."""

    def __init__(self, names: list[str]) -> None:
        self._names = list(names)
        self._current: File | None = None

    def read(self, size: int) -> bytes:
        while True:
            if self._current is None:
                if not self._names:
                    return b""
                self._current = open_final(self._names.pop(0))
            block = self._current.read(size)
            if block:
                return block
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def __enter__(self) -> _Concatenation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_concatenation(names: list[str]) -> _Concatenation:
    return _Concatenation(names)


def stale_partial_files(older_than_seconds: float) -> Iterator[tuple[uuid.UUID | None, Path]]:
    """Files in the partial directory untouched for a while, with the upload id their name encodes."""
    directory = partial_dir()
    if not directory.is_dir():
        return
    cutoff = time.time() - older_than_seconds
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_mtime > cutoff:
            continue
        stem = entry.name.removesuffix(PARTIAL_SUFFIX).removesuffix(LOCK_SUFFIX).removesuffix(RELEASE_SUFFIX)
        try:
            upload_id: uuid.UUID | None = uuid.UUID(hex=stem)
        except ValueError:
            upload_id = None
        yield upload_id, Path(entry.path)


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)
