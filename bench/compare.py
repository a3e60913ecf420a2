#!/usr/bin/env python
"""This project side by side with the disk's limit and @tus/server: one client, the same bytes, one run.

    make bench                                   # = .venv/bin/python bench/compare.py $(BENCH_ARGS)
    .venv/bin/python bench/compare.py --quick    # a short smoke run (small sizes, one run, no 4 GiB)
    .venv/bin/python bench/compare.py --runs 3 --workloads seq8m,small64k --servers raw,tus-node,project-tus \
        --json bench/out/compare.json

Servers (all on 127.0.0.1, each storing into its own folder of one temporary directory, so on one
file system):
- raw, raw-fsync: a minimal threaded HTTP server in this file (`--serve-raw PORT DIR [--fsync]`)
  speaking just enough tus (POST creates an empty file, PATCH/PUT writes the body at the offset in
  64 KiB reads and writes (`--raw-block`; why not 1 MiB: see RAW_BLOCK), HEAD answers the file's
  size, DELETE removes it); raw-fsync fsyncs before replying. The disk's limit, as a server.
- tus-node: @tus/server + @tus/file-store (exact versions in bench/tus_node/package-lock.json),
  installed with `npm ci` into ~/.cache/resumable-uploads/bench-tus-node/ and run as
  `node server.mjs PORT DIR`. No fsync (the file store never calls it).
- project-tus, project-rest: this project under gunicorn with project/gunicorn.py (gthread as
  project/gunicorn_worker.py subclasses it, `--workers` x `--threads`), access log off, DEBUG=0,
  a fresh PostgreSQL database `bench_<pid>` (dropped at the end), Redis databases 12/13 with a
  per-run key prefix (its keys deleted at the end), UPLOADS_FSYNC=1 (`--project-env KEY=VALUE`
  adds or overrides a variable, e.g. to try UPLOADS_BLOCK_SIZE). One gunicorn serves both: tus
  (POST /files/, PATCH) and REST (POST /api/uploads/, PUT with Content-Range), with
  `Authorization: Token`.
- project-tus-nofsync: a second gunicorn with UPLOADS_FSYNC=0, for the 64 KiB workload only.
- project-tus-base: only with `--baseline DIR`: the project's tus endpoint served from another
  checkout (e.g. `git worktree add /tmp/base main`), with its own project/gunicorn.py and the
  same settings and database, to A/B a change within one run (the two trees must share the
  database schema). The JSON summary then also has every server's paired ratio to it
  (`x_project-tus-base`).
- project-tus-base-nofsync: the same with UPLOADS_FSYNC=0, for the 64 KiB workload only (paired with
  project-tus-nofsync: `x_project-tus-base-nofsync`).
- floor, floor-nofsync: bench/floor.py, a bare WSGI app doing the per-chunk work the project's
  design fixes (one PostgreSQL round trip to authenticate, lock and read; write and hash; fsync,
  or not; one to commit and unlock; a Redis SET) under the project's gunicorn config, in the
  project's database. For the 64 KiB chunks and the look-ups only: what bounds the
  project there without Django, DRF and its own checks.

Workloads (sizes with --quick in brackets):
- seq8m (a): 1 GiB [64 MiB] in 8 MiB chunks, one upload, one kept-alive connection.
- small64k (b): 64 MiB [8 MiB] in 64 KiB chunks: requests/s and per-request latency.
- single (c): one 1 GiB [64 MiB] PATCH/PUT, sampling the server's RSS.
- concurrent (d): 8 clients x 128 MiB [16 MiB] at once, 8 MiB chunks, a connection each.
- lookup (e): 2,000 [200] offset look-ups on one kept-alive connection (tus HEAD, REST GET).
- finalize4g (f): 4 GiB in 8 MiB chunks, project only (skipped by --quick, `--big-gib 0`, or when
  less than 3x the size is free on the disk).

Figures (per run; the table shows the median over runs and paired ratios):
- MB/s = bytes / seconds / 1e6, timed from the first byte of the first chunk to the end of the last
  response (creating the upload and checking it afterwards are outside the timing).
- req/s, p50/p99 ms: per request, from sending its first header byte to reading its response.
- CPU s/GB: utime + stime of the server's process tree (/proc/<pid>/stat of the root and every
  descendant, plus reaped children) during the timed window, per 1e9 bytes; /proc counts in 10 ms
  ticks, so tiny windows (--quick) are coarse. For the project, PG CPU s/GB is the same for the
  PostgreSQL backends of the bench database (the postmaster's children whose process title names it,
  sampled every 100 ms so that one closing during the window still counts). Redis (shared) is not
  measured.
- RSS +MiB: the largest growth of any server process's VmRSS (sampled every 10 ms) over its value
  just before the timed window; "peak worker RSS growth while receiving one 1 GiB request" in single.
- finalize s: the LAST chunk's latency minus the median latency of the other chunks (all 8 MiB), i.e.
  what completing the upload adds to its last request. At 1 GiB it comes from seq8m, at 4 GiB from
  finalize4g. If the project ever completes asynchronously, `complete after s` is how long after the
  last response the API first said `complete` (polled, outside the timing).
- Ratios: each server's figure / raw's (and raw-fsync's, tus-node's) figure from the same run
  index, then the median of those ratios. Higher is better for MB/s and req/s, lower for the rest.

Method: servers start once and are warmed up; each (workload, run) visits every server, the order
rotating run by run; before each disk-writing run the script runs `sync` and pauses (`--pause`),
because this VM hands freed page cache back to the host within seconds (a write right after a delete
is "warm"). Each run's uploads are deleted after it. The client reuses one random 8 MiB block; after
every upload the server must report it complete (project: status `complete` and the SHA-256 it
recorded equal to the client's; others: the offset equals the size). Every socket has a timeout,
every run a deadline, the whole bench `--max-minutes`; all servers are started in their own process
groups and killed in `finally`. The client shares the machine's cores with the servers (2 on the
machine this was written for), and other work may run at the same time: load averages are recorded.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
BLOCK_SIZE = 8 * MiB  # the client's one random block
# The raw server's read/write block. 64 KiB, not 1 MiB: on this VM a write() from a buffer that fits in the
# CPU's L2 cache runs at ~5 GB/s into the page cache, one from a 1 MiB buffer at ~0.6 GB/s (measured).
RAW_BLOCK = 64 * KiB
CLK_TCK = os.sysconf("SC_CLK_TCK")
TUS_NODE_SOURCE = ROOT / "bench" / "tus_node"
TUS_NODE_CACHE = Path.home() / ".cache" / "resumable-uploads" / "bench-tus-node"
TUS_NODE_FILES = ("package.json", "package-lock.json", "server.mjs")
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
SECRET_KEY = "bench-compare-secret-key-not-for-production-0123456789abcdef"
SERVER_NAMES = ("raw", "raw-fsync", "tus-node", "project-tus", "project-rest", "project-tus-nofsync",
                "project-tus-base", "project-tus-base-nofsync", "floor", "floor-nofsync")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run that did not go as it must (wrong status, wrong offset, deadline): recorded, not fatal."""


