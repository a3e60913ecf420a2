#!/usr/bin/env python
"""Load with chaos (RELIABILITY.md M1 + M2): many concurrent uploads while the servers are killed.

    make chaos CHAOS_ARGS="--json bench/out/chaos.json"      # or:
    .venv/bin/python bench/chaos.py [--uploads 200] [--min-seconds 90] [--size 16MiB] [--chunk 4MiB]
        [--workers 4] [--threads 16] [--kill-every 10] [--redis-every 30] [--max-seconds 600] [--json out.json]

Everything runs on loopback against services this script starts for itself, so it never touches
what other work on the machine uses:
- a fresh PostgreSQL database `chaos_<pid>` on the local server (127.0.0.1:5432, user postgres),
  migrated here and dropped at the end;
- its own `redis-server --save '' --appendonly no` on a free port (the default cache in db 0, the
  running totals in db 1);
- a temporary MEDIA_ROOT;
- gunicorn with the project's config (its worker, gthread-based: project/gunicorn_worker.py),
  `--workers` x `--threads`, DEBUG off.

Half the clients use the REST API (POST /api/uploads/, then PUT chunks with Content-Range), half
tus 1.0.0 (POST /files/, then PATCH with Upload-Offset). Each sends `--size` bytes of pseudo-random
data, generated on the fly from a seeded pool (nothing is held per upload but its SHA-256 state),
and retries the way a real client must: on a connection error, a timeout, a 5xx, a 423 or a 409 it
backs off, asks the server for the offset (REST GET, tus HEAD) and goes on from there.

`--uploads` clients run at once. On this 2-core machine 200 x 16 MiB finish in 30-40 s, before
the first Redis restart is due, so each client starts another upload when its upload is done until
`--min-seconds` (default 90) have passed: the load stays at `--uploads` concurrent uploads while
every kind of fault lands several times. `--min-seconds 0` runs exactly `--uploads` uploads.
Every finished upload is checked at once against the database and the disk (and its final file
then deleted, so a long run does not fill the disk; `--keep` keeps everything).

Meanwhile a nemesis SIGKILLs a random gunicorn worker every `--kill-every` seconds and kills -9 and
restarts the private Redis every `--redis-every` seconds, and an invariant sampler checks, every
50 ms, a few active uploads: Redis read *before* the database, so
- INV3: the Redis running total is never ahead of the committed offset;
- INV1: no client was ever acknowledged more than the committed offset, and the committed offset
  is never beyond the partial file's length;
and every client checks INV4 on what it is shown: offsets never decrease. PostgreSQL is the
machine's shared server, so it is never restarted here (RELIABILITY.md M2's "a PG restart once"
needs a private cluster).

At the end every upload must be complete with the server's SHA-256 equal to the client's, the
final file on disk must hash to the same value, and no acknowledged byte may be missing. A summary
table is printed (and written as JSON with `--json`); the exit status is 0 only when all of that
holds and no invariant was ever broken.
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.faults.writelog import overlapping_writers  # noqa: E402 (the project root is on the path first)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
BLOCK = 1 * MiB  # the data generator's unit: each block of each upload is a distinct slice of the pool
POOL_SIZE = 32 * MiB
SEND_PIECE = 64 * 1024
SAMPLE_EVERY = 0.05
SAMPLE_UPLOADS = 4
# As uploads/client.py: (connect, read). urllib3 also applies the *connect* timeout to sending the
# body, so it bounds how long a chunk may sit unread in a busy server's queue before the client
# gives up on it ("send timeout"); the stale request is still served later and must do no harm.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
SECRET_KEY = "chaos-secret-key-not-for-production-0123456789abcdef"

NO_RETRY = Retry(NoBackoff(), 0)
STOP = threading.Event()  # Ctrl-C / SIGTERM: every loop ends promptly and the finally clean-up runs


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16MiB, 4194304)")
    unit = (match.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(match.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[unit]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


# --- Data: deterministic, incompressible, regenerated for every (re)send ------------------------


class Data:
    """Upload u's block b is a 1 MiB slice of a seeded random pool at a position derived from
    (seed, u, b): distinct per block and per upload, so a duplicated, dropped, reordered or
    misdirected region changes the SHA-256. Reading costs a memoryview slice, not a PRNG run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.pool = memoryview(random.Random(seed).randbytes(POOL_SIZE))

    def block_start(self, upload: int, block: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{upload}:{block}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % (POOL_SIZE - BLOCK + 1)

    def view(self, upload: int, offset: int, limit: int) -> memoryview:
        """Bytes of the upload from `offset`, at most `limit` and never across a block boundary."""
        block, within = divmod(offset, BLOCK)
        start = self.block_start(upload, block) + within
        return self.pool[start: start + min(limit, BLOCK - within)]

    def sha256(self, upload: int, size: int) -> str:
        digest, offset = hashlib.sha256(), 0
        while offset < size:
            piece = self.view(upload, offset, size - offset)
            digest.update(piece)
            offset += len(piece)
        return digest.hexdigest()


# --- Shared counters ----------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retries: collections.Counter[str] = collections.Counter()
        self.responses: collections.Counter[str] = collections.Counter()
        self.violations: collections.Counter[str] = collections.Counter()
        self.violation_examples: list[str] = []
        self.bytes_sent = 0
        self.bytes_acked = 0
        self.events: list[str] = []
        self.traces: list[str] = []  # every failed request, written to client.log in the work dir

    def retry(self, cause: str) -> None:
        with self.lock:
            self.retries[cause] += 1

    def response(self, what: str, status: int) -> None:
        with self.lock:
            self.responses[f"{what} {status}"] += 1

    def violation(self, name: str, detail: str) -> None:
        with self.lock:
            self.violations[name] += 1
            if len(self.violation_examples) < 50:
                self.violation_examples.append(f"{name}: {detail}")
        log(f"VIOLATION {name}: {detail}")

    def trace(self, line: str) -> None:
        with self.lock:
            if len(self.traces) < 100_000:
                self.traces.append(line)

    def sent(self, n: int) -> None:
        with self.lock:
            self.bytes_sent += n

    def acked(self, n: int) -> None:
        with self.lock:
            self.bytes_acked += n

    def event(self, text: str) -> None:
        with self.lock:
            self.events.append(text)


# --- One upload, as its client sees it ----------------------------------------------------------


@dataclass(eq=False)
class Upload:
    index: int
    protocol: str  # "rest" or "tus"
    size: int
    filename: str
    id: uuid.UUID | None = None
    url: str = ""  # PUT (REST) or PATCH (tus) target
    redis_key: str = ""
    last_shown: int = 0  # the highest offset any response showed this client (INV4)
    ack_max: int = 0  # the highest offset a 2xx to a write acknowledged (INV1)
    hasher: object = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    local_sha: str = ""
    server_sha: str = ""
    status: str = "new"
    error: str = ""
    done: bool = False
    requests: int = 0
    retries: int = 0
    started: float = 0.0
    finished: float = 0.0


class Body:
    """A chunk as a file-like request body: read lazily from the generator (requests sends it with
    Content-Length and urllib3 reads it in small pieces), hashing each byte the first time it is
    sent so the client's SHA-256 is built as it goes."""

    def __init__(self, data: Data, upload: Upload, start: int, end: int, stats: Stats) -> None:
        self.data, self.upload, self.position, self.end, self.stats = data, upload, start, end, stats
        self.length = end - start

    def __len__(self) -> int:
        return self.length

    def __iter__(self):  # requests treats an iterable with a length as a stream with Content-Length
        while piece := self.read(SEND_PIECE):
            yield piece

    def read(self, size: int = -1) -> bytes:
        limit = self.end - self.position
        if size is not None and size >= 0:
            limit = min(limit, size)
        if limit <= 0:
            return b""
        view = self.data.view(self.upload.index, self.position, limit)
        upload, start = self.upload, self.position
        if start <= upload.hashed_upto < start + len(view):
            upload.hasher.update(view[upload.hashed_upto - start:])
            upload.hashed_upto = start + len(view)
        self.position += len(view)
        self.stats.sent(len(view))
        return bytes(view)


def transport_failure(exc: requests.RequestException) -> str:
    """A short name for why a request got no response: timeout, refused, reset, ..."""
    if isinstance(exc, requests.Timeout):
        return "timeout"
    text = str(exc)
    for needle, name in (
        ("Connection refused", "connection refused"), ("Connection reset", "connection reset"),
        ("Broken pipe", "broken pipe"), ("RemoteDisconnected", "closed without response"),
        ("without response", "closed without response"), ("timed out", "send timeout"),
    ):
        if needle in text:
            return name
    return "connection error" if isinstance(exc, requests.ConnectionError) else type(exc).__name__


class Failed(Exception):
    """The upload cannot go on (a 4xx that is not a retry signal, the deadline, a stop)."""


class Client:
    """Runs one upload to completion, retrying like a real resumable client."""

    def __init__(self, run: Run, upload: Upload) -> None:
        self.run, self.upload, self.stats = run, upload, run.stats
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {run.token}"
        self.timeout = (run.args.connect_timeout, run.args.read_timeout)
        self.failures_in_a_row = 0

    # Helpers ------------------------------------------------------------------------------------

    def shown(self, offset: int, what: str) -> None:
        """Any offset the server shows this client (INV4: never smaller than one shown before)."""
        upload = self.upload
        if offset < upload.last_shown:
            self.stats.violation(
                "INV4", f"upload {upload.id} ({upload.protocol}): {what} showed {offset} after {upload.last_shown}"
            )
        upload.last_shown = max(upload.last_shown, offset)

    def acked(self, offset: int, what: str) -> None:
        self.shown(offset, what)
        upload = self.upload
        if offset > upload.ack_max:
            self.stats.acked(offset - upload.ack_max)
            upload.ack_max = offset
        self.failures_in_a_row = 0

    def check_deadline(self) -> None:
        if STOP.is_set():
            raise Failed("stopped")
        if time.monotonic() > self.run.deadline:
            raise Failed(f"deadline ({self.run.args.max_seconds} s) reached at offset {self.upload.last_shown}")

    def backoff(self, cause: str) -> None:
        self.stats.retry(cause)
        self.upload.retries += 1
        self.failures_in_a_row += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures_in_a_row - 1)) * random.uniform(0.5, 1.0)
        STOP.wait(delay)
        self.check_deadline()

    def send(self, what: str, method: str, url: str, **kwargs) -> requests.Response | str:
        """One request: the response, or the cause of a transport failure as a string."""
        self.upload.requests += 1
        try:
            response = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            cause = f"{what}:{transport_failure(exc)}"
            self.stats.trace(f"{time.monotonic() - self.run.started:8.3f} {self.upload.protocol} {self.upload.id} "
                             f"{method} {what} -> {cause}: {exc}")
            return cause
        self.stats.response(f"{method} {what}", response.status_code)
        if response.status_code >= 300:
            self.stats.trace(f"{time.monotonic() - self.run.started:8.3f} {self.upload.protocol} {self.upload.id} "
                             f"{method} {what} -> {response.status_code} {response.text[:200]!r}")
        return response

    @staticmethod
    def retryable(response: requests.Response) -> bool:
        return response.status_code in (409, 423, 429) or response.status_code >= 500

    @staticmethod
    def cause(what: str, response: requests.Response) -> str:
        code = ""
        if response.status_code == 409:
            try:
                code = " " + str(response.json().get("code"))
            except ValueError:
                pass
        return f"{what}:{response.status_code}{code}"

    def fail(self, what: str, response: requests.Response) -> Failed:
        return Failed(f"{what}: HTTP {response.status_code} {response.text[:300]!r}")

    # The upload ---------------------------------------------------------------------------------

    def __call__(self) -> Upload:
        upload = self.upload
        upload.started = time.monotonic()
        try:
            self.create()
            self.run.register(upload)
            offset = upload.last_shown
            while offset < upload.size:
                self.check_deadline()
                offset = self.write(offset)
            self.verify()
        except Failed as exc:
            upload.status, upload.error = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a harness bug must show up in the report, not hang it
            upload.status, upload.error = "failed", f"client error: {type(exc).__name__}: {exc}"
        finally:
            upload.done = True
            upload.finished = time.monotonic()
            self.run.unregister(upload)
            self.session.close()
        return upload

    def create(self) -> None:
        upload, base = self.upload, self.run.base
        while True:
            self.check_deadline()
            if upload.protocol == "rest":
                response = self.send(
                    "create", "POST", f"{base}/api/uploads/", json={"filename": upload.filename, "size": upload.size}
                )
            else:
                metadata = "filename " + base64.b64encode(upload.filename.encode()).decode()
                response = self.send("create", "POST", f"{base}/files/", headers={
                    "Tus-Resumable": "1.0.0", "Upload-Length": str(upload.size), "Upload-Metadata": metadata,
                })
            if isinstance(response, str):
                self.backoff(response)
                continue
            if upload.protocol == "rest" and response.status_code in (200, 201):
                body = response.json()
                upload.id = uuid.UUID(body["id"])
                upload.url = f"{base}/api/uploads/{upload.id}/"
                upload.redis_key = f"uploads:1:progress:{self.run.owner_id}:{upload.size}:{body['filename']}"
                self.shown(int(body["offset"]), "create")
                return
            if upload.protocol == "tus" and response.status_code == 201:
                upload.id = uuid.UUID(response.headers["Location"].rstrip("/").rsplit("/", 1)[-1])
                upload.url = f"{base}/files/{upload.id}"
                upload.redis_key = f"uploads:1:progress:{self.run.owner_id}:tus:{upload.id.hex}"
                self.shown(int(response.headers["Upload-Offset"]), "create")
                return
            if self.retryable(response):
                self.backoff(self.cause("create", response))
                continue
            raise self.fail("create", response)

    def write(self, offset: int) -> int:
        """Send one chunk from `offset`; return the offset to go on from."""
        upload = self.upload
        end = min(offset + self.run.args.chunk, upload.size)
        body = Body(self.run.data, upload, offset, end, self.stats)
        if upload.protocol == "rest":
            response = self.send("chunk", "PUT", upload.url, data=body, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {offset}-{end - 1}/{upload.size}",
            })
        else:
            response = self.send("chunk", "PATCH", upload.url, data=body, headers={
                "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
            })
        if isinstance(response, str):
            self.backoff(response)
            return self.probe()
        if upload.protocol == "rest" and response.status_code == 200:
            try:
                new = int(response.json()["offset"])
            except (ValueError, KeyError, TypeError):
                self.backoff("chunk:bad response")
                return self.probe()
            self.acked(new, "PUT")
            return new
        if upload.protocol == "tus" and response.status_code == 204:
            new = int(response.headers["Upload-Offset"])
            self.acked(new, "PATCH")
            return new
        if self.retryable(response):
            if response.status_code == 409:
                shown = self.offset_in(response)
                if shown is not None:
                    self.shown(shown, f"{response.request.method} 409")
            self.backoff(self.cause("chunk", response))
            return self.probe()
        raise self.fail(f"{response.request.method} at {offset}", response)

    def offset_in(self, response: requests.Response) -> int | None:
        if self.upload.protocol == "tus":
            value = response.headers.get("Upload-Offset")
            return int(value) if value and value.isdigit() else None
        try:
            value = response.json().get("offset")
        except ValueError:
            return None
        return value if isinstance(value, int) else None

    def probe(self) -> int:
        """Ask the server where to go on from (REST GET, tus HEAD), retrying until it answers."""
        upload = self.upload
        while True:
            self.check_deadline()
            if upload.protocol == "rest":
                response = self.send("probe", "GET", upload.url)
            else:
                response = self.send("probe", "HEAD", upload.url, headers={"Tus-Resumable": "1.0.0"})
            if isinstance(response, str):
                self.backoff(response)
                continue
            if response.status_code == 200:
                if upload.protocol == "rest":
                    offset = int(response.json()["offset"])
                else:
                    offset = int(response.headers["Upload-Offset"])
                self.shown(offset, "GET" if upload.protocol == "rest" else "HEAD")
                return offset
            if self.retryable(response):
                self.backoff(self.cause("probe", response))
                continue
            raise self.fail("probe", response)

    def verify(self) -> None:
        """The server's record once every byte is in: complete, the right size and SHA-256."""
        upload = self.upload
        while True:
            self.check_deadline()
            response = self.send("verify", "GET", f"{self.run.base}/api/uploads/{upload.id}/")
            if isinstance(response, str):
                self.backoff(response)
                continue
            if self.retryable(response):
                self.backoff(self.cause("verify", response))
                continue
            if response.status_code != 200:
                raise self.fail("verify", response)
            body = response.json()
            self.shown(int(body["offset"]), "verify GET")
            break
        if upload.hashed_upto < upload.size:  # cannot happen (the server only has what we sent), but be safe
            offset = upload.hashed_upto
            while offset < upload.size:
                piece = self.run.data.view(upload.index, offset, upload.size - offset)
                upload.hasher.update(piece)
                offset += len(piece)
        upload.local_sha = upload.hasher.hexdigest()
        upload.server_sha = body.get("sha256") or ""
        upload.status = body["status"]
        if body["status"] != "complete" or body["offset"] != upload.size or body["size"] != upload.size:
            raise Failed(f"not complete after its last byte: {body}")
        if upload.server_sha != upload.local_sha:
            raise Failed(f"server sha256 {upload.server_sha} != client sha256 {upload.local_sha}")


