"""Running totals in Redis: plain integers, own database, and harmless when Redis is gone (RELIABILITY B)."""
from __future__ import annotations

import time

import pytest
from django.core.cache import caches
from django_redis import get_redis_connection

from uploads import progress
from uploads.conf import conf
from uploads.models import UploadSession

pytestmark = pytest.mark.django_db

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once


@pytest.fixture
def upload(user):
    # Unsaved is enough: the key only needs owner, size and name.
    return UploadSession(owner=user, filename="report final.pdf", size=1_000_000)


def raw_key(upload: UploadSession) -> str:
    return caches["uploads"].make_key(progress.key_for(upload))


@pytest.fixture
def redis_down(settings):
    """Point the uploads alias at a Redis that refuses connections, with short timeouts."""
    caches_setting = {alias: dict(config) for alias, config in settings.CACHES.items()}
    caches_setting["uploads"] = {
        **caches_setting["uploads"],
        "LOCATION": DEAD_REDIS,
        "OPTIONS": {
            **caches_setting["uploads"]["OPTIONS"],
            "SOCKET_CONNECT_TIMEOUT": 0.2,
            "SOCKET_TIMEOUT": 0.2,
        },
    }
    working = settings.CACHES
    settings.CACHES = caches_setting
    progress.reset_backoff()
    yield working
    progress.reset_backoff()


def test_key_scheme(settings, upload, user):
    assert progress.key_for(upload) == f"progress:{user.pk}:1000000:report final.pdf"
    # conftest gives each test process its own KEY_PREFIX; production's is "uploads".
    prefix = settings.CACHES["uploads"]["KEY_PREFIX"]
    assert raw_key(upload) == f"{prefix}:1:progress:{user.pk}:1000000:report final.pdf"


def test_record_stores_a_plain_integer(upload):
    progress.record(upload, 123)
    # Readable by redis-cli or any other client: no pickle.
    assert get_redis_connection("uploads").get(raw_key(upload)) == b"123"
    assert progress.read(upload) == 123


def test_record_ttl_is_the_expiry(settings, upload):
    settings.UPLOADS_EXPIRY = 600
    progress.record(upload, 1)
    ttl = get_redis_connection("uploads").ttl(raw_key(upload))
    assert 590 <= ttl <= 600


def test_record_renews_the_ttl(settings, upload):
    settings.UPLOADS_EXPIRY = 600
    progress.record(upload, 1)
    connection = get_redis_connection("uploads")
    connection.expire(raw_key(upload), 5)
    progress.record(upload, 2)
    assert connection.ttl(raw_key(upload)) > 500


def test_read_absent_is_none(upload):
    assert progress.read(upload) is None


def test_read_ignores_a_value_that_is_not_an_integer(upload):
    # A foreign or corrupt value is "unknown", never misread as an offset (RELIABILITY B7).
    caches["uploads"].set(progress.key_for(upload), "12")
    assert progress.read(upload) is None
    get_redis_connection("uploads").set(raw_key(upload), b"garbage")
    assert progress.read(upload) is None


def test_forget(upload):
    progress.record(upload, 5)
    progress.forget(upload)
    assert get_redis_connection("uploads").get(raw_key(upload)) is None
    assert progress.read(upload) is None


def test_read_many_returns_known_totals_by_upload_id(user):
    uploads = [UploadSession(owner=user, filename=f"f{i}.bin", size=100) for i in range(5)]
    for i, upload in enumerate(uploads[:3]):
        progress.record(upload, i * 10)
    totals = progress.read_many(uploads)
    assert totals == {uploads[0].pk: 0, uploads[1].pk: 10, uploads[2].pk: 20}
    assert progress.read_many([]) == {}


def test_clearing_the_default_cache_keeps_upload_totals(settings, upload):
    # django-redis clear() is FLUSHDB (RELIABILITY X9, B3): the totals must live elsewhere.
    assert settings.CACHES["uploads"]["LOCATION"] != settings.CACHES["default"]["LOCATION"]
    progress.record(upload, 42)
    caches["default"].set("unrelated", 1)
    caches["default"].clear()
    assert caches["default"].get("unrelated") is None
    assert get_redis_connection("uploads").get(raw_key(upload)) == b"42"
    assert progress.read(upload) == 42


def test_redis_down_record_and_read_degrade_quickly(redis_down, upload):
    started = time.monotonic()
    progress.record(upload, 10)  # no exception: a dead cache never fails an upload
    assert progress.read(upload) is None
    assert progress.read_many([upload]) == {}
    progress.forget(upload)
    assert time.monotonic() - started < 1.0


def test_redis_down_backs_off(settings, redis_down, upload):
    progress.record(upload, 10)  # fails, and starts the back-off
    # Redis is back, but the back-off skips it: no attempt is made, so nothing is written or read.
    settings.CACHES = redis_down
    get_redis_connection("uploads").set(raw_key(upload), 77)
    progress.record(upload, 11)
    assert progress.read(upload) is None
    assert get_redis_connection("uploads").get(raw_key(upload)) == b"77"

    progress.reset_backoff()
    assert progress.read(upload) == 77
    progress.record(upload, 12)
    assert progress.read(upload) == 12


def test_backoff_ends_by_itself(monkeypatch, settings, redis_down, upload):
    monkeypatch.setattr(progress, "BACKOFF_SECONDS", 0.1)
    assert progress.read(upload) is None  # fails, back-off for 0.1 s
    settings.CACHES = redis_down
    progress.record(upload, 5)
    assert get_redis_connection("uploads").get(raw_key(upload)) is None  # skipped
    time.sleep(0.15)
    progress.record(upload, 6)
    assert progress.read(upload) == 6


def test_progress_cache_alias_is_configurable(settings, upload):
    settings.CACHES = {**settings.CACHES, "other": {**settings.CACHES["uploads"], "KEY_PREFIX": "other"}}
    settings.UPLOADS_PROGRESS_CACHE = "other"
    assert conf.PROGRESS_CACHE == "other"
    progress.record(upload, 9)
    assert caches["other"].get(progress.key_for(upload)) == 9
    assert caches["uploads"].get(progress.key_for(upload)) is None
