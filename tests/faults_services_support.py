"""Throwaway services for the Redis and PostgreSQL fault tests (tests/test_faults_services.py).

Each test gets servers of its own, on free ports, so killing, flushing or crashing them never
touches the Redis and PostgreSQL the rest of the suite shares:

- `RedisServer`: `redis-server --save '' --appendonly no` (the amnesiac variant of RELIABILITY §4);
  `kill()` is `kill -9`, `start()` brings it back empty on the same port.
- `LatencyProxy`: a TCP proxy that holds every byte sent to Redis for `delay` seconds (B6).
- `PgCluster`: `initdb` into a temp dir (as the `postgres` user when run as root, since initdb
  refuses root), `pg_ctl start` on a free port, `stop -m immediate` to crash it (C1, C2).
- `Sampler`: the INV3 sampler, reading Redis *before* the database every 10 ms.
- `pg_row` / `assert_raw_invariants`: INV1/2/5 for an upload whose row lives in the throwaway
  cluster, which the test's own Django connection cannot see.
"""
from __future__ import annotations

import glob
import hashlib
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- Redis -----------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of our own, without persistence, on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int, timeout: float = 2.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: redis-py 6+ retries a failed command 3 times with back-off by default, so a
        # probe of a killed server would stall for seconds instead of answering "down" at once.
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(7).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_until(self._ping, 10, f"redis-server on port {self.port}")

    def kill(self) -> None:
        """`kill -9`: no shutdown, no save; whatever it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class LatencyProxy:
    """TCP proxy in front of `target_port` that delivers every byte sent to it `delay` s late.

    Replies flow back at once, so each Redis command costs `delay` seconds, as over a bad link.
    """

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="latency-proxy", daemon=True).start()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            pending: queue.Queue = queue.Queue()
            threading.Thread(target=self._read_delayed, args=(client, pending), daemon=True).start()
            threading.Thread(target=self._send_when_due, args=(pending, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _read_delayed(self, source: socket.socket, pending: queue.Queue) -> None:
        try:
            while data := source.recv(65536):
                pending.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        pending.put((0.0, b""))

    def _send_when_due(self, pending: queue.Queue, target: socket.socket) -> None:
        try:
            while True:
                due, data = pending.get()
                if not data or self._stopped.is_set():
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(target)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(target)

    def close(self) -> None:
        self._stopped.set()
        _close(self.listener)
        with self._lock:
            for sock in self._sockets:
                _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Sampler:
    """INV3 every `interval` s in a thread: the Redis total never ahead of the committed offset.

    Reads Redis first, then the database, so a violation can only become visible, never hidden.
    """

    def __init__(self, read_cache: Callable[[], int | None], read_db: Callable[[], int],
                 close: Callable[[], None] = lambda: None, interval: float = 0.01) -> None:
        self.read_cache, self.read_db, self._close, self.interval = read_cache, read_db, close, interval
        self.samples = 0
        self.violations: list[tuple[int, int]] = []
        self.errors: list[Exception] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inv3-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    cached = self.read_cache()
                except Exception:  # noqa: BLE001 - Redis down or restarting: nothing cached to compare
                    cached = None
                try:
                    committed = self.read_db()
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(exc)
                    time.sleep(self.interval)
                    continue
                self.samples += 1
                if cached is not None and cached > committed:
                    self.violations.append((cached, committed))
                time.sleep(self.interval)
        finally:
            self._close()

    def sample_more(self, count: int = 3, timeout: float = 5.0) -> None:
        """Wait until `count` more samples are taken: each step of a test is then sampled, however
        fast the server answers it."""
        target = self.samples + count
        deadline = time.monotonic() + timeout
        while self.samples < target and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(self.interval / 2)

    def stop(self) -> Sampler:
        self._stopped.set()
        self._thread.join(timeout=10)
        return self


# --- PostgreSQL --------------------------------------------------------------------------------------


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary: the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return candidates[-1]
    return shutil.which(name)


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["su", "-s", "/bin/sh", "postgres", "-c", shlex.join(command)]


class PgCluster:
    """A throwaway PostgreSQL cluster: initdb, start on a free port, crash with `-m immediate`."""

    DB = "uploads_faults"

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            raise FileNotFoundError("initdb/pg_ctl not found (looked in /usr/lib/postgresql/*/bin and PATH)")
        self.root = Path(tempfile.mkdtemp(prefix="uploads-faults-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-locale", "-N"], timeout=120)

    def _run(self, command: list[str], timeout: float) -> None:
        with open(os.devnull, "wb") as devnull:
            result = subprocess.run(
                _as_postgres(command), stdin=subprocess.DEVNULL, stdout=devnull, stderr=subprocess.PIPE,
                timeout=timeout, cwd=self.root,
            )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.decode(errors='replace')}\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def url(self, db: str | None = None) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{db or self.DB}"

    def major_version(self) -> int:
        output = subprocess.run([self.pg_ctl, "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(output.split()[-1].split(".")[0])

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on"
        if self.major_version() >= 14:
            # After a crash PostgreSQL fsyncs every file of the cluster one by one before recovery
            # (~2 s here); one syncfs() per file system is as safe and ~5x faster.
            options += " -c recovery_init_sync_method=syncfs"
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"],
                  timeout=90)

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend dies at once, no checkpoint (a crash)."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"], timeout=60)

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.DB}"')

    def bootstrap(self, environment: dict[str, str]) -> str:
        """Migrate the project's schema into the cluster and make a user; return its API token."""
        script = (
            "import django\n"
            "django.setup()\n"
            "from django.core.management import call_command\n"
            "call_command('migrate', interactive=False, verbosity=0)\n"
            "from django.contrib.auth import get_user_model\n"
            "from rest_framework.authtoken.models import Token\n"
            "user, _ = get_user_model().objects.get_or_create(username='faults')\n"
            "print(Token.objects.get_or_create(user=user)[0].key)\n"
        )
        env = {**os.environ, **environment, "DATABASE_URL": self.url(), "DJANGO_SETTINGS_MODULE": "project.settings"}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        if result.returncode != 0:
            raise RuntimeError(f"migrating the throwaway cluster failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout.strip().splitlines()[-1]

    def destroy(self) -> None:
        if self.running():
            try:
                self.crash()
            except Exception:  # noqa: BLE001 - best effort: the directory goes anyway
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def pg_row(url: str, upload_id: str) -> dict:
    """The upload's row, read straight from the throwaway cluster."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, connect_timeout=5, row_factory=dict_row) as conn:
        found = conn.execute(
            'SELECT id, "offset", size, status, file, sha256, filename FROM uploads_uploadsession WHERE id = %s',
            [upload_id],
        ).fetchone()
    assert found is not None, f"no row {upload_id}"
    return found


def assert_raw_invariants(row: dict, source: bytes, media_root: Path, acked: int = 0, *, reconciled: bool = True) -> None:
    """INV1, INV2 and INV5 of tests/invariants.py, for a row read with `pg_row`."""
    from uploads import storage

    hex_id = row["id"].hex
    partial = Path(media_root) / "partial" / f"{hex_id}{storage.PARTIAL_SUFFIX}"
    final_dir = Path(media_root) / "uploads" / hex_id
    finals = sorted(p for p in final_dir.rglob("*") if p.is_file()) if final_dir.exists() else []
    on_disk = partial.read_bytes() if partial.exists() else None
    assert row["size"] == len(source)
    assert acked <= row["offset"], f"acked {acked} > committed offset {row['offset']}"
    if row["status"] == "partial":
        assert on_disk is not None, "a partial upload lost its partial file"
        assert row["offset"] <= len(on_disk), f"offset {row['offset']} > file length {len(on_disk)}"
        if reconciled:
            assert len(on_disk) == row["offset"], f"file length {len(on_disk)} != offset {row['offset']}"
        assert on_disk[: row["offset"]] == source[: row["offset"]], "stored bytes differ from the source"
        assert finals == [], f"an unfinished upload has a published file: {finals}"
    expected = hashlib.sha256(source).hexdigest()
    if row["status"] == "complete":
        assert row["offset"] == row["size"] and on_disk is None
        assert finals == [Path(media_root) / row["file"]], finals
        assert hashlib.sha256(finals[0].read_bytes()).hexdigest() == expected == row["sha256"]
