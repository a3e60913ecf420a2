"""Shared fixtures. Tests use the real PostgreSQL/SQLite and Redis named by the environment
(`make test` points Redis at databases 14 and 15, which these fixtures flush)."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth.hashers import make_password
from django.core.cache import caches
from django.db import connections
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from uploads import progress

from .invariants import assert_single_writer


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = str(root)
    return root


# Prepended to every Redis key by this test process, and by the servers it starts (CACHE_KEY_PREFIX),
# so a live test's invariant checks read the very keys its server writes.
TEST_KEY_PREFIX = f"t{os.getpid()}-"


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
        caches_setting[alias]["KEY_PREFIX"] = TEST_KEY_PREFIX + caches_setting[alias].get("KEY_PREFIX", "")
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
    for server in servers:
        assert_single_writer(server.write_log)  # INV7, after every live test


@pytest.fixture
def serve(start_gunicorn):
    """`serve(gunicorn_args, **env)`: `start_gunicorn` with the app preloaded in the master (a
    worker replacing a killed one then starts in a fraction of the time) plus `gunicorn_args` in
    GUNICORN_CMD_ARGS; every server is SIGKILLed, workers too, at the end of the test."""
    servers = []

    def start(gunicorn_args: str = "", **env: str):
        server = start_gunicorn(GUNICORN_CMD_ARGS=f"--preload {gunicorn_args}".strip(), **env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def gunicorn_server(start_gunicorn):
    return start_gunicorn()


@pytest.fixture
def token(user):
    """alice's API token."""
    return Token.objects.create(user=user).key


# --- Real clients: Debian's Chromium, tus-js-client under Node -----------------------------------

CHROMIUM = "/usr/bin/chromium"
# CI installs chromium (.ci/run); elsewhere the browser tests say why they are skipped, never pass silently.
requires_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="needs Debian's chromium"
)


@pytest.fixture
def browser(monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are
    # still plain synchronous code, so Django's async-safety guard does not apply.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()
        # With Playwright's loop running in this thread, Django gave the test's ORM calls a
        # connection of their own; close it now, or PostgreSQL refuses to drop the test database.
        connections.close_all()


TUS_JS_SOURCE = Path(__file__).resolve().parent / "tus_js"
TUS_JS_FILES = ("package.json", "package-lock.json", "upload.mjs")
TUS_JS_VERSION = "4.3.1"
NPM_TIMEOUT = 300  # seconds for `npm ci` (a cold npm cache downloads ~20 small packages)


def _tus_js_cache_dir() -> Path:
    if os.environ.get("TUS_JS_CACHE_DIR"):
        return Path(os.environ["TUS_JS_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "resumable-uploads" / "tus-js"


def _run_setup(command: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(command)}` did not finish within {timeout} s:\n{exc.stdout}\n{exc.stderr}", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def tus_js_dir() -> Path:
    """A folder with upload.mjs and tus-js-client installed by `npm ci`, reused while the lock is unchanged."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "The tus-js-client tests need Node.js (>= 18) and npm on PATH; install them "
            "(e.g. `apt-get install nodejs npm`) - these tests do not skip.",
            pytrace=False,
        )
    version = _run_setup([node, "--version"], Path.cwd(), 30).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.fail(f"tus-js-client {TUS_JS_VERSION} needs Node.js >= 18, found {version}.", pytrace=False)

    cache = _tus_js_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = hashlib.sha256(
        b"".join((TUS_JS_SOURCE / name).read_bytes() for name in ("package.json", "package-lock.json"))
    ).hexdigest()
    stamp = cache / ".installed-lock-sha256"
    installed = cache / "node_modules" / "tus-js-client" / "package.json"
    with open(cache / ".setup.lock", "w") as setup_lock:
        fcntl.flock(setup_lock, fcntl.LOCK_EX)  # two test runs at once install only once
        for name in TUS_JS_FILES:
            source, target = TUS_JS_SOURCE / name, cache / name
            if not target.exists() or target.read_bytes() != source.read_bytes():
                temporary = cache / f".{name}.tmp"
                shutil.copyfile(source, temporary)
                os.replace(temporary, target)  # atomic: another run may be executing upload.mjs
        up_to_date = stamp.exists() and stamp.read_text().strip() == wanted and installed.exists()
        if not up_to_date:
            stamp.unlink(missing_ok=True)
            _run_setup([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(cache)], cache, NPM_TIMEOUT)
            stamp.write_text(wanted + "\n")
    found = json.loads(installed.read_text())["version"]
    assert found == TUS_JS_VERSION, f"{cache} has tus-js-client {found}, not {TUS_JS_VERSION}"
    return cache
