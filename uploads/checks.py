"""Start-up checks: misconfiguration fails at `manage.py check` / server start, not mid-upload."""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.checks import Error, Warning, register

from .conf import conf

_POSITIVE_INTS = {
    "UPLOADS_MAX_SIZE": ("uploads.E001", lambda: conf.MAX_SIZE),
    "UPLOADS_CHUNK_SIZE": ("uploads.E002", lambda: conf.CHUNK_SIZE),
    "UPLOADS_BLOCK_SIZE": ("uploads.E003", lambda: conf.BLOCK_SIZE),
    "UPLOADS_COMMIT_BYTES": ("uploads.E004", lambda: conf.COMMIT_BYTES),
}


@register()
def check_settings(app_configs=None, **kwargs) -> list:
    errors: list = []
    for name, (check_id, read) in _POSITIVE_INTS.items():
        value = read()
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            errors.append(Error(f"{name} must be a positive integer (bytes), not {value!r}.", id=check_id))
    expiry = getattr(settings, "UPLOADS_EXPIRY", 1)
    if not isinstance(expiry, (int, float, timedelta)) or isinstance(expiry, bool) or conf.EXPIRY <= timedelta(0):
        errors.append(Error("UPLOADS_EXPIRY must be a positive number of seconds or a timedelta.", id="uploads.E005"))
    for name, value in (
        ("UPLOADS_COMMIT_INTERVAL", conf.COMMIT_INTERVAL),
        ("UPLOADS_LOCK_TIMEOUT", conf.LOCK_TIMEOUT),
        ("UPLOADS_BODY_TIMEOUT", conf.BODY_TIMEOUT),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            errors.append(Error(f"{name} must be a non-negative number of seconds.", id="uploads.E006"))
    active = conf.MAX_ACTIVE_PER_USER
    if isinstance(active, bool) or not isinstance(active, int) or active < 0:
        errors.append(
            Error("UPLOADS_MAX_ACTIVE_PER_USER must be 0 (no limit) or a positive integer.", id="uploads.E007")
        )
    errors.extend(_check_progress_cache())
    if conf.STORAGE not in settings.STORAGES:
        errors.append(Error(f"UPLOADS_STORAGE {conf.STORAGE!r} is not a key of STORAGES.", id="uploads.E010"))
    if conf.TEST_HOOKS:
        errors.append(
            Warning("UPLOADS_TEST_HOOKS is on: crash points may kill workers. Never in production.", id="uploads.W002")
        )
    for name, value in (("UPLOADS_MAX_RESERVED_PER_USER", conf.MAX_RESERVED_PER_USER),
                        ("UPLOADS_MIN_FREE_SPACE", conf.MIN_FREE_SPACE)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            errors.append(Error(f"{name} must be 0 or a positive integer (bytes).", id="uploads.E011"))
    if not settings.DEBUG and getattr(settings, "INSECURE_DEFAULT_SECRET_KEY", None) == settings.SECRET_KEY:
        errors.append(Warning("SECRET_KEY is the built-in development key; set SECRET_KEY.", id="uploads.W001"))
    return errors


def _check_progress_cache() -> list:
    caches = settings.CACHES
    alias = conf.PROGRESS_CACHE
    if alias not in caches:
        return [Error(f"UPLOADS_PROGRESS_CACHE {alias!r} is not a key of CACHES.", id="uploads.E008")]
    # The "default" alias itself shares trivially: the comparison below is then always true.
    if caches[alias].get("LOCATION") == caches.get("default", {}).get("LOCATION"):
        # django-redis clear() is FLUSHDB: clearing the default cache would wipe the totals (X9).
        return [
            Error(
                f"The {alias!r} cache shares its Redis database with 'default'; give it its own "
                "database number (UPLOADS_REDIS_URL).",
                id="uploads.E009",
            )
        ]
    return []