# --- The processes ------------------------------------------------------------------------------


class RedisServer:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.work = work
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        log_file = open(self.work / "redis.log", "ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.work)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=NO_RETRY)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, down_for: float) -> None:
        self.kill()
        STOP.wait(down_for)
        self.start()
        self.restarts += 1


class Gunicorn:
    def __init__(self, work: Path, env: dict, port: int) -> None:
        self.work, self.env, self.port = work, env, port
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self, workers: int) -> None:
        log_file = open(self.work / "gunicorn.log", "ab")
        self.process = subprocess.Popen(
            # No control socket: its default path (~/.gunicorn/gunicorn.ctl) is shared by every
            # gunicorn of this user, and other servers may be running on the machine.
            [sys.executable, "-m", "gunicorn", "-c", "project/gunicorn.py", "--no-control-socket",
             "--access-logfile", str(self.work / "access.log"), "project.wsgi"],
            cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()
        self.wait_ready(workers, 60)

    def wait_ready(self, workers: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{(self.work / 'gunicorn.log').read_text()[-3000:]}")
            try:
                ok = requests.options(f"http://127.0.0.1:{self.port}/files/", timeout=2).status_code == 204
            except requests.RequestException:
                ok = False
            if ok and len(children(self.process.pid)) >= workers:
                return True
            time.sleep(0.1)
        return False

    def workers(self) -> list[int]:
        return children(self.process.pid) if self.process and self.process.poll() is None else []

    def kill_random_worker(self) -> int | None:
        pids = self.workers()
        if not pids:
            return None
        pid = random.choice(pids)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.kills += 1
        return pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# --- The run ------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats()
        self.data = Data(args.seed)
        self.active: dict[uuid.UUID, Upload] = {}
        self.active_lock = threading.Lock()
        self.deadline = 0.0
        self.base = ""
        self.token = ""
        self.owner_id = 0
        self.db_name = f"chaos_{os.getpid()}"
        self.admin_conninfo = f"host={args.pg_host} port={args.pg_port} user={args.pg_user} dbname=postgres"
        self.conninfo = f"host={args.pg_host} port={args.pg_port} user={args.pg_user} dbname={self.db_name}"
        self.samples = collections.Counter()
        self.pg_connections_peak = 0
        self.started = 0.0
        self.uploads: list[Upload] = []  # every upload started, in order
        self.results: dict[int, dict] = {}  # upload index -> check_upload()
        self.verify_queue: queue.Queue[Upload | None] = queue.Queue()

    def slot(self, number: int) -> None:
        """One of the --uploads concurrent clients: REST on even slots, tus on odd ones. It starts
        another upload when one finishes until --min-seconds have passed (at least one each)."""
        while True:
            with self.active_lock:
                upload = Upload(
                    index=len(self.uploads), protocol="rest" if number % 2 == 0 else "tus",
                    size=self.args.size, filename=f"chaos-{len(self.uploads):05d}.bin",
                )
                self.uploads.append(upload)
            Client(self, upload)()
            self.verify_queue.put(upload)
            elapsed = time.monotonic() - self.started
            if STOP.is_set() or elapsed >= self.args.min_seconds or time.monotonic() >= self.deadline:
                return

    def verifier(self, media: Path) -> None:
        """Checks each finished upload against the database and the disk as soon as it is done."""
        with psycopg.connect(self.conninfo, autocommit=True) as db:
            while (upload := self.verify_queue.get()) is not None:
                self.results[upload.index] = check_upload(self, db, upload, media)

    def register(self, upload: Upload) -> None:
        with self.active_lock:
            self.active[upload.id] = upload

    def unregister(self, upload: Upload) -> None:
        with self.active_lock:
            self.active.pop(upload.id, None)

    # Threads beside the clients ---------------------------------------------------------------------

    def nemesis(self, server: Gunicorn, redis_server: RedisServer, done: threading.Event) -> None:
        start = time.monotonic()
        next_kill = start + self.args.kill_every if self.args.kill_every > 0 else float("inf")
        next_redis = start + self.args.redis_every if self.args.redis_every > 0 else float("inf")
        while not done.is_set() and not STOP.is_set():
            now = time.monotonic()
            if now >= next_kill:
                pid = server.kill_random_worker()
                self.stats.event(f"{now - start:7.1f}s SIGKILL worker {pid}")
                next_kill += self.args.kill_every
            if now >= next_redis:
                try:
                    redis_server.restart(self.args.redis_down)
                    self.stats.event(f"{now - start:7.1f}s Redis kill -9 + restart")
                except RuntimeError as exc:
                    self.stats.event(f"{now - start:7.1f}s Redis restart FAILED: {exc}")
                    log(f"Redis restart failed: {exc}")
                next_redis += self.args.redis_every
            done.wait(max(0.01, min(next_kill, next_redis) - time.monotonic()))

    def sampler(self, redis_port: int, media: Path, done: threading.Event) -> None:
        """INV3 (Redis read before the database, Redis <= DB) and INV1 (client ack <= DB <= file)."""
        # No retries: a read during a restart must fail at once, not land seconds later.
        cache = redis.Redis(port=redis_port, db=1, socket_timeout=0.2, socket_connect_timeout=0.2, retry=NO_RETRY)
        partial = media / "partial"
        while not done.is_set() and not STOP.is_set():
            try:
                self._sample(cache, partial, done)
            except psycopg.Error as exc:  # never expected (PostgreSQL is not a target here): say so, go on
                self.samples["sampler database errors"] += 1
                log(f"sampler: database error {exc}")
                done.wait(1)

    def _sample(self, cache: redis.Redis, partial: Path, done: threading.Event) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as db:
            last_conn_count = 0.0
            while not done.wait(SAMPLE_EVERY) and not STOP.is_set():
                with self.active_lock:
                    picked = random.sample(list(self.active.values()), min(SAMPLE_UPLOADS, len(self.active)))
                now = time.monotonic()
                if now - last_conn_count >= 1.0:
                    last_conn_count = now
                    count = db.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.db_name]
                    ).fetchone()[0]
                    self.pg_connections_peak = max(self.pg_connections_peak, count)
                if not picked:
                    continue
                acks = [u.ack_max for u in picked]  # 1. what clients were told (before the DB)
                try:  # 2. Redis, before the database
                    cached = cache.mget([u.redis_key for u in picked])
                    redis_ok = True
                except redis.RedisError:
                    cached, redis_ok = [None] * len(picked), False
                    self.samples["redis unreachable"] += 1
                rows = {  # 3. the database
                    row[0]: row[1:]
                    for row in db.execute(
                        'SELECT id, "offset", status FROM uploads_uploadsession WHERE id = ANY(%s)',
                        [[u.id for u in picked]],
                    ).fetchall()
                }
                for upload, ack, value in zip(picked, acks, cached):
                    if upload.id not in rows:
                        self.stats.violation("INV1", f"upload {upload.id} has no row")
                        continue
                    db_offset, status = rows[upload.id]
                    self.samples["uploads sampled"] += 1
                    if redis_ok:
                        self.samples["INV3 checks"] += 1
                        if value is not None:
                            self.samples["INV3 checks with a Redis value"] += 1
                            if int(value) > db_offset:
                                self.stats.violation(
                                    "INV3", f"upload {upload.id}: Redis {int(value)} > DB offset {db_offset}")
                    if ack > db_offset:
                        self.stats.violation("INV1", f"upload {upload.id}: client acked {ack} > DB offset {db_offset}")
                    if status == "partial":  # 4. the file (a writer only truncates down to the newer DB offset)
                        try:
                            length = os.stat(partial / f"{upload.id.hex}.part").st_size
                        except FileNotFoundError:
                            continue  # finalized (renamed) since the read
                        self.samples["file checks"] += 1
                        if length < db_offset:
                            self.stats.violation(
                                "INV1", f"upload {upload.id}: DB offset {db_offset} > partial file length {length}")

    def reporter(self, server: Gunicorn, redis_server: RedisServer, done: threading.Event) -> None:
        start = time.monotonic()
        while not done.wait(15) and not STOP.is_set():
            with self.active_lock:
                uploads, active = list(self.uploads), list(self.active)
            complete = sum(1 for u in uploads if u.done and u.status == "complete")
            failed = sum(1 for u in uploads if u.done and u.status != "complete")
            with self.stats.lock:
                acked, sent, retries = self.stats.bytes_acked, self.stats.bytes_sent, sum(self.stats.retries.values())
            log(f"{time.monotonic() - start:6.0f}s: {complete} complete, {failed} failed, {len(active)} active, "
                f"{acked / MiB:.0f} MiB acked, {sent / MiB:.0f} MiB sent, {retries} retries, "
                f"{server.kills} worker kills, {redis_server.restarts} Redis restarts, "
                f"violations {dict(self.stats.violations) or 0}")


