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
import threading
import uuid
from collections import OrderedDict

# Enough for every upload a worker is likely to be serving; an entry is a few hundred bytes.
MAX_ENTRIES = 4096

_lock = threading.Lock()
_digests: OrderedDict[uuid.UUID, tuple[int, hashlib._Hash]] = OrderedDict()


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