# --------------------------------------------------------------------------------------------------
# The raw server (a subprocess of this script)
# --------------------------------------------------------------------------------------------------

class RawHandler(BaseHTTPRequestHandler):
    """Just enough tus to be driven by the same client: the disk's limit, as an HTTP server."""

    protocol_version = "HTTP/1.1"
    timeout = 120  # per socket operation: a stalled client cannot hold a thread forever
    directory: Path = Path(".")
    fsync = False
    block = RAW_BLOCK

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def _file(self) -> Path | None:
        name = self.path.split("?")[0].removeprefix("/files/")
        return self.directory / name if name.isalnum() else None

    def _reply(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        name = uuid.uuid4().hex
        (self.directory / name).touch()
        self._reply(201, {"Location": f"http://{self.headers.get('Host')}/files/{name}", "Upload-Offset": "0"})

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None or not path.exists():
            self._reply(404)
            return
        self._reply(200, {"Upload-Offset": str(path.stat().st_size), "Cache-Control": "no-store"})

    def do_PATCH(self) -> None:
        self._write(int(self.headers.get("Upload-Offset", "-1")))

    def do_PUT(self) -> None:
        # Content-Range: bytes START-END/SIZE
        self._write(int(self.headers.get("Content-Range", "bytes -1-").split()[1].split("-")[0]))

    def do_DELETE(self) -> None:
        path = self._file()
        if path is not None:
            path.unlink(missing_ok=True)
        self._reply(204)

    def _write(self, offset: int) -> None:
        path = self._file()
        length = int(self.headers.get("Content-Length", "0"))
        if path is None or not path.exists():
            self._reply(404)
            self.close_connection = True
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            if offset != os.fstat(fd).st_size:
                self._reply(409, {"Upload-Offset": str(os.fstat(fd).st_size)})
                self.close_connection = True
                return
            position = self._stream(fd, offset, length)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._reply(204, {"Upload-Offset": str(position)})

    def _stream(self, fd: int, offset: int, length: int) -> int:
        view = memoryview(bytearray(self.block))
        position, end = offset, offset + length
        while position < end:
            got = self.rfile.readinto(view[: min(self.block, end - position)])
            if not got:
                raise ConnectionError("body ended early")
            done = 0
            while done < got:
                done += os.pwrite(fd, view[done:got], position + done)
            position += got
        return position


class RawServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # 8 clients connecting at once must not wait for a SYN retry


def serve_raw(port: int, directory: Path, fsync: bool, block: int) -> None:
    RawHandler.directory = directory
    RawHandler.fsync = fsync
    RawHandler.block = block
    with RawServer(("127.0.0.1", port), RawHandler) as server:
        server.serve_forever()


# --------------------------------------------------------------------------------------------------
# Processes: start in their own group, stop the whole group; read CPU and memory from /proc
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children = [int(child) for child in handle.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def process_tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of these processes, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / CLK_TCK


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Service:
    """One server process, in its own process group, with its output in a log file."""

    def __init__(self, name: str, command: list[str], cwd: Path, env: dict[str, str], log_path: Path, port: int):
        self.name, self.command, self.cwd, self.env, self.log_path, self.port = name, command, cwd, env, log_path, port
        self.process: subprocess.Popen | None = None

    def start(self, ready_path: str, timeout: float = 60) -> None:
        if self.process is not None:
            return
        with open(self.log_path, "ab") as output:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._wait_ready(ready_path, timeout)

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.output()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("OPTIONS", path, headers={"Tus-Resumable": "1.0.0"})
                connection.getresponse().read()
                return
            except OSError:
                time.sleep(0.2)
            finally:
                connection.close()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s:\n{self.output()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.alive() else []

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)  # the group: gunicorn's workers too
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything left in the group once the leader is gone
        except ProcessLookupError:
            pass
        self.process = None


# --------------------------------------------------------------------------------------------------
# The client: one kept-alive http.client connection; the two protocols on top of it
# --------------------------------------------------------------------------------------------------

class Client:
    """One HTTP/1.1 connection. Bodies are slices of one block, sent without copying."""

    def __init__(self, port: int, timeout: float):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.connects = 0

    def close(self) -> None:
        self.connection.close()

    def exchange(self, method: str, path: str, headers: dict[str, str], length: int = 0,
                 unit: memoryview | bytes = b"") -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send `length` bytes made of `unit` repeated (the body), return status, headers and body."""
        connection = self.connection
        if connection.sock is None:
            self.connects += 1
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers.items():
            connection.putheader(key, value)
        if length or method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(length))
        connection.endheaders()
        sent = 0
        while sent < length:
            piece = unit[: min(len(unit), length - sent)]
            connection.send(piece)
            sent += len(piece)
        response = connection.getresponse()
        return response.status, response.headers, response.read()

    def timed(self, method: str, path: str, headers: dict[str, str], length: int = 0,
              unit: memoryview | bytes = b"") -> tuple[float, int, http.client.HTTPMessage, bytes]:
        start = time.perf_counter()
        status, response_headers, body = self.exchange(method, path, headers, length, unit)
        return time.perf_counter() - start, status, response_headers, body


@dataclass
class Upload:
    path: str  # the URL path chunks go to
    id: str
    size: int


def expect(status: int, wanted: tuple[int, ...], what: str, body: bytes = b"") -> None:
    if status not in wanted:
        raise BenchError(f"{what}: HTTP {status} {body[:300]!r}")


class Tus:
    """tus 1.0.0: POST /files/ with Upload-Length, PATCH with Upload-Offset, HEAD for the offset."""

    name = "tus"

    def __init__(self, auth: dict[str, str]):
        self.headers = {"Tus-Resumable": "1.0.0", **auth}

    def create(self, client: Client, size: int, filename: str) -> Upload:
        metadata = "filename " + base64.b64encode(filename.encode()).decode()
        status, headers, body = client.exchange(
            "POST", "/files/", {**self.headers, "Upload-Length": str(size), "Upload-Metadata": metadata})
        expect(status, (201,), "tus POST", body)
        path = urlsplit(headers["Location"]).path
        return Upload(path=path, id=path.rstrip("/").rsplit("/", 1)[-1], size=size)

    def write(self, client: Client, upload: Upload, offset: int, length: int, unit) -> float:
        seconds, status, headers, body = client.timed(
            "PATCH", upload.path,
            {**self.headers, "Content-Type": OFFSET_OCTET_STREAM, "Upload-Offset": str(offset)}, length, unit)
        expect(status, (204,), f"PATCH at {offset}", body)
        if int(headers.get("Upload-Offset", -1)) != offset + length:
            raise BenchError(f"PATCH at {offset}: Upload-Offset {headers.get('Upload-Offset')}, not {offset + length}")
        return seconds

    def lookup(self, client: Client, upload: Upload) -> tuple[float, int]:
        seconds, status, headers, body = client.timed("HEAD", upload.path, self.headers)
        expect(status, (200,), "HEAD", body)
        return seconds, int(headers.get("Upload-Offset", -1))

    def delete(self, client: Client, upload: Upload) -> None:
        status, _, body = client.exchange("DELETE", upload.path, self.headers)
        expect(status, (204, 404), "DELETE", body)


class Rest:
    """This project's REST API: POST /api/uploads/, PUT with Content-Range, GET for the offset."""

    name = "rest"

    def __init__(self, auth: dict[str, str]):
        self.headers = auth

    def create(self, client: Client, size: int, filename: str) -> Upload:
        body = json.dumps({"filename": filename, "size": size}).encode()
        status, _, answer = client.exchange(
            "POST", "/api/uploads/", {**self.headers, "Content-Type": "application/json"}, len(body), body)
        expect(status, (201,), "REST POST", answer)
        created = json.loads(answer)
        return Upload(path=urlsplit(created["url"]).path, id=str(created["id"]), size=size)

    def write(self, client: Client, upload: Upload, offset: int, length: int, unit) -> float:
        headers = {**self.headers, "Content-Type": "application/octet-stream",
                   "Content-Range": f"bytes {offset}-{offset + length - 1}/{upload.size}"}
        seconds, status, _, body = client.timed("PUT", upload.path, headers, length, unit)
        expect(status, (200,), f"PUT at {offset}", body)
        if json.loads(body)["offset"] != offset + length:
            raise BenchError(f"PUT at {offset}: offset {json.loads(body)['offset']}, not {offset + length}")
        return seconds

    def lookup(self, client: Client, upload: Upload) -> tuple[float, int]:
        seconds, status, _, body = client.timed("GET", upload.path, {**self.headers, "Accept": "application/json"})
        expect(status, (200,), "GET", body)
        return seconds, json.loads(body)["offset"]

    def delete(self, client: Client, upload: Upload) -> None:
        status, _, body = client.exchange("DELETE", upload.path, self.headers)
        expect(status, (204, 404), "DELETE", body)


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------

class Server:
    """What a workload talks to: a protocol on a running service, plus how to check and clean up."""

    name = ""
    writes_fsync = False

    def __init__(self, service: Service, protocol: Tus | Rest, data_dir: Path):
        self.service, self.protocol, self.data_dir = service, protocol, data_dir

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.service.start("/files/")

    def stop(self) -> None:
        self.service.stop()

    def pids(self) -> list[int]:
        return self.service.pids()

    def db_pids(self) -> list[int] | None:
        """The database backends serving this server (None: it has no database)."""
        return None

    def verify(self, client: Client, upload: Upload, sha256: str, deadline: float) -> float:
        """Outside the timing: the server must hold the whole upload. Returns seconds waited."""
        _, offset = self.protocol.lookup(client, upload)
        if offset != upload.size:
            raise BenchError(f"after the upload the server holds {offset} of {upload.size} bytes")
        return 0.0

    def cleanup(self, uploads: list[Upload], timeout: float) -> None:
        """Delete a run's files: the data folder is this server's alone."""
        for path in self.data_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


class RawServerProcess(Server):
    def __init__(self, fsync: bool, work: Path, block: int):
        self.name = "raw-fsync" if fsync else "raw"
        self.writes_fsync = fsync
        data = work / self.name
        data.mkdir()
        port = free_port()
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-raw", str(port), str(data),
                   "--raw-block", str(block)]
        service = Service(self.name, command + (["--fsync"] if fsync else []), ROOT, dict(os.environ),
                          work / f"{self.name}.log", port)
        super().__init__(service, Tus({}), data)


class TusNodeServer(Server):
    name = "tus-node"

    def __init__(self, work: Path):
        data = work / self.name
        data.mkdir()
        port = free_port()
        service = Service(self.name, ["node", "server.mjs", str(port), str(data)], TUS_NODE_CACHE,
                          dict(os.environ), work / "tus-node.log", port)
        super().__init__(service, Tus({}), data)


class ProjectServer(Server):
    """project-tus / project-rest / project-tus-nofsync: one protocol on a shared gunicorn."""

    def __init__(self, name: str, service: Service, protocol: Tus | Rest, project: Project, fsync: bool):
        self.name, self.project, self.writes_fsync = name, project, fsync
        super().__init__(service, protocol, project.media)

    def db_pids(self) -> list[int] | None:
        return self.project.database.backend_pids()

    def verify(self, client: Client, upload: Upload, sha256: str, deadline: float) -> float:
        """Status `complete` and the recorded SHA-256 equal to ours (polled: completion may be async)."""
        path = f"/api/uploads/{upload.id}/"
        headers = {"Authorization": f"Token {self.project.token}", "Accept": "application/json"}
        start = time.monotonic()
        while True:
            status, _, body = client.exchange("GET", path, headers)
            expect(status, (200,), "GET after the upload", body)
            state = json.loads(body)
            if state["status"] == "complete":
                break
            if state["status"] not in ("partial", "verifying") or time.monotonic() > deadline:
                raise BenchError(f"after the upload: {state}")
            time.sleep(0.05)
        waited = time.monotonic() - start
        if state["sha256"] != sha256 or state["offset"] != upload.size:
            raise BenchError(f"server recorded sha256 {state['sha256']} offset {state['offset']}, "
                             f"client sent {sha256} ({upload.size} bytes)")
        return waited

    def cleanup(self, uploads: list[Upload], timeout: float) -> None:
        client = Client(self.port, timeout)
        rest = Rest({"Authorization": f"Token {self.project.token}"})
        try:
            for upload in uploads:
                rest.delete(client, Upload(f"/api/uploads/{upload.id}/", upload.id, upload.size))
        finally:
            client.close()


# --------------------------------------------------------------------------------------------------
# The project's own services: PostgreSQL database, Redis keys, gunicorn
# --------------------------------------------------------------------------------------------------

class FloorServer(Server):
    """bench/floor.py under the project's gunicorn config, in the project's database."""

    def __init__(self, name: str, project: Project, fsync: bool):
        import floor

        self.name, self.writes_fsync = name, fsync
        data = project.work / name
        data.mkdir()
        floor.setup(project.database.url)
        redis_base = project.args.redis_url.rsplit("/", 1)[0]
        service = project.gunicorn(
            name, fsync, app="bench.floor:app", FLOOR_DSN=project.database.url, FLOOR_DIR=str(data),
            FLOOR_FSYNC="1" if fsync else "0", FLOOR_REDIS=f"{redis_base}/13",
        )
        super().__init__(service, Tus({"Authorization": f"Token {floor.TOKEN}"}), data)
        self.project = project

    def db_pids(self) -> list[int] | None:
        # The bench database's backends: while the floor is timed, the project's are idle.
        return self.project.database.backend_pids()


class Database:
    """A fresh database `bench_<pid>` on the shared PostgreSQL, dropped at the end."""

    def __init__(self, admin_url: str):
        import psycopg  # here, so that `--serve-raw` starts without it

        self.psycopg = psycopg
        self.admin_url = admin_url
        self.name = f"bench_{os.getpid()}"
        self.admin = None
        self.postmaster: int | None = None

    @property
    def url(self) -> str:
        parts = urlsplit(self.admin_url)
        return parts._replace(path=f"/{self.name}").geturl()

    def create(self) -> None:
        self.admin = self.psycopg.connect(self.admin_url, autocommit=True)
        self.admin.execute(f'CREATE DATABASE "{self.name}"')

    def backend_pids(self) -> list[int]:
        """The postmaster's children whose process title names this database (no query: cheap to poll)."""
        if self.postmaster is None:
            backend = self.admin.execute("SELECT pg_backend_pid()").fetchone()[0]
            with open(f"/proc/{backend}/stat") as handle:
                self.postmaster = int(handle.read().rsplit(")", 1)[1].split()[1])
        found = []
        for pid in descendants(self.postmaster):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    title = handle.read()
            except OSError:
                continue
            if f" {self.name} ".encode() in title:
                found.append(pid)
        return found

    def drop(self) -> None:
        if self.admin is None:
            return
        try:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except self.psycopg.Error as exc:
            log(f"could not drop database {self.name}: {exc}")
        self.admin.close()
        self.admin = None


class Project:
    """Migrate a fresh database, make a user + token, run gunicorn instances, clean Redis at the end."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.media = work / "project-media"
        self.media.mkdir()
        self.database = Database(args.pg_url)
        self.prefix = f"bench{os.getpid()}:"
        self.token = ""
        self.services: list[Service] = []

    def env(self, **extra: str) -> dict[str, str]:
        base = {key: value for key, value in os.environ.items()
                if not key.startswith(("UPLOADS_", "GUNICORN", "DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY"))}
        redis_base = self.args.redis_url.rsplit("/", 1)[0]
        return {
            **base,
            "DATABASE_URL": self.database.url,
            "REDIS_URL": f"{redis_base}/12",
            "UPLOADS_REDIS_URL": f"{redis_base}/13",
            "CACHE_KEY_PREFIX": self.prefix,
            "MEDIA_ROOT": str(self.media),
            "DEBUG": "0",
            "SECRET_KEY": SECRET_KEY,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "UPLOADS_FSYNC": "1",
            "WEB_CONCURRENCY": str(self.args.workers),
            "GUNICORN_THREADS": str(self.args.threads),
            **dict(item.split("=", 1) for item in self.args.project_env),
            **extra,
        }

    def manage(self, *command: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=self.env(), check=True,
                              capture_output=True, text=True, timeout=300)
        return done.stdout

    def setup(self) -> None:
        self.database.create()
        self.manage("migrate", "-v0", "--noinput")
        self.token = self.manage(
            "shell", "-c",
            "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token;"
            "u,_=User.objects.get_or_create(username='bench'); print(Token.objects.get_or_create(user=u)[0].key)",
        ).strip().splitlines()[-1]

    def gunicorn(self, name: str, fsync: bool, root: Path = ROOT, app: str = "project.wsgi", **extra: str) -> Service:
        port = free_port()
        env = self.env(BIND=f"127.0.0.1:{port}", UPLOADS_FSYNC="1" if fsync else "0", **extra)
        # The tree's own gunicorn config (a baseline is served as it was configured), with the
        # access log off (accesslog = None, not /dev/null).
        config = self.work / f"gunicorn_{name}.py"
        config.write_text(
            f"exec(compile(open({str(root / 'project' / 'gunicorn.py')!r}).read(), 'project/gunicorn.py', 'exec'))\n"
            "accesslog = None\n"
        )
        command = [sys.executable, "-m", "gunicorn", "-c", str(config), app]
        service = Service(name, command, root, env, self.work / f"{name}.log", port)
        self.services.append(service)
        return service

    def teardown(self) -> None:
        for service in self.services:
            service.stop()
        if self.token:
            try:  # this run's Redis keys only (its own prefix), in databases 12 and 13
                self.manage("shell", "-c", "from django.core.cache import caches\n"
                            "for alias in ('default', 'uploads'): caches[alias].delete_pattern('*')")
            except (subprocess.SubprocessError, OSError) as exc:
                log(f"could not delete the Redis keys {self.prefix}*: {exc}")
        self.database.drop()


def install_tus_node() -> str:
    """`npm ci` into the cache folder when the lock file there differs from the repo's."""
    TUS_NODE_CACHE.mkdir(parents=True, exist_ok=True)
    lock = (TUS_NODE_SOURCE / "package-lock.json").read_bytes()
    stamp = TUS_NODE_CACHE / ".installed-lock-sha256"
    wanted = hashlib.sha256(lock).hexdigest()
    for name in TUS_NODE_FILES:
        shutil.copyfile(TUS_NODE_SOURCE / name, TUS_NODE_CACHE / name)
    if not (stamp.exists() and stamp.read_text() == wanted and (TUS_NODE_CACHE / "node_modules").is_dir()):
        log(f"npm ci in {TUS_NODE_CACHE}")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=TUS_NODE_CACHE,
                       check=True, timeout=600, stdout=subprocess.DEVNULL)
        stamp.write_text(wanted)
    package = json.loads((TUS_NODE_CACHE / "node_modules" / "@tus" / "server" / "package.json").read_text())
    store = json.loads((TUS_NODE_CACHE / "node_modules" / "@tus" / "file-store" / "package.json").read_text())
    return f"@tus/server {package['version']}, @tus/file-store {store['version']}"