def pg_connection_budget(run: Run) -> tuple[int, int, int]:
    with psycopg.connect(run.admin_conninfo, autocommit=True) as db:
        max_conn = int(db.execute("SHOW max_connections").fetchone()[0])
        reserved = int(db.execute("SHOW superuser_reserved_connections").fetchone()[0])
        used = db.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
    return max_conn, reserved, used


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def check_upload(run: Run, db: psycopg.Connection, upload: Upload, media: Path) -> dict:
    """One finished upload, from the database and the disk: complete, the right size, the right bytes
    (the final file re-hashed cold), no partial left, no acknowledged byte missing."""
    result = {"disk_sha_ok": False, "lost": upload.ack_max, "corrupt": False, "problem": ""}
    expected = run.data.sha256(upload.index, upload.size)  # regenerated: checks the client's own hash too
    if upload.local_sha and upload.local_sha != expected:
        result["problem"] = f"client hash {upload.local_sha} != regenerated {expected} (harness bug)"
    row = None
    if upload.id is not None:
        row = db.execute(
            'SELECT status, "offset", size, file, sha256 FROM uploads_uploadsession WHERE id = %s', [upload.id]
        ).fetchone()
    if row is None:
        result["problem"] = result["problem"] or "no row"
        return result
    status, offset, size, name, sha = row
    partial = media / "partial" / f"{upload.id.hex}.part"
    if status == "complete":
        path = media / name
        if not path.is_file():
            result.update(corrupt=True, problem=f"complete but {path} is missing")
            return result
        disk = sha256_file(path)
        length = path.stat().st_size
        result["lost"] = max(0, upload.ack_max - length)
        if disk != expected or sha != expected or length != upload.size or offset != upload.size:
            result.update(corrupt=True, problem=f"disk sha {disk}, row sha {sha}, expected {expected}, "
                          f"length {length}, offset {offset}/{size}")
        elif not result["problem"]:
            result["disk_sha_ok"] = True
        if partial.exists():
            result["disk_sha_ok"] = False
            result["problem"] = result["problem"] or "complete, but its partial file is still there"
        if result["disk_sha_ok"] and not run.args.keep:
            path.unlink()  # verified: free the disk (a long run writes many GiB)
    else:
        try:
            length = partial.stat().st_size
        except FileNotFoundError:
            length = 0
        result["lost"] = max(0, upload.ack_max - min(offset, length))
        result["problem"] = f"status {status}, offset {offset}/{size}, partial file {length} bytes"
    return result


