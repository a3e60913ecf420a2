"""Start-up checks: every misconfiguration has a stable id and fails before the first upload."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import checks

from uploads.checks import check_settings


@pytest.fixture(autouse=True)
def real_secret_key(settings):
    # Without this every run would also carry W001 (the development key); tested on its own below.
    settings.SECRET_KEY = "a-test-secret-key-that-is-not-the-built-in-development-one"


def ids(settings_errors) -> list[str]:
    return [message.id for message in settings_errors]


def test_default_configuration_is_clean():
    assert check_settings() == []


@pytest.mark.parametrize(
    "name, check_id",
    [
        ("UPLOADS_MAX_SIZE", "uploads.E001"),
        ("UPLOADS_CHUNK_SIZE", "uploads.E002"),
        ("UPLOADS_BLOCK_SIZE", "uploads.E003"),
        ("UPLOADS_COMMIT_BYTES", "uploads.E004"),
    ],
)
@pytest.mark.parametrize("value", [0, -1, "8388608", 1.5, True, None])
def test_byte_sizes_must_be_positive_integers(settings, name, check_id, value):
    setattr(settings, name, value)
    assert ids(check_settings()) == [check_id]
    assert all(isinstance(message, checks.Error) for message in check_settings())


@pytest.mark.parametrize("value", [0, -1, "3600", True, timedelta(0), timedelta(seconds=-1)])
def test_expiry_must_be_positive(settings, value):
    settings.UPLOADS_EXPIRY = value
    assert ids(check_settings()) == ["uploads.E005"]


@pytest.mark.parametrize("value", [1, 0.5, timedelta(hours=1)])
def test_expiry_accepts_seconds_or_timedelta(settings, value):
    settings.UPLOADS_EXPIRY = value
    assert check_settings() == []


@pytest.mark.parametrize("name", ["UPLOADS_COMMIT_INTERVAL", "UPLOADS_LOCK_TIMEOUT"])
@pytest.mark.parametrize("value", [-1, -0.1, "1", True, None])
def test_intervals_must_be_non_negative_numbers(settings, name, value):
    setattr(settings, name, value)
    assert ids(check_settings()) == ["uploads.E006"]


@pytest.mark.parametrize("name", ["UPLOADS_COMMIT_INTERVAL", "UPLOADS_LOCK_TIMEOUT"])
@pytest.mark.parametrize("value", [0, 0.25, 30])
def test_intervals_accept_zero_and_positive(settings, name, value):
    setattr(settings, name, value)
    assert check_settings() == []


@pytest.mark.parametrize("value", [-1, "10", 2.5, None])
def test_max_active_per_user(settings, value):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = value
    assert ids(check_settings()) == ["uploads.E007"]


@pytest.mark.parametrize("value", [0, 1, 100])
def test_max_active_per_user_accepts_zero_for_no_limit(settings, value):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = value
    assert check_settings() == []


def test_progress_cache_must_exist(settings):
    settings.UPLOADS_PROGRESS_CACHE = "missing"
    assert ids(check_settings()) == ["uploads.E008"]


def test_progress_cache_must_not_share_the_default_database(settings):
    # clear() on the default cache is FLUSHDB (RELIABILITY X9): it would wipe the running totals.
    caches_setting = {alias: dict(config) for alias, config in settings.CACHES.items()}
    caches_setting["uploads"]["LOCATION"] = caches_setting["default"]["LOCATION"]
    settings.CACHES = caches_setting
    assert ids(check_settings()) == ["uploads.E009"]


def test_progress_cache_must_not_be_the_default_cache(settings):
    settings.UPLOADS_PROGRESS_CACHE = "default"
    assert ids(check_settings()) == ["uploads.E009"]


def test_storage_alias_must_exist(settings):
    settings.UPLOADS_STORAGE = "missing"
    assert ids(check_settings()) == ["uploads.E010"]


def test_development_secret_key_warns_when_debug_is_off(settings):
    settings.SECRET_KEY = settings.INSECURE_DEFAULT_SECRET_KEY
    settings.DEBUG = False
    messages = check_settings()
    assert ids(messages) == ["uploads.W001"]
    assert isinstance(messages[0], checks.Warning)
    settings.DEBUG = True
    assert check_settings() == []


def test_several_problems_are_reported_together(settings):
    settings.UPLOADS_MAX_SIZE = 0
    settings.UPLOADS_EXPIRY = -1
    settings.UPLOADS_STORAGE = "missing"
    assert ids(check_settings()) == ["uploads.E001", "uploads.E005", "uploads.E010"]


def test_checks_are_registered_with_django(settings):
    # So `manage.py check` and every server start run them.
    settings.UPLOADS_BLOCK_SIZE = 0
    assert "uploads.E003" in ids(checks.run_checks())


@pytest.mark.parametrize("name", ["UPLOADS_MAX_RESERVED_PER_USER", "UPLOADS_MIN_FREE_SPACE"])
@pytest.mark.parametrize("value", [-1, "1", 1.5, True, None])
def test_reservation_limits_are_byte_counts(settings, name, value):
    setattr(settings, name, value)
    assert ids(check_settings()) == ["uploads.E011"]


@pytest.mark.parametrize("name", ["UPLOADS_MAX_RESERVED_PER_USER", "UPLOADS_MIN_FREE_SPACE"])
def test_reservation_limits_accept_zero(settings, name):
    setattr(settings, name, 0)
    assert check_settings() == []


def test_test_hooks_are_flagged(settings):
    settings.UPLOADS_TEST_HOOKS = True
    assert ids(check_settings()) == ["uploads.W002"]
