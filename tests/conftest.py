"""Shared fixtures. Tests use the real PostgreSQL/SQLite and Redis named by the environment
(`make test` points Redis at databases 14 and 15, which these fixtures flush)."""
from __future__ import annotations

import functools
import os

import pytest
from django.contrib.auth.hashers import make_password
from django.core.cache import caches
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from uploads import progress


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = str(root)
    return root


@pytest.fixture(autouse=True)
def clean_redis(settings):
    """Start each test with no Redis keys of its own.

    Only the test databases (see the Makefile) are touched, and each test process gets its own key
    prefix, so two runs on one machine do not delete each other's keys.
    """
    caches_setting = {alias: dict(config) for alias, config in settings.CACHES.items()}
    for alias in ("default", "uploads"):
        location = caches_setting[alias]["LOCATION"]
        assert location.endswith(("/14", "/15")), (
            f"Refusing to use Redis {location!r} in tests: run them with "
            "REDIS_URL=redis://127.0.0.1:6379/14 (make test does)"
        )
        caches_setting[alias]["KEY_PREFIX"] = f"{caches_setting[alias].get('KEY_PREFIX', '')}-t{os.getpid()}"
    settings.CACHES = caches_setting
    for alias in ("default", "uploads"):
        caches[alias].delete_pattern("*")
    progress.reset_backoff()
    yield
    for alias in ("default", "uploads"):
        try:
            caches[alias].delete_pattern("*")
        except Exception:  # noqa: BLE001 - a test may have pointed the alias at a dead server
            pass
    progress.reset_backoff()


@functools.cache
def password_hash(password: str) -> str:
    """PBKDF2 at Django's real cost (half a second) once per password per run, not once per test.
    The hash is real, so live servers and the browser log in with the password as usual."""
    return make_password(password)


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create(username="alice", password=password_hash("alice-password-1"))


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create(username="bob", password=password_hash("bob-password-1"))


@pytest.fixture
def api(user):
    client = APIClient()
    token = Token.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def other_api(other_user):
    client = APIClient()
    token = Token.objects.create(user=other_user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def start_gunicorn(transactional_db, media_root, tmp_path):
    """Start the project under a real gunicorn (gthread, 2 workers) on a free loopback port,
    with extra environment variables; every server started is stopped after the test."""
    from .server import start_server

    servers = []

    def start(**env: str):
        server = start_server(media_root, tmp_path, **{"UPLOADS_COMMIT_BYTES": str(1024 * 1024), **env})
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gunicorn_server(start_gunicorn):
    return start_gunicorn()