def final_check(run: Run, uploads: list[Upload], media: Path) -> dict:
    """What is left once every client has finished: rows nobody owns, partial files, lock waiters."""
    with psycopg.connect(run.conninfo, autocommit=True) as db:
        rows = dict(db.execute('SELECT id, "offset" FROM uploads_uploadsession').fetchall())
        waiting = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", [run.db_name]
        ).fetchone()[0]
    partial_dir = media / "partial"
    partials = {p.name for p in partial_dir.glob("*.part")} if partial_dir.exists() else set()
    ours = {u.id for u in uploads if u.id}
    orphans = [offset for upload_id, offset in rows.items() if upload_id not in ours]
    return {
        "orphan_rows": len(orphans),
        "orphan_rows_with_bytes": sum(1 for offset in orphans if offset > 0),
        "leftover_partials_of_ours": sum(
            1 for u in uploads if u.id and u.status == "complete" and f"{u.id.hex}.part" in partials
        ),
        "pg_lock_waiters_at_end": waiting,
    }


def count_access_statuses(path: Path) -> dict:
    statuses: collections.Counter[str] = collections.Counter()
    pattern = re.compile(r'"(\w+) [^"]*" (\d{3}) ')
    if path.exists():
        with open(path, errors="replace") as handle:
            for line in handle:
                match = pattern.search(line)
                if match:
                    statuses[f"{match.group(1)} {match.group(2)}"] += 1
    return dict(sorted(statuses.items()))