# --------------------------------------------------------------------------------------------------
# Measuring a run: CPU of the server tree, RSS sampling, client CPU
# --------------------------------------------------------------------------------------------------

class Meter:
    """Around a timed window: the server tree's CPU seconds, its RSS growth, the PG backends' CPU.

    A sampler thread reads VmRSS every `interval` and the CPU of the database backends every 10th
    time, so a backend that closes during the window (CONN_MAX_AGE) still counts up to its last sample.
    """

    DB_EVERY = 10

    def __init__(self, server: Server, interval: float = 0.01):
        self.server, self.interval = server, interval
        self.stopped = threading.Event()
        self.peak: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.db_base: dict[int, float] = {}
        self.db_last: dict[int, float] = {}

    def __enter__(self) -> Meter:
        self.pids = self.server.pids()
        self.base = {pid: rss for pid in self.pids if (rss := rss_kib(pid)) is not None}
        self.peak = dict(self.base)
        self.has_db = self.server.db_pids() is not None
        self._sample_db()
        self.db_base = dict(self.db_last)
        self.cpu0 = cpu_seconds(self.pids)
        self.client0 = time.process_time()
        self.sampler = threading.Thread(target=self._sample, name="sampler", daemon=True)
        self.sampler.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        tick = 0
        while not self.stopped.wait(self.interval):
            for pid in self.base:
                rss = rss_kib(pid)
                if rss is not None and rss > self.peak[pid]:
                    self.peak[pid] = rss
            tick += 1
            if tick % self.DB_EVERY == 0:
                self._sample_db()

    def _sample_db(self) -> None:
        for pid in self.server.db_pids() or []:
            seconds = cpu_seconds([pid])
            if seconds:
                self.db_last[pid] = max(seconds, self.db_last.get(pid, 0.0))

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.stopped.set()
        self.sampler.join(timeout=5)
        self.cpu = cpu_seconds(self.server.pids()) - self.cpu0
        self._sample_db()
        self.db_cpu = (sum(last - self.db_base.get(pid, 0.0) for pid, last in self.db_last.items())
                       if self.has_db else None)
        self.client_cpu = time.process_time() - self.client0

    def figures(self, nbytes: int) -> dict[str, float | None]:
        gb = nbytes / 1e9 if nbytes else None
        growth = max((self.peak[pid] - self.base[pid] for pid in self.base), default=0)
        return {
            "seconds": self.seconds,
            "server_cpu_s": self.cpu,
            "cpu_s_per_gb": self.cpu / gb if gb else None,
            "pg_cpu_s_per_gb": self.db_cpu / gb if gb and self.db_cpu is not None else None,
            "client_cpu_s_per_gb": self.client_cpu / gb if gb else None,
            "rss_growth_mib": growth / 1024,
            "rss_peak_mib": max(self.peak.values(), default=0) / 1024,
        }


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def latency_figures(latencies: list[float]) -> dict[str, float | None]:
    return {"p50_ms": _ms(percentile(latencies, 0.5)), "p99_ms": _ms(percentile(latencies, 0.99)),
            "max_ms": _ms(max(latencies, default=None))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


_digests: dict[tuple[int, int], str] = {}


def content_sha256(block: bytes, size: int, unit: int) -> str:
    """SHA-256 of `size` bytes made of block[:unit] repeated: what the client sends."""
    key = (size, unit)
    if key not in _digests:
        digest, view, left = hashlib.sha256(), memoryview(block)[:unit], size
        while left:
            piece = view[: min(unit, left)]
            digest.update(piece)
            left -= len(piece)
        _digests[key] = digest.hexdigest()
    return _digests[key]


# --------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------

@dataclass
class Context:
    block: bytes
    timeout: float
    run: int


@dataclass
class Workload:
    key: str
    letter: str
    title: str
    servers: tuple[str, ...]
    writes: bool = True
    table: tuple[tuple[str, str], ...] = ()  # (metric, label) shown in the markdown table

    def disk_needed(self) -> int:
        return 0

    def prepare(self, block: bytes) -> None:
        """Once, before the runs (e.g. the expected digest): never inside a timed window."""

    def deadline_seconds(self) -> float:
        return 120.0

    def run(self, server: Server, ctx: Context, uploads: list[Upload]) -> dict:
        raise NotImplementedError


def upload_chunks(server: Server, client: Client, upload: Upload, chunk: int, block: bytes,
                  deadline: float) -> list[float]:
    """Sequential chunks of `upload`, each a slice of the block repeated; the latency of each."""
    unit = memoryview(block)[: min(chunk, len(block))]
    latencies, offset = [], 0
    while offset < upload.size:
        if time.monotonic() > deadline:
            raise BenchError(f"deadline passed at offset {offset} of {upload.size}")
        length = min(chunk, upload.size - offset)
        latencies.append(server.protocol.write(client, upload, offset, length, unit))
        offset += length
    return latencies


def finalize_figures(latencies: list[float]) -> dict[str, float | None]:
    """What the last request took beyond an ordinary one: the upload's completion."""
    if len(latencies) < 3:
        return {"last_ms": _ms(latencies[-1]) if latencies else None, "finalize_s": None}
    return {"last_ms": _ms(latencies[-1]),
            "finalize_s": latencies[-1] - statistics.median(latencies[:-1])}


def unique_name(key: str, ctx: Context, index: int = 0) -> str:
    return f"bench-{key}-{ctx.run}-{index}-{uuid.uuid4().hex[:8]}.bin"


@contextmanager
def one_upload(server: Server, ctx: Context, uploads: list[Upload], key: str, size: int):
    """A kept-alive client and a new upload of `size` bytes on it (recorded for deletion); the
    client is closed afterwards."""
    client = Client(server.port, ctx.timeout)
    try:
        upload = server.protocol.create(client, size, unique_name(key, ctx))
        uploads.append(upload)
        yield client, upload
    finally:
        client.close()


@dataclass
class ChunkedUpload(Workload):
    """One upload of `size` bytes in `chunk`-byte requests on one kept-alive connection (a, b, c, f)."""

    size: int = 0
    chunk: int = 0

    def unit(self) -> int:
        return min(self.chunk, BLOCK_SIZE)

    def disk_needed(self) -> int:
        return self.size

    def prepare(self, block: bytes) -> None:
        content_sha256(block, self.size, self.unit())

    def deadline_seconds(self) -> float:
        return 60 + self.size / 10e6 + (self.size // self.chunk) * 0.05

    def run(self, server: Server, ctx: Context, uploads: list[Upload]) -> dict:
        deadline = time.monotonic() + self.deadline_seconds()
        with one_upload(server, ctx, uploads, self.key, self.size) as (client, upload):
            with Meter(server) as meter:
                latencies = upload_chunks(server, client, upload, self.chunk, ctx.block, deadline)
            complete_after = server.verify(client, upload, content_sha256(ctx.block, self.size, self.unit()),
                                           deadline + 60)
            connects = client.connects
        return {
            **meter.figures(self.size),
            "mb_s": self.size / meter.seconds / 1e6,
            "req_s": len(latencies) / meter.seconds,
            "requests": len(latencies),
            **latency_figures(latencies),
            **finalize_figures(latencies),
            "complete_after_s": complete_after,
            "connects": connects,
        }


@dataclass
class Concurrent(Workload):
    """`clients` uploads at once, each on its own connection in its own thread (d)."""

    clients: int = 8
    size: int = 0
    chunk: int = 8 * MiB

    def disk_needed(self) -> int:
        return self.clients * self.size

    def prepare(self, block: bytes) -> None:
        content_sha256(block, self.size, min(self.chunk, BLOCK_SIZE))

    def deadline_seconds(self) -> float:
        return 60 + self.clients * self.size / 10e6

    def run(self, server: Server, ctx: Context, uploads: list[Upload]) -> dict:
        deadline = time.monotonic() + self.deadline_seconds()
        clients = [Client(server.port, ctx.timeout) for _ in range(self.clients)]
        try:
            mine = [server.protocol.create(c, self.size, unique_name(self.key, ctx, i)) for i, c in enumerate(clients)]
            uploads.extend(mine)
            latencies: list[list[float]] = [[] for _ in clients]
            errors: list[BaseException] = []
            start = threading.Barrier(self.clients + 1, timeout=30)

            def one(index: int) -> None:
                try:
                    start.wait()
                    latencies[index] = upload_chunks(server, clients[index], mine[index], self.chunk, ctx.block,
                                                     deadline)
                except BaseException as exc:  # noqa: B036 (reported by the main thread)
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(self.clients)]
            for thread in threads:
                thread.start()
            with Meter(server) as meter:
                start.wait()
                for thread in threads:
                    thread.join(timeout=max(1.0, deadline - time.monotonic() + ctx.timeout))
            if errors or any(thread.is_alive() for thread in threads):
                raise BenchError(f"{len(errors)} client(s) failed: {errors[:1]!r}" if errors else "clients hung")
            sha256 = content_sha256(ctx.block, self.size, min(self.chunk, BLOCK_SIZE))
            for client, upload in zip(clients, mine):
                server.verify(client, upload, sha256, deadline + 60)
        finally:
            for client in clients:
                client.close()
        total = self.clients * self.size
        everything = [value for values in latencies for value in values]
        return {**meter.figures(total), "mb_s": total / meter.seconds / 1e6,
                "req_s": len(everything) / meter.seconds, **latency_figures(everything)}


@dataclass
class Lookups(Workload):
    """`count` offset look-ups of one partial upload on one kept-alive connection (e)."""

    count: int = 2000
    size: int = 2 * MiB

    def run(self, server: Server, ctx: Context, uploads: list[Upload]) -> dict:
        deadline = time.monotonic() + self.deadline_seconds()
        with one_upload(server, ctx, uploads, self.key, self.size) as (client, upload):
            half = self.size // 2
            server.protocol.write(client, upload, 0, half, memoryview(ctx.block)[:half])
            latencies = []
            connects_before = client.connects
            with Meter(server) as meter:
                for _ in range(self.count):
                    if time.monotonic() > deadline:
                        raise BenchError(f"deadline passed after {len(latencies)} look-ups")
                    seconds, offset = server.protocol.lookup(client, upload)
                    if offset != half:
                        raise BenchError(f"look-up said offset {offset}, not {half}")
                    latencies.append(seconds)
            reconnects = client.connects - connects_before
        figures = meter.figures(0)
        return {"seconds": meter.seconds, "lookups_s": self.count / meter.seconds,
                "server_cpu_ms_per_lookup": meter.cpu / self.count * 1000,
                "pg_cpu_ms_per_lookup": None if meter.db_cpu is None else meter.db_cpu / self.count * 1000,
                "rss_growth_mib": figures["rss_growth_mib"], "reconnects": reconnects,
                **latency_figures(latencies)}


PROJECT = ("project-tus", "project-rest", "project-tus-base")  # the last only with --baseline
EVERYONE = ("raw", "raw-fsync", "tus-node", *PROJECT)


def workloads(args: argparse.Namespace) -> list[Workload]:
    quick = args.quick
    mb_cpu = (("mb_s", "MB/s"), ("cpu_s_per_gb", "CPU s/GB"), ("pg_cpu_s_per_gb", "PG CPU s/GB"))
    big = args.big_gib * GiB
    return [
        ChunkedUpload("seq8m", "a", f"{'64 MiB' if quick else '1 GiB'} in 8 MiB chunks, one upload", EVERYONE,
                      table=(*mb_cpu, ("p50_ms", "chunk p50 ms"), ("finalize_s", "finalize s")),
                      size=64 * MiB if quick else GiB, chunk=8 * MiB),
        ChunkedUpload("small64k", "b", f"{'8 MiB' if quick else '64 MiB'} in 64 KiB chunks",
                      (*EVERYONE, "project-tus-nofsync", "project-tus-base-nofsync", "floor", "floor-nofsync"),
                      table=(("req_s", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                             ("cpu_s_per_gb", "CPU s/GB"), ("pg_cpu_s_per_gb", "PG CPU s/GB")),
                      size=8 * MiB if quick else 64 * MiB, chunk=64 * KiB),
        ChunkedUpload("single", "c", f"one {'64 MiB' if quick else '1 GiB'} request", EVERYONE,
                      table=(("mb_s", "MB/s"), ("rss_growth_mib", "RSS +MiB"), ("cpu_s_per_gb", "CPU s/GB"),
                             ("complete_after_s", "complete after s")),
                      size=64 * MiB if quick else GiB, chunk=64 * MiB if quick else GiB),
        Concurrent("concurrent", "d", f"8 clients x {'16' if quick else '128'} MiB at once, 8 MiB chunks", EVERYONE,
                   table=(*mb_cpu, ("p50_ms", "chunk p50 ms"), ("rss_growth_mib", "RSS +MiB")),
                   clients=8, size=16 * MiB if quick else 128 * MiB),
        Lookups("lookup", "e", f"{200 if quick else 2000} offset look-ups, one kept-alive connection",
                ("raw", "tus-node", *PROJECT, "floor"), writes=False,
                table=(("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("lookups_s", "look-ups/s"),
                       ("server_cpu_ms_per_lookup", "CPU ms/look-up"), ("pg_cpu_ms_per_lookup", "PG CPU ms/look-up")),
                count=200 if quick else 2000),
        ChunkedUpload("finalize4g", "f", f"{args.big_gib} GiB in 8 MiB chunks (finalize)", PROJECT,
                      table=(("mb_s", "MB/s"), ("finalize_s", "finalize s"), ("last_ms", "last chunk ms"),
                             ("p50_ms", "chunk p50 ms"), ("complete_after_s", "complete after s")),
                      size=big, chunk=8 * MiB),
    ]


# --------------------------------------------------------------------------------------------------
# The bench: start servers, run every (workload, run, server), summarise
# --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    workload: str
    server: str
    run: int
    position: int
    started: str
    loadavg: str
    metrics: dict = field(default_factory=dict)
    error: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="bench-compare-", dir=args.tmp))
        self.servers: dict[str, Server] = {}
        self.project: Project | None = None
        self.results: list[Result] = []
        self.versions: dict[str, str] = {}
        self.block = os.urandom(BLOCK_SIZE)
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.skipped: list[str] = []

    # --- servers -----------------------------------------------------------------------------------

    def build_servers(self, names: list[str]) -> None:
        args, work = self.args, self.work
        for fsync, name in ((False, "raw"), (True, "raw-fsync")):
            if name in names:
                self.servers[name] = RawServerProcess(fsync, work, args.raw_block)
        if "tus-node" in names:
            self.versions["tus-node"] = install_tus_node()
            self.versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                                   timeout=30).stdout.strip()
            self.servers["tus-node"] = TusNodeServer(work)
        if any(name.startswith(("project", "floor")) for name in names):
            self.project = Project(args, work)
            self.project.setup()
            auth = {"Authorization": f"Token {self.project.token}"}
            main = self.project.gunicorn("project", fsync=True)
            for name, protocol in (("project-tus", Tus(auth)), ("project-rest", Rest(auth))):
                if name in names:
                    self.servers[name] = ProjectServer(name, main, protocol, self.project, fsync=True)
            if "project-tus-nofsync" in names:
                nofsync = self.project.gunicorn("project-nofsync", fsync=False)
                self.servers["project-tus-nofsync"] = ProjectServer(
                    "project-tus-nofsync", nofsync, Tus(auth), self.project, fsync=False)
            if "project-tus-base" in names:
                base = self.project.gunicorn("project-base", fsync=True, root=Path(args.baseline).resolve())
                self.servers["project-tus-base"] = ProjectServer(
                    "project-tus-base", base, Tus(auth), self.project, fsync=True)
            if "project-tus-base-nofsync" in names:
                base = self.project.gunicorn("project-base-nofsync", fsync=False, root=Path(args.baseline).resolve())
                self.servers["project-tus-base-nofsync"] = ProjectServer(
                    "project-tus-base-nofsync", base, Tus(auth), self.project, fsync=False)
            for name, fsync in (("floor", True), ("floor-nofsync", False)):
                if name in names:
                    self.servers[name] = FloorServer(name, self.project, fsync)
        for server in self.servers.values():
            server.start()
            self.warm_up(server)
            log(f"{server.name}: {server.url} (pids {server.pids()})")

    def warm_up(self, server: Server) -> None:
        """A few small uploads in parallel, so every worker has served a request before timing."""
        uploads: list[Upload] = []
        errors: list[BaseException] = []

        def one(index: int) -> None:
            client = Client(server.port, self.args.timeout)
            try:
                upload = server.protocol.create(client, 2 * MiB, f"warm-up-{index}-{uuid.uuid4().hex[:8]}.bin")
                uploads.append(upload)
                unit = memoryview(self.block)[: MiB]
                for offset in (0, MiB):
                    server.protocol.write(client, upload, offset, MiB, unit)
                server.protocol.lookup(client, upload)
            except BaseException as exc:  # noqa: B036 (re-raised below)
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        server.cleanup(uploads, self.args.timeout)
        if errors:
            raise RuntimeError(f"{server.name}: warm-up failed: {errors[0]!r}\n{server.service.output()}")

    def stop_servers(self) -> None:
        for server in self.servers.values():
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 (stop the others anyway)
                log(f"could not stop {server.name}: {exc}")
        if self.project is not None:
            self.project.teardown()

    # --- runs --------------------------------------------------------------------------------------

    def run_workload(self, workload: Workload) -> None:
        servers = [self.servers[name] for name in workload.servers if name in self.servers]
        if not servers:
            return
        free = shutil.disk_usage(self.work).free
        if workload.disk_needed() and free < 3 * workload.disk_needed():
            needed = workload.disk_needed() / GiB
            self.skip(f"{workload.key}: skipped, {free / GiB:.1f} GiB free < 3 x {needed:.1f} GiB")
            return
        log(f"{workload.letter}. {workload.key}: {workload.title}; servers {', '.join(s.name for s in servers)}")
        workload.prepare(self.block)
        for run in range(self.args.runs):
            shift = run % len(servers)
            for position, server in enumerate(servers[shift:] + servers[:shift]):
                if time.monotonic() > self.deadline:
                    self.skip(f"{workload.key} run {run} {server.name}: skipped, --max-minutes reached")
                    continue
                self.results.append(self.run_one(workload, server, run, position))

    def run_one(self, workload: Workload, server: Server, run: int, position: int) -> Result:
        if workload.writes:
            os.sync()  # flush the previous run's writes and deletions; then let the page cache settle
            time.sleep(self.args.pause)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        result = Result(workload.key, server.name, run, position, now, Path("/proc/loadavg").read_text().strip())
        uploads: list[Upload] = []
        try:
            if not server.service.alive():
                raise BenchError(f"{server.name} is not running:\n{server.service.output()}")
            result.metrics = workload.run(server, Context(self.block, self.args.timeout, run), uploads)
        except Exception as exc:  # noqa: BLE001 (recorded; the other runs go on)
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                server.cleanup(uploads, self.args.timeout)
            except Exception as exc:  # noqa: BLE001 (recorded; the other runs go on)
                result.error = (result.error or "") + f" (cleanup: {exc!r})"
        shown = ", ".join(f"{key} {format_value(result.metrics.get(key))}" for key, _ in workload.table
                          if result.metrics.get(key) is not None)
        log(f"  {workload.key} run {run} {server.name}: {result.error or shown}")
        return result

    def skip(self, message: str) -> None:
        self.skipped.append(message)
        log(message)


