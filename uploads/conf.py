"""The app's settings, each read from Django settings on access with its default beside its name.

Reading on access (not at import) means `override_settings` in tests and per-process settings just
work. `uploads/checks.py` validates every value at start-up.
"""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Settings:
    @property
    def MAX_SIZE(self) -> int:
        """Largest declared upload size in bytes; bigger ones get 413 before any byte is sent."""
        return getattr(settings, "UPLOADS_MAX_SIZE", 20 * GiB)

    @property
    def CHUNK_SIZE(self) -> int:
        """Chunk size the web page sends per request."""
        return getattr(settings, "UPLOADS_CHUNK_SIZE", 8 * MiB)

    @property
    def EXPIRY(self) -> timedelta:
        """A partial upload idle this long expires (sliding: every stored byte renews it)."""
        value = getattr(settings, "UPLOADS_EXPIRY", 24 * 60 * 60)
        return value if isinstance(value, timedelta) else timedelta(seconds=value)

    @property
    def BLOCK_SIZE(self) -> int:
        """Bytes read from the request and written per loop: the only chunk data held in memory."""
        # 64 KiB: received, hashed and written while it is still in the CPU's cache. From a 1 MiB
        # buffer, write() alone ran up to 9x slower on the benchmark machine (bench/README.md).
        return getattr(settings, "UPLOADS_BLOCK_SIZE", 64 * KiB)

    @property
    def COMMIT_BYTES(self) -> int:
        """A long request makes its progress durable (fsync, DB, Redis) at least every this many bytes."""
        return getattr(settings, "UPLOADS_COMMIT_BYTES", 16 * MiB)

    @property
    def COMMIT_INTERVAL(self) -> float:
        """…and at least every this many seconds, so a slow request's progress shows and survives."""
        return getattr(settings, "UPLOADS_COMMIT_INTERVAL", 1.0)

    @property
    def FSYNC(self) -> bool:
        """fsync before an offset is committed: acknowledged bytes survive power loss, not just crashes."""
        return getattr(settings, "UPLOADS_FSYNC", True)

    @property
    def LOCK_TIMEOUT(self) -> float:
        """Seconds a request waits for another request holding the same upload before 423."""
        return getattr(settings, "UPLOADS_LOCK_TIMEOUT", 5.0)

    @property
    def BODY_TIMEOUT(self) -> float:
        """Seconds a request body may stall before the request ends, keeping what arrived (0: never)."""
        return getattr(settings, "UPLOADS_BODY_TIMEOUT", 30.0)

    @property
    def MAX_ACTIVE_PER_USER(self) -> int:
        """Partial uploads one user may have at once (0: no limit); the next create gets 429."""
        return getattr(settings, "UPLOADS_MAX_ACTIVE_PER_USER", 100)

    @property
    def MAX_RESERVED_PER_USER(self) -> int:
        """Bytes one user's unfinished uploads may still claim (declared size minus received, summed;
        0: no limit); a create past it gets 413."""
        return getattr(settings, "UPLOADS_MAX_RESERVED_PER_USER", 100 * GiB)

    @property
    def MIN_FREE_SPACE(self) -> int:
        """Bytes to keep free on the partial files' disk after every unfinished upload's remaining
        bytes are counted; a create that would cut into it gets 507 (RELIABILITY D2)."""
        return getattr(settings, "UPLOADS_MIN_FREE_SPACE", 256 * MiB)

    @property
    def TEST_HOOKS(self) -> bool:
        """Test-only crash points and the X-Worker-Pid header (uploads/faults.py); never in production."""
        return getattr(settings, "UPLOADS_TEST_HOOKS", False)

    @property
    def PROGRESS_CACHE(self) -> str:
        """Cache alias holding running totals; must not share a Redis database with `default`."""
        return getattr(settings, "UPLOADS_PROGRESS_CACHE", "uploads")

    @property
    def STORAGE(self) -> str:
        """Storage alias completed files are saved to."""
        return getattr(settings, "UPLOADS_STORAGE", "default")

    @property
    def PARTIAL_DIR(self) -> str:
        """Directory under MEDIA_ROOT for partial files (and lock files); never served."""
        return getattr(settings, "UPLOADS_PARTIAL_DIR", "partial")

    @property
    def COMPLETE_PREFIX(self) -> str:
        """Storage name prefix for completed files: `<prefix>/<upload id>/<file name>`."""
        return getattr(settings, "UPLOADS_COMPLETE_PREFIX", "uploads")


conf = Settings()