def server_log_problems(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "worker_sigkill_lines": text.count("was sent SIGKILL"),
        "worker_timeouts": text.count("WORKER TIMEOUT"),
        "redis_warnings": len(re.findall(r"Redis \w+ failed", text)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=200, help="concurrent uploads, half REST, half tus")
    parser.add_argument("--min-seconds", type=float, default=90.0,
                        help="keep every client starting new uploads until this long has passed, so the faults "
                             "land under load (0: exactly --uploads uploads)")
    parser.add_argument("--size", type=parse_size, default=16 * MiB, help="bytes per upload (16MiB)")
    parser.add_argument("--chunk", type=parse_size, default=4 * MiB, help="bytes per PUT/PATCH (4MiB)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=16, help="gthread threads per worker")
    parser.add_argument("--kill-every", type=float, default=10.0, help="SIGKILL a random worker every N s (0: never)")
    parser.add_argument("--redis-every", type=float, default=30.0,
                        help="kill -9 and restart Redis every N s (0: never)")
    parser.add_argument("--redis-down", type=float, default=1.0, help="seconds Redis stays down at each restart")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="give up on uploads after this long")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                        help="client connect timeout, which urllib3 also applies to sending a body (30)")
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, help="client read timeout (120)")
    parser.add_argument("--conn-max-age", type=int, default=60, help="CONN_MAX_AGE for the server")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--json", type=Path, help="also write the summary here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, media) afterwards")
    parser.add_argument("--logs", type=Path,
                        help="copy gunicorn.log, access.log, redis.log and client.log (failed requests) here")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5432)
    parser.add_argument("--pg-user", default="postgres")
    args = parser.parse_args()
    if args.min_seconds >= args.max_seconds:
        parser.error("--min-seconds must be below --max-seconds")
    if args.uploads < 1 or args.size < 1 or args.chunk < 1 or args.workers < 1 or args.threads < 1:
        parser.error("--uploads, --size, --chunk, --workers and --threads must be positive")

    def on_signal(signum, frame):
        STOP.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    run = Run(args)
    work = Path(tempfile.mkdtemp(prefix="chaos-", dir=os.environ.get("CHAOS_TMP")))
    media = work / "media"
    media.mkdir()
    needed = args.uploads * args.size + 512 * MiB
    free = shutil.disk_usage(work).free
    if free < needed:
        log(f"not enough disk in {work}: {free / MiB:.0f} MiB free, {needed / MiB:.0f} MiB needed")
        shutil.rmtree(work, ignore_errors=True)
        return 2

    # PostgreSQL connections: every gthread thread may hold one; stay well inside max_connections.
    max_conn, reserved, used = pg_connection_budget(run)
    budget = max_conn - reserved - used - 15  # headroom for the sampler, migrate and other work on the server
    threads = args.threads
    if args.workers * threads > budget:
        threads = max(1, budget // args.workers)
        log(f"PostgreSQL max_connections={max_conn} ({used} in use): {args.workers} x {args.threads} threads "
            f"could exhaust it; using {threads} threads per worker")
    # A killed worker's connections close with it, but the respawned one opens its own at once.

    redis_server = RedisServer(work)
    server: Gunicorn | None = None
    db_created = False
    summary: dict = {}
    ok = False
    try:
        with psycopg.connect(run.admin_conninfo, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{run.db_name}"')
        db_created = True
        redis_server.start()
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{args.pg_user}@{args.pg_host}:{args.pg_port}/{run.db_name}",
            "CONN_MAX_AGE": str(args.conn_max_age),
            "REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0",
            "UPLOADS_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/1",
            "MEDIA_ROOT": str(media),
            "SECRET_KEY": SECRET_KEY,
            "DEBUG": "0",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": str(args.workers),
            "GUNICORN_THREADS": str(threads),
            "UPLOADS_MAX_ACTIVE_PER_USER": "0",
            "UPLOADS_MAX_RESERVED_PER_USER": "0",
            "UPLOADS_MAX_SIZE": str(max(args.size, 1)),
            # The hooks for the write log only (INV7); no crash point: the nemesis does the killing.
            "UPLOADS_TEST_HOOKS": "1",
            "UPLOADS_CRASH_POINT": "",
            "UPLOADS_WRITE_LOG": str(work / "writes.log"),
        }
        env.pop("GUNICORN_CMD_ARGS", None)
        log(f"database {run.db_name}, Redis :{redis_server.port}, MEDIA_ROOT {media}")
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        out = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c",
             "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token;"
             "u,_=User.objects.get_or_create(username='chaos');"
             "print(u.id, Token.objects.get_or_create(user=u)[0].key)"],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        owner_id, run.token = out.split()
        run.owner_id = int(owner_id)
        server = Gunicorn(work, env, port)
        server.start(args.workers)
        run.base = f"http://127.0.0.1:{port}"
        log(f"gunicorn :{port}, {args.workers} workers x {threads} threads; "
            f"{args.uploads} concurrent uploads of {args.size / MiB:g} MiB in {args.chunk / MiB:g} MiB chunks "
            f"for at least {args.min_seconds:g} s; "
            f"worker SIGKILL every {args.kill_every:g} s, Redis restart every {args.redis_every:g} s")

        done = threading.Event()
        helpers = [
            threading.Thread(target=run.nemesis, args=(server, redis_server, done), name="nemesis", daemon=True),
            threading.Thread(target=run.sampler, args=(redis_server.port, media, done), name="sampler", daemon=True),
            threading.Thread(target=run.reporter, args=(server, redis_server, done), name="reporter", daemon=True),
        ]
        verifier = threading.Thread(target=run.verifier, args=(media,), name="verifier", daemon=True)
        run.started = started = time.monotonic()
        run.deadline = started + args.max_seconds
        for thread in [*helpers, verifier]:
            thread.start()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.uploads, thread_name_prefix="client")
        futures = [pool.submit(run.slot, number) for number in range(args.uploads)]
        concurrent.futures.wait(futures, timeout=args.max_seconds + args.connect_timeout + args.read_timeout + 60)
        uploads = list(run.uploads)
        finished = max((u.finished for u in uploads if u.done), default=time.monotonic())
        wall = finished - started
        done.set()
        for thread in helpers:
            thread.join(timeout=30)
        stuck = [u for u in uploads if not u.done]
        if stuck:
            STOP.set()
            for upload in stuck:
                upload.status, upload.error = "failed", "client still running after the deadline"
        pool.shutdown(wait=False, cancel_futures=True)
        run.verify_queue.put(None)
        verifier.join()

        # Quiet now: let gunicorn respawn what the last kill took, then look at what is left.
        server.wait_ready(args.workers, 30)
        log(f"all clients finished; {len(run.results)} uploads checked against the database and the disk")
        check = final_check(run, uploads, media)
        missing = {"disk_sha_ok": False, "lost": 0, "corrupt": False, "problem": "never verified"}
        results = [run.results.get(u.index, missing) for u in uploads]
        completed = [u for u, r in zip(uploads, results) if u.status == "complete" and r["disk_sha_ok"]]
        failed = [u for u, r in zip(uploads, results) if not (u.status == "complete" and r["disk_sha_ok"])]
        bytes_ok = sum(u.size for u in completed)
        writers_checked, overlaps = overlapping_writers(work / "writes.log")
        for overlap in overlaps:
            run.stats.violation("INV7", overlap)
        violations = {name: run.stats.violations.get(name, 0) for name in ("INV1", "INV3", "INV4", "INV7")}
        summary = {
            "config": {
                "concurrent": args.uploads, "min_seconds": args.min_seconds, "uploads": len(uploads),
                "rest": sum(u.protocol == "rest" for u in uploads), "tus": sum(u.protocol == "tus" for u in uploads),
                "size": args.size, "chunk": args.chunk,
                "workers": args.workers, "threads": threads, "kill_every": args.kill_every,
                "redis_every": args.redis_every, "redis_down": args.redis_down, "max_seconds": args.max_seconds,
                "conn_max_age": args.conn_max_age, "client_timeouts": [args.connect_timeout, args.read_timeout],
                "pg_max_connections": max_conn, "cpus": os.cpu_count(),
            },
            "uploads_ok": len(completed),
            "uploads_failed": len(failed),
            "rest_ok": sum(u.protocol == "rest" for u in completed),
            "tus_ok": sum(u.protocol == "tus" for u in completed),
            "failures": [
                {"upload": u.index, "id": str(u.id), "protocol": u.protocol, "error": u.error or r["problem"]}
                for u, r in zip(uploads, results) if u in failed
            ][:50],
            "bytes_ok": bytes_ok,
            "bytes_sent": run.stats.bytes_sent,
            "resent_ratio": round(run.stats.bytes_sent / max(1, sum(u.ack_max for u in uploads)) - 1, 4),
            "wall_seconds": round(wall, 2),
            "mb_per_s": round(bytes_ok / wall / 1e6, 1) if wall > 0 else 0.0,
            "upload_seconds_p50": round(sorted(u.finished - u.started for u in uploads)[len(uploads) // 2], 2),
            "upload_seconds_max": round(max(u.finished - u.started for u in uploads), 2),
            "worker_kills": server.kills,
            "redis_restarts": redis_server.restarts,
            "nemesis_events": run.stats.events,
            "client_requests": sum(u.requests for u in uploads),
            "client_retries": sum(run.stats.retries.values()),
            "client_retries_by_cause": dict(sorted(run.stats.retries.items())),
            "client_responses": dict(sorted(run.stats.responses.items())),
            "server_responses": count_access_statuses(work / "access.log"),
            "server_log": server_log_problems(work / "gunicorn.log"),
            "invariant_samples": dict(run.samples),
            "writers_checked": writers_checked,
            "violations": violations,
            "violation_examples": run.stats.violation_examples,
            "bytes_lost": sum(r["lost"] for r in results),
            "corrupt_files": sum(1 for r in results if r["corrupt"]),
            "disk_sha_verified": sum(1 for r in results if r["disk_sha_ok"]),
            "pg_connections_peak": run.pg_connections_peak,
            **check,
        }
        problems = []
        if failed:
            problems.append(f"{len(failed)} uploads failed")
        if any(violations.values()):
            problems.append(f"invariant violations {violations}")
        if summary["bytes_lost"] or summary["corrupt_files"]:
            problems.append(f"{summary['bytes_lost']} bytes lost, {summary['corrupt_files']} corrupt files")
        if summary["leftover_partials_of_ours"]:
            problems.append(f"{summary['leftover_partials_of_ours']} partial files left behind")
        if run.samples["uploads sampled"] > 100 and not run.samples["INV3 checks with a Redis value"]:
            problems.append("the sampler never saw a Redis value: INV3 was not really checked (key scheme?)")
        summary["problems"] = problems
        summary["ok"] = ok = not problems
        print_summary(summary)
    except KeyboardInterrupt:
        STOP.set()
        log("interrupted")
    finally:
        STOP.set()
        if server is not None:
            server.stop()
        redis_server.kill()
        if db_created:
            try:
                with psycopg.connect(run.admin_conninfo, autocommit=True) as db:
                    db.execute(f'DROP DATABASE IF EXISTS "{run.db_name}" WITH (FORCE)')
            except psycopg.Error as exc:
                log(f"could not drop database {run.db_name}: {exc}")
        if args.json and summary:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
            log(f"summary written to {args.json}")
        (work / "client.log").write_text("\n".join(run.stats.traces) + "\n")
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for name in ("gunicorn.log", "access.log", "redis.log", "client.log"):
                if (work / name).exists():
                    shutil.copy(work / name, args.logs / name)
            log(f"logs copied to {args.logs}")
        if args.keep:
            log(f"kept {work}")
        elif ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(media, ignore_errors=True)
            log(f"logs kept in {work} (gunicorn.log, access.log, redis.log, client.log)")
    return 0 if ok else 1


def print_summary(s: dict) -> None:
    c = s["config"]
    rows = [
        ("configuration", f"{c['concurrent']} concurrent clients (half REST, half tus), "
                          f"new uploads until {c['min_seconds']:g} s; {c['size'] / MiB:g} MiB each in "
                          f"{c['chunk'] / MiB:g} MiB chunks; gunicorn {c['workers']} x {c['threads']} threads; "
                          f"PostgreSQL + Redis; {c['cpus']} CPUs"),
        ("uploads", f"{c['uploads']} ({c['rest']} REST, {c['tus']} tus)"),
        ("uploads ok / failed", f"{s['uploads_ok']} / {s['uploads_failed']}  (REST {s['rest_ok']}, tus {s['tus_ok']})"),
        ("bytes", f"{s['bytes_ok']:,} verified ({s['bytes_ok'] / MiB:,.0f} MiB); {s['bytes_sent']:,} sent "
                  f"({100 * s['resent_ratio']:+.1f} % resent)"),
        ("wall time", f"{s['wall_seconds']:.1f} s (per upload: median {s['upload_seconds_p50']:.1f} s, "
                      f"max {s['upload_seconds_max']:.1f} s)"),
        ("throughput", f"{s['mb_per_s']:.1f} MB/s aggregate"),
        ("faults injected", f"{s['worker_kills']} worker SIGKILLs (every {c['kill_every']:g} s), "
                            f"{s['redis_restarts']} Redis kill -9 + restarts (every {c['redis_every']:g} s)"),
        ("client requests / retries", f"{s['client_requests']} / {s['client_retries']}"),
    ]
    rows += [(f"  retry: {cause}", str(n)) for cause, n in s["client_retries_by_cause"].items()]
    five = {k: v for k, v in s["server_responses"].items() if k.split()[-1].startswith("5")}
    rows += [
        ("server 5xx (access log)", ", ".join(f"{k}: {v}" for k, v in five.items()) or "0"),
        ("server log", ", ".join(f"{k} {v}" for k, v in s["server_log"].items())),
        ("invariant samples", ", ".join(f"{k} {v}" for k, v in s["invariant_samples"].items()) or "0"),
        ("INV3 violations (Redis > DB)", str(s["violations"]["INV3"])),
        ("INV4 violations (offset went back)", str(s["violations"]["INV4"])),
        ("INV1 violations (ack > DB > file)", str(s["violations"]["INV1"])),
        ("INV7 violations (two writers at once)", f"{s['violations']['INV7']} in {s['writers_checked']} writers"),
        ("bytes lost", str(s["bytes_lost"])),
        ("corrupt files", str(s["corrupt_files"])),
        ("final files re-hashed on disk", f"{s['disk_sha_verified']} match"),
        ("orphan rows (tus creates retried)", f"{s['orphan_rows']} ({s['orphan_rows_with_bytes']} with bytes)"),
        ("partials left (of our uploads)", str(s["leftover_partials_of_ours"])),
        ("PostgreSQL connections", f"peak {s['pg_connections_peak']} (max_connections {c['pg_max_connections']}), "
                                   f"lock waiters at end {s['pg_lock_waiters_at_end']}"),
        ("result", "OK" if s["ok"] else "FAILED: " + "; ".join(s["problems"])),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for failure in s["failures"][:10]:
        print(f"  failed: #{failure['upload']} {failure['protocol']} {failure['id']}: {failure['error']}")
    for example in s["violation_examples"][:10]:
        print(f"  violation: {example}")
    print()


if __name__ == "__main__":
    sys.exit(main())
