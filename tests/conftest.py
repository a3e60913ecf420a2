"""Shared fixtures. Tests use the real PostgreSQL/SQLite and Redis named by the environment
(`make test` points Redis at databases 14 and 15, which these fixtures flush)."""
from __future__ import annotations

import os

import pytest
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
    """Start each test with empty Redis databases (only the test ones: see the Makefile)."""
    for alias in ("default", "uploads"):
        location = settings.CACHES[alias]["LOCATION"]
        assert os.environ.get("UPLOADS_TEST_ALLOW_FLUSH") == "1" or location.endswith(("/14", "/15")), (
            f"Refusing to flush Redis {location!r}: run tests with REDIS_URL=redis://127.0.0.1:6379/14"
        )
        caches[alias].clear()
    progress.reset_backoff()
    yield
    progress.reset_backoff()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-password-1")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-password-1")


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
