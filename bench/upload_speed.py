#!/usr/bin/env python
"""Upload a large file over loopback through the REST API and report speed and worker memory.

    .venv/bin/python bench/upload_speed.py [--size-mib 1024] [--chunk-mib 8] [--database-url URL]

Starts gunicorn (the project's config, one gthread worker) on a fresh database and MEDIA_ROOT in a
temporary directory, uploads random bytes in chunks with `requests`, verifies the SHA-256, and prints:
the disk's own sequential write speed with fsync (the ceiling), the upload's wall time and MB/s,
and the worker's peak RSS (VmHWM) before and after. Loopback only; it stops by itself.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def disk_write_speed(directory: Path, size: int, block: int) -> float:
    """Sequential write + fsync of `size` bytes: what the disk alone manages, in MB/s."""
    data = os.urandom(block)
    path = directory / "disk-probe"
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // block):
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return size / elapsed / 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in the temp dir")
    parser.add_argument("--fsync", default="1", help="UPLOADS_FSYNC for the server (1 or 0)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=os.environ.get("BENCH_TMP")))
    media = work / "media"
    media.mkdir()
    size, chunk = args.size_mib * MiB, args.chunk_mib * MiB
    env = {
        **os.environ,
        "DATABASE_URL": args.database_url or f"sqlite:///{work / 'bench.sqlite3'}",
        "MEDIA_ROOT": str(media),
        "DEBUG": "0",
        "SECRET_KEY": "bench-secret-key-not-for-production-0123456789abcdef",
        "UPLOADS_MAX_SIZE": str(max(size, 1)),
        "UPLOADS_FSYNC": args.fsync,
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"),
        "WEB_CONCURRENCY": "1",
    }
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    token = subprocess.run(
        [python, "manage.py", "shell", "-c",
         "from django.contrib.auth.models import User; from rest_framework.authtoken.models import Token;"
         "u,_=User.objects.get_or_create(username='bench'); print(Token.objects.get_or_create(user=u)[0].key)"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]

    print(f"disk sequential write + fsync: {disk_write_speed(media, min(size, 512 * MiB), chunk):.0f} MB/s")

    port = free_port()
    env["BIND"] = f"127.0.0.1:{port}"
    log = open(work / "gunicorn.log", "wb")
    server = subprocess.Popen(
        [python, "-m", "gunicorn", "-c", "project/gunicorn.py", "--access-logfile", "/dev/null", "project.wsgi"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(base + "/api/schema/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        workers = children(server.pid)
        rss_before = max(vm_hwm_kib(pid) for pid in workers)
        headers = {"Authorization": f"Token {token}"}
        block = os.urandom(chunk)  # the client reuses one random block: it measures the server
        digest = hashlib.sha256()
        created = requests.post(base + "/api/uploads/", json={"filename": "bench.bin", "size": size}, headers=headers)
        created.raise_for_status()
        url = created.json()["url"]
        start = time.perf_counter()
        offset = 0
        while offset < size:
            data = block[: min(chunk, size - offset)]
            digest.update(data)
            response = requests.put(url, data=data, headers={
                **headers, "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {offset}-{offset + len(data) - 1}/{size}"})
            response.raise_for_status()
            offset = response.json()["offset"]
        elapsed = time.perf_counter() - start
        body = response.json()
        assert body["status"] == "complete" and body["sha256"] == digest.hexdigest(), body
        rss_after = max(vm_hwm_kib(pid) for pid in workers)
        print(f"upload {args.size_mib} MiB in {args.chunk_mib} MiB chunks: {elapsed:.2f} s, "
              f"{size / elapsed / 1e6:.0f} MB/s (including the final SHA-256 pass), sha256 verified")
        print(f"worker peak RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after "
              f"(+{(rss_after - rss_before) / 1024:.1f} MiB)")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