# --------------------------------------------------------------------------------------------------
# Summary: medians, paired ratios, the markdown table, JSON
# --------------------------------------------------------------------------------------------------

REFERENCES = ("raw", "raw-fsync", "tus-node")
# Differences, not rates: a ratio to a near-zero reference says nothing (the JSON still has them).
NO_RATIO = {"rss_growth_mib", "finalize_s", "complete_after_s"}


def summarise(results: list[Result], chosen: list[Workload]) -> dict:
    """{workload: {server: {metric: {median, min, max, n, x_raw, x_raw-fsync, x_tus-node}}}}"""
    summary: dict = {}
    for workload in chosen:
        mine = [r for r in results if r.workload == workload.key and r.error is None]
        by_server: dict[str, dict[int, dict]] = {}
        for result in mine:
            by_server.setdefault(result.server, {})[result.run] = result.metrics
        table: dict = {}
        for server, runs in by_server.items():
            table[server] = {}
            metrics = sorted({key for values in runs.values() for key in values})
            for metric in metrics:
                values = [v[metric] for v in runs.values() if isinstance(v.get(metric), (int, float))]
                if not values:
                    continue
                entry = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
                for reference in (*REFERENCES, "project-tus-base", "project-tus-base-nofsync"):
                    if reference in by_server or reference in REFERENCES:
                        entry[f"x_{reference}"] = paired_ratio(runs, by_server.get(reference, {}), metric)
                table[server][metric] = entry
        summary[workload.key] = table
    return summary


