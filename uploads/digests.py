"""Running SHA-256 digests of uploads, kept in the worker between chunks.

Completing an upload records its SHA-256. Hashing the whole file cold from disk at the end makes
the last chunk's request as slow as reading the file (seconds per GiB). Instead the engine hashes
each block as it writes it and keeps, per upload, the digest of exactly the committed bytes (a copy
taken at every commit). When the last byte is committed, the digest is ready.

The digests live in this process only: hashlib cannot export a SHA-256 state, and the libraries
that can either need OpenSSL 1 (rehash) or hash at a seventh of OpenSSL's speed. A client keeps
one connection, which gunicorn serves from one worker, so its chunks normally meet their digest.
When they do not (another worker took a chunk, the worker restarted or crashed), the digest no
longer matches the committed offset and is dropped, and completion hashes the file cold from disk,
as it always did (RELIABILITY G6: after a crash the hash is always recomputed from disk).
"""
from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

# Enough for every upload a worker is likely to be serving; an entry is a few hundred bytes.
MAX_ENTRIES = 4096
# `Running` hashes on a helper thread in batches of this many bytes, with at most this many batches
# waiting: the blocks in flight are the only memory it holds (<= 4 MiB per request).
BATCH_BYTES = 256 * 1024
MAX_WAITING_BATCHES = 16

_lock = threading.Lock()
_digests: OrderedDict[uuid.UUID, tuple[int, hashlib._Hash]] = OrderedDict()
_feeding = 0  # requests in this process feeding a `Running` digest


def resume(upload_id: uuid.UUID, offset: int) -> hashlib._Hash | None:
    """A SHA-256 of the upload's first `offset` bytes to continue from, or None if this worker
    does not hold one (then the upload's digest is computed from disk when it completes)."""
    if offset == 0:
        return hashlib.sha256()
    with _lock:
        entry = _digests.get(upload_id)
    if entry is None or entry[0] != offset:
        return None
    return entry[1].copy()


def record(upload_id: uuid.UUID, offset: int, digest: hashlib._Hash) -> None:
    """Keep `digest`, the SHA-256 of the upload's first `offset` (committed) bytes."""
    with _lock:
        _digests[upload_id] = (offset, digest.copy())
        _digests.move_to_end(upload_id)
        while len(_digests) > MAX_ENTRIES:
            _digests.popitem(last=False)


def take(upload_id: uuid.UUID, offset: int) -> str | None:
    """The hex SHA-256 of the upload's first `offset` bytes if this worker holds it, and forget it."""
    with _lock:
        entry = _digests.pop(upload_id, None)
    return entry[1].hexdigest() if entry is not None and entry[0] == offset else None


def forget(upload_id: uuid.UUID) -> None:
    with _lock:
        _digests.pop(upload_id, None)


@contextmanager
def running(upload_id: uuid.UUID, offset: int) -> Iterator[Running | None]:
    """`resume`'s digest as a `Running` one for a request to feed, or None; its thread ends with the block."""
    global _feeding
    digest = resume(upload_id, offset)
    if digest is None:
        yield None
        return
    with _lock:
        _feeding += 1
    fed = Running(digest)
    try:
        yield fed
    finally:
        fed.close()
        with _lock:
            _feeding -= 1


def _alone() -> bool:
    """Whether one request at most is feeding a digest in this process."""
    return _feeding <= 1


class Running:
    """The running digest of a request's bytes, fed as they are written, hashed on a helper thread.

    Hashing is a third of an 8 MiB chunk's time when done inline (4.4 ms of ~17 at 2 GB/s), in
    series with receiving, writing and fsync, which mostly wait on the kernel; OpenSSL releases the
    GIL while it hashes, so on a second core the hash overlaps them. Blocks are handed over in
    batches (a handoff costs more than hashing 64 KiB), and only once a body is longer than one
    batch: a small chunk is hashed inline and starts no thread. Blocks are held, never copied.

    Only while this request is the process's only one streaming: when several are, they keep the
    cores busy already, and handoffs only add work (8 concurrent uploads: 0.82x with a helper each,
    bench/README.md). Each request chooses when its first batch is full, and keeps its choice.
    """

    def __init__(self, digest: hashlib._Hash) -> None:
        self._digest = digest
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def update(self, block: bytes) -> None:
        self._batch.append(block)
        self._batch_bytes += len(block)
        if self._batch_bytes >= BATCH_BYTES:
            self._hand_over()

    def settled(self) -> hashlib._Hash:
        """The digest of every block given so far (waits for the helper to catch up)."""
        if self._thread is None:
            self._hash(self._batch)  # never handed anything over: hash here
        else:
            self._hand_over()
            caught_up = threading.Event()
            self._queue.put(caught_up)
            caught_up.wait()
        self._batch, self._batch_bytes = [], 0
        if self._error is not None:
            raise self._error
        return self._digest

    def close(self) -> None:
        """Stop the helper thread, if one started; blocks not yet settled are dropped."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _hand_over(self) -> None:
        if self._thread is None and not _alone():
            self._hash(self._batch)
            self._batch, self._batch_bytes = [], 0
            return
        if self._thread is None:
            self._queue = queue.Queue(MAX_WAITING_BATCHES)
            self._thread = threading.Thread(target=self._run, name="uploads-digest", daemon=True)
            self._thread.start()
        if self._batch:
            self._queue.put(self._batch)  # blocks while MAX_WAITING_BATCHES wait: bounded memory
        self._batch, self._batch_bytes = [], 0

    def _hash(self, blocks: list[bytes]) -> None:
        for block in blocks:
            self._digest.update(block)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif self._error is None:
                try:
                    self._hash(item)
                except BaseException as exc:  # noqa: BLE001 - reported by `settled`
                    self._error = exc
