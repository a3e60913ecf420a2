"""The only module that touches Redis: each upload's running total, kept as the seed asks.

Key scheme (cache alias `UPLOADS_PROGRESS_CACHE`, default `uploads`, in its own Redis database):

    <KEY_PREFIX>:<VERSION>:progress:<owner id>:<size>:<file name>  ->  bytes received (plain integer)

e.g. `redis-cli -n 1 GET 'uploads:1:progress:7:1048576:report.pdf'`. tus uploads are found by URL,
not by name (two may share a name, and a deferred size is unknown), so their key is
`progress:<owner id>:tus:<upload id hex>`. django-redis stores integers
unpickled, so the value reads as a number. The TTL is `UPLOADS_EXPIRY`, renewed on every write.

The database row is the truth and this is a cache that trails it: it is written only after the
offset is committed (`transaction.on_commit`), read only for display, and never used to decide
where a chunk goes. When Redis is down, slow or flushed, every function here degrades to "no value"
within the socket timeout, and backs off for a few seconds so uploads do not wait on it per chunk.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from django.core.cache import BaseCache, caches

from .conf import conf
from .models import Protocol, UploadSession

logger = logging.getLogger(__name__)

KEY_PREFIX = "progress"
# After a failure, skip Redis for this long: a dead Redis then costs one timeout per process per
# back-off window instead of one per chunk commit.
BACKOFF_SECONDS = 5.0

_down_until = 0.0


def key_for(upload: UploadSession) -> str:
    if upload.protocol == Protocol.TUS:
        return f"{KEY_PREFIX}:{upload.owner_id}:tus:{upload.pk.hex}"
    return f"{KEY_PREFIX}:{upload.owner_id}:{upload.size}:{upload.filename}"


def _cache() -> BaseCache | None:
    if time.monotonic() < _down_until:
        return None
    return caches[conf.PROGRESS_CACHE]


def _failed(action: str, exc: Exception) -> None:
    global _down_until
    _down_until = time.monotonic() + BACKOFF_SECONDS
    logger.warning("Redis %s failed (%s); progress totals skipped for %.0fs", action, exc, BACKOFF_SECONDS)


def reset_backoff() -> None:
    global _down_until
    _down_until = 0.0


def record(upload: UploadSession, total: int) -> None:
    """Store the running total. Call only after `total` is committed to the database."""
    cache = _cache()
    if cache is None:
        return
    try:
        cache.set(key_for(upload), int(total), timeout=int(conf.EXPIRY.total_seconds()))
    except Exception as exc:  # noqa: BLE001 - any Redis failure must not fail the upload
        _failed("SET", exc)


def forget(upload: UploadSession) -> None:
    cache = _cache()
    if cache is None:
        return
    try:
        cache.delete(key_for(upload))
    except Exception as exc:  # noqa: BLE001
        _failed("DEL", exc)


def read(upload: UploadSession) -> int | None:
    """The cached total, or None when absent or unreachable. For display only."""
    return read_many([upload]).get(upload.pk)


def read_many(uploads: Iterable[UploadSession]) -> dict:
    """Totals for many uploads in one MGET (the admin list), keyed by upload id."""
    uploads = list(uploads)
    cache = _cache()
    if cache is None or not uploads:
        return {}
    keys = {key_for(upload): upload.pk for upload in uploads}
    try:
        found = cache.get_many(list(keys))
    except Exception as exc:  # noqa: BLE001
        _failed("MGET", exc)
        return {}
    return {keys[key]: int(value) for key, value in found.items() if isinstance(value, int)}