def paired_ratio(runs: dict[int, dict], reference: dict[int, dict], metric: str) -> float | None:
    ratios = []
    for run, metrics in runs.items():
        mine, theirs = metrics.get(metric), reference.get(run, {}).get(metric)
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0:
            ratios.append(mine / theirs)
    return statistics.median(ratios) if ratios else None


def format_value(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(summary: dict, chosen: list[Workload], errors: list[Result]) -> str:
    lines = []
    for workload in chosen:
        table = summary.get(workload.key) or {}
        if not table:
            continue
        lines += ["", f"### {workload.letter}. {workload.key}: {workload.title}", "",
                  "| server | figure | median | min – max | runs | × raw | × raw-fsync | × tus-node |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for server in [name for name in SERVER_NAMES if name in table]:
            for metric, label in workload.table:
                entry = table[server].get(metric)
                if entry is None:
                    continue
                ratios = ["" if metric in NO_RATIO else "1×" if ref == server else format_ratio(entry[f"x_{ref}"])
                          for ref in REFERENCES]
                lines.append(f"| {server} | {label} | {format_value(entry['median'])} | "
                             f"{format_value(entry['min'])} – {format_value(entry['max'])} | {entry['n']} | "
                             + " | ".join(ratios) + " |")
    lines += finalize_lines(summary)
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r.workload} run {r.run} {r.server}: {r.error}" for r in errors]
    return "\n".join(lines)


def finalize_lines(summary: dict) -> list[str]:
    """Finalize time at 1 GiB (from seq8m) against the big upload (finalize4g), project servers."""
    small, big = summary.get("seq8m", {}), summary.get("finalize4g", {})
    rows = []
    for server in PROJECT:
        one = small.get(server, {}).get("finalize_s", {}).get("median")
        four = big.get(server, {}).get("finalize_s", {}).get("median")
        if one is None and four is None:
            continue
        growth = None if one is None or four is None else four - one
        rows.append(f"| {server} | {format_value(one)} | {format_value(four)} | {format_value(growth)} |")
    if not rows:
        return []
    return ["", "### Finalize (last chunk's latency minus the median of the other chunks, medians over runs)", "",
            "| server | seq8m (1 GiB) s | finalize4g s | growth s |", "| --- | ---: | ---: | ---: |", *rows]


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for key, path, prefix in (("cpu", "/proc/cpuinfo", "model name"), ("mem_total", "/proc/meminfo", "MemTotal")):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        info[key] = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(prefix)), None)
    return info


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="seq8m,small64k,single,concurrent,lookup,finalize4g",
                        help="comma-separated keys or letters a-f (default: all)")
    parser.add_argument("--servers", default=None,
                        help="comma-separated (default: all; project-tus-base only with --baseline)")
    parser.add_argument("--runs", type=int, default=None, help="repetitions of each (workload, server); default 3")
    parser.add_argument("--pause", type=float, default=None, help="seconds after `sync` before a writing run; "
                        "default 3")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 run, 0.5 s pause, no 4 GiB upload")
    parser.add_argument("--big-gib", type=int, default=4, help="finalize4g's size in GiB (0 skips it; default 4)")
    parser.add_argument("--raw-block", type=int, default=RAW_BLOCK,
                        help=f"the raw servers' read/write block in bytes (default {RAW_BLOCK})")
    parser.add_argument("--project-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra environment variable for the project's gunicorn (repeatable), "
                        "e.g. UPLOADS_BLOCK_SIZE=65536")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="also serve project-tus from this checkout (project-tus-base), to A/B a change")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for the project (default 2)")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker (default 8)")
    parser.add_argument("--timeout", type=float, default=120, help="socket timeout in seconds (default 120)")
    parser.add_argument("--max-minutes", type=float, default=40, help="start no run after this (default 40)")
    parser.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="an admin connection; the bench database is created beside it")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="the Redis server (db 12 and 13)")
    parser.add_argument("--tmp", default=None, help="where the temporary directory goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--json", dest="json_path", default=None, help="write every run and the summary here")
    parser.add_argument("--serve-raw", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--fsync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.pause is None:
        args.pause = 0.5 if args.quick else 3.0
    if args.quick:
        args.big_gib = 0
    return args


def select(args: argparse.Namespace) -> tuple[list[Workload], list[str]]:
    every = workloads(args)
    wanted = {item.strip() for item in args.workloads.split(",") if item.strip()}
    unknown = wanted - {w.key for w in every} - {w.letter for w in every}
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(sorted(unknown))}")
    chosen = [w for w in every if w.key in wanted or w.letter in wanted]
    if args.big_gib <= 0:
        chosen = [w for w in chosen if w.key != "finalize4g"]
    names = list(SERVER_NAMES) if args.servers is None else [
        item.strip() for item in args.servers.split(",") if item.strip()
    ]
    unknown = set(names) - set(SERVER_NAMES)
    if unknown:
        raise SystemExit(f"unknown server(s): {', '.join(sorted(unknown))}")
    needed = {name for w in chosen for name in w.servers}
    if not args.baseline:
        if args.servers is not None and {"project-tus-base", "project-tus-base-nofsync"} & set(names):
            raise SystemExit("project-tus-base and project-tus-base-nofsync need --baseline DIR")
        needed -= {"project-tus-base", "project-tus-base-nofsync"}
    return chosen, [name for name in SERVER_NAMES if name in names and name in needed]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_raw:
        serve_raw(int(args.serve_raw[0]), Path(args.serve_raw[1]), args.fsync, args.raw_block)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` below on a plain kill
    chosen, names = select(args)
    started = time.monotonic()
    bench = Bench(args)
    log(f"work directory {bench.work}; servers {', '.join(names)}; workloads {', '.join(w.key for w in chosen)}; "
        f"{args.runs} run(s), pause {args.pause:g} s; load average {Path('/proc/loadavg').read_text().split()[:3]}")
    try:
        bench.build_servers(names)
        for workload in chosen:
            bench.run_workload(workload)
    finally:
        bench.stop_servers()
        shutil.rmtree(bench.work, ignore_errors=True)
    wall = time.monotonic() - started
    summary = summarise(bench.results, chosen)
    errors = [r for r in bench.results if r.error]
    print(f"\n## bench/compare.py: {' '.join(sys.argv[1:]) or '(defaults)'}\n")
    print(f"{machine()}; {bench.versions}; gunicorn {args.workers} workers x {args.threads} threads; "
          f"{args.runs} run(s), pause {args.pause:g} s; wall time {wall / 60:.1f} min")
    print(markdown(summary, chosen, errors))
    for message in bench.skipped:
        print(f"- {message}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({
            "command": sys.argv, "args": {k: v for k, v in vars(args).items() if k not in ("serve_raw", "fsync")},
            "machine": machine(), "versions": bench.versions, "wall_seconds": wall,
            "skipped": bench.skipped, "summary": summary,
            "runs": [vars(result) for result in bench.results],
        }, indent=1))
        log(f"wrote {args.json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
