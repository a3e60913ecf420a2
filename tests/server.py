"""Run the project under a real gunicorn, against the test database, for end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    """A DATABASE_URL naming the database pytest-django created for this run."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db["USER"] or "postgres"
    return f"postgres://{user}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    # Every partial-file writer's interval, when the server runs with UPLOADS_TEST_HOOKS (INV7).
    write_log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The pids of the workers gunicorn's master has forked."""
        pid = self.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]

    def kill(self) -> None:
        """SIGKILL master and workers: instant, where a graceful stop takes gunicorn 2-3 s."""
        if self.process.poll() is None:
            workers = self.workers()
            self.process.kill()  # the master first, so it respawns nothing
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=10)


def project_environment(media_root: Path, **env: str) -> dict[str, str]:
    """The environment for a project process (gunicorn, manage.py) sharing this test's database,
    MEDIA_ROOT and Redis keys, with the test hooks on (X-Worker-Pid, the write log for INV7;
    crash points stay off unless a test sets UPLOADS_CRASH_POINT)."""
    return {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "CONN_MAX_AGE": "0",
        "MEDIA_ROOT": str(media_root),
        "REDIS_URL": settings.REDIS_URL,
        "UPLOADS_REDIS_URL": settings.UPLOADS_REDIS_URL,
        # The test process's own key prefix (see conftest.clean_redis), so both read the same keys.
        "CACHE_KEY_PREFIX": settings.CACHES["uploads"]["KEY_PREFIX"].removesuffix("uploads"),
        "DEBUG": "0",
        "SECRET_KEY": "live-test-secret-key-not-for-production-0123456789",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "UPLOADS_TEST_HOOKS": "1",
        **env,
    }


def start_server(media_root: Path, log_dir: Path, **env: str) -> Server:
    port = _free_port()
    log = log_dir / f"gunicorn-{port}.log"
    write_log = log_dir / f"writes-{port}.log"
    environment = project_environment(
        media_root,
        **{
            "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": "2",
            "GUNICORN_THREADS": "4",
            "UPLOADS_WRITE_LOG": str(write_log),
            **env,
        },
    )
    return spawn_gunicorn("project.wsgi", environment, port, log, write_log)


def spawn_gunicorn(app: str, environment: dict[str, str], port: int, log: Path, write_log: Path) -> Server:
    """gunicorn with the project's config serving `app` on `port` (BIND in `environment`), once
    it accepts connections."""
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "project/gunicorn.py", app],
        cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT,
    )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log, write_log=write_log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{server.output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"gunicorn did not start:\n{server.output()}")
