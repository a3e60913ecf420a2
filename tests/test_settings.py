"""project/settings.py reads the environment: defaults, overrides, and empty values as unset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import json; from django.conf import settings as s;"
    "print(json.dumps([s.DATABASES['default']['ENGINE'], s.CACHES['default']['LOCATION'],"
    " s.CACHES['uploads']['LOCATION'], s.DEBUG, s.ALLOWED_HOSTS, getattr(s, 'UPLOADS_MAX_SIZE', None),"
    " getattr(s, 'UPLOADS_FSYNC', None), getattr(s, 'UPLOADS_COMMIT_INTERVAL', None)]))"
)


def _settings(**env: str) -> list:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "UPLOADS_", "DEBUG"))}
    output = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, check=True, capture_output=True, text=True,
        env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings", **env},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_defaults_need_no_environment():
    engine, redis, uploads_redis, debug, hosts, max_size, fsync, interval = _settings()
    assert engine == "django.db.backends.sqlite3"
    assert redis == "redis://127.0.0.1:6379/0"
    assert uploads_redis == "redis://127.0.0.1:6379/1"  # its own database: clear() cannot wipe it
    assert debug is False and "127.0.0.1" in hosts
    assert (max_size, fsync, interval) == (None, None, None)  # uploads/conf.py holds the defaults


def test_empty_variables_count_as_unset():
    engine, redis, uploads_redis, *_ = _settings(DATABASE_URL="", REDIS_URL="", UPLOADS_REDIS_URL="")
    assert engine == "django.db.backends.sqlite3"
    assert redis == "redis://127.0.0.1:6379/0" and uploads_redis == "redis://127.0.0.1:6379/1"


def test_environment_overrides():
    engine, redis, uploads_redis, debug, hosts, max_size, fsync, interval = _settings(
        DATABASE_URL="postgres://u@db.example:5432/x", REDIS_URL="redis://cache:6379/4", DEBUG="1",
        ALLOWED_HOSTS="a.example, b.example", UPLOADS_MAX_SIZE="1024", UPLOADS_FSYNC="0",
        UPLOADS_COMMIT_INTERVAL="0.5",
    )
    assert engine == "project.postgresql"  # Django's, with a health check without a round trip
    assert (redis, uploads_redis) == ("redis://cache:6379/4", "redis://cache:6379/5")
    assert debug is True and hosts == ["a.example", "b.example"]
    assert (max_size, fsync, interval) == (1024, False, 0.5)


def test_postgresql_prepares_hot_queries_unless_turned_off():
    probe = "import json; from django.conf import settings as s; print(json.dumps(s.DATABASES['default'].get('OPTIONS', {})))"

    def options(**env: str) -> dict:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "UPLOADS_"))}
        output = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True,
            env={**clean, "DJANGO_SETTINGS_MODULE": "project.settings",
                 "DATABASE_URL": "postgres://u@db.example:5432/x", **env},
        ).stdout
        return json.loads(output.strip().splitlines()[-1])

    assert options() == {"server_side_binding": True, "prepare_threshold": 5}
    assert options(DATABASE_PREPARED_STATEMENTS="0") == {}  # e.g. behind an old PgBouncer
