"""The command-line uploader (uploads/client.py), run as a real process against a real gunicorn.

The CLI is started with `python -m uploads.client` exactly as a user would, with the token in
UPLOADS_TOKEN; the test watches the database and kills it, or puts a misbehaving proxy between it
and the server, to show that it resumes, retries, and fails clearly.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from uploads import client
from uploads.models import Status, UploadSession

from .invariants import assert_invariants

pytestmark = pytest.mark.live
MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 60


def _env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADS_")}
    if token is not None:
        env["UPLOADS_TOKEN"] = token
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "uploads.client", *args]


def run_cli(*args: str, token: str | None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), cwd=ROOT, env=_env(token), capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, token: str) -> subprocess.Popen:
    return subprocess.Popen(_command(*args), cwd=ROOT, env=_env(token), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def write_file(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for_offset(process: subprocess.Popen, filename: str, at_least: int, timeout: float = 20) -> UploadSession:
    """Poll the database until the CLI's upload of `filename` has `at_least` bytes committed."""
    deadline = time.monotonic() + timeout
    while True:
        row = UploadSession.objects.filter(filename=filename).order_by("-created_at").first()
        if row is not None and row.offset >= at_least:
            return row
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the CLI ended ({process.returncode}) before {at_least} bytes were stored:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the upload of {filename} never reached {at_least} bytes (at {row and row.offset})")
        time.sleep(0.02)


def start_and_kill(server, token: str, path: Path, *extra: str, at_least: int = 3 * MiB,
                   sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    """Start an upload slowed to 8 MiB/s in 1 MiB chunks, and signal the CLI once `at_least` bytes
    are committed (a SIGKILL leaves the server with a broken connection and a partial upload)."""
    process = start_cli("upload", str(path), "--server", server.url, "--chunk-size", "1MiB",
                        "--limit-rate", "8MiB", *extra, token=token)
    try:
        wait_for_offset(process, path.name, at_least)
        process.send_signal(sig)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# --- Uploads ------------------------------------------------------------------------------------


def test_upload_a_file_without_django(gunicorn_server, token, tmp_path):
    path, data = write_file(tmp_path, "video.bin", 10 * MiB + 123)
    # `import django` fails in this process: the client must not need it, even indirectly.
    code = (
        "import runpy, sys; sys.modules['django'] = None; sys.argv[0] = 'uploads.client'; "
        "runpy.run_module('uploads.client', run_name='__main__', alter_sys=True)"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, "upload", str(path), "--server", gunicorn_server.url, "--chunk-size", "1MiB",
         "--json", "--progress"],
        cwd=ROOT, env=_env(token), capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    (summary,) = json_lines(result.stdout)
    assert summary["status"] == "complete"
    assert summary["sha256"] == sha256(data)
    assert summary["resumed_from"] == 0 and summary["bytes_sent"] == len(data) and summary["retries"] == 0
    assert "100%" in result.stderr and "B/s" in result.stderr  # the tqdm bars: hashing, then sending
    row = UploadSession.objects.get(pk=summary["id"])
    assert_invariants(row, data)
    assert row.checksum == f"sha256:{sha256(data)}"  # declared up front, so the server verified it
    # And plainly: importing the module brings in no Django.
    check = subprocess.run([sys.executable, "-c", "import sys, uploads.client; assert 'django' not in sys.modules"],
                           cwd=ROOT, env=_env(None), capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_killed_mid_upload_resumes_on_rerun(gunicorn_server, token, tmp_path):
    path, data = write_file(tmp_path, "big.iso", 24 * MiB + 7)
    killed = start_and_kill(gunicorn_server, token, path, at_least=4 * MiB)
    assert killed.returncode == -signal.SIGKILL
    first = UploadSession.objects.get(filename="big.iso")
    assert first.status == Status.PARTIAL and 4 * MiB <= first.offset < len(data)

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, "--chunk-size", "4MiB", "--json",
                     token=token)
    assert result.returncode == 0, result.stderr
    (summary,) = json_lines(result.stdout)
    assert summary["id"] == str(first.pk)  # the same upload, found by name and size
    assert summary["resumed_from"] >= first.offset
    assert summary["bytes_sent"] < len(data)
    assert summary["bytes_sent"] <= len(data) - first.offset + 4 * MiB  # at most one chunk sent twice
    assert summary["sha256"] == sha256(data)
    assert_invariants(UploadSession.objects.get(pk=first.pk), data)
    assert "resuming upload" in result.stderr


def test_every_byte_stored_but_never_finished(gunicorn_server, token, tmp_path):
    """The server died between committing the last byte and publishing the file: the rerun has
    nothing left to send; it has the server finish the upload and checks the result."""
    from uploads import storage

    path, data = write_file(tmp_path, "almost.bin", 3 * MiB)
    created = requests.post(f"{gunicorn_server.url}/api/uploads/", json={"filename": "almost.bin", "size": len(data)},
                            headers={"Authorization": f"Token {token}"}, timeout=10).json()
    storage.partial_path(created["id"]).write_bytes(data)
    UploadSession.objects.filter(pk=created["id"]).update(offset=len(data))

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, "--json", token=token)
    assert result.returncode == 0, result.stderr
    (summary,) = json_lines(result.stdout)
    assert (summary["id"], summary["resumed_from"], summary["bytes_sent"]) == (created["id"], len(data), 0)
    assert summary["sha256"] == sha256(data) and "retry" not in result.stderr
    assert_invariants(UploadSession.objects.get(pk=created["id"]), data)


def test_several_files_including_an_empty_one(gunicorn_server, token, tmp_path):
    empty, _ = write_file(tmp_path, "empty.txt", 0)
    small, data = write_file(tmp_path, "small.txt", 1)
    result = run_cli("upload", str(empty), str(small), "--server", gunicorn_server.url, token=token)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(": complete, " in line for line in lines)
    assert lines[0].endswith(sha256(b"")) and lines[1].endswith(sha256(data))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_with_a_hint_and_rerun_resumes(gunicorn_server, token, tmp_path, sig, code):
    path, data = write_file(tmp_path, "ctrl-c.bin", 16 * MiB)
    interrupted = start_and_kill(gunicorn_server, token, path, at_least=2 * MiB, sig=sig)
    assert interrupted.returncode == code, interrupted.stderr
    assert "the server keeps what it received: run the same command again to resume" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, token=token)
    assert result.returncode == 0, result.stderr
    assert "resumed at" in result.stdout and sha256(data) in result.stdout


def test_worker_killed_mid_upload_is_retried(start_gunicorn, token, tmp_path):
    """kill -9 of the server's only worker while a chunk streams: the CLI sees the connection
    drop, backs off, asks for the offset once gunicorn has a new worker, and finishes."""
    server = start_gunicorn(WEB_CONCURRENCY="1")
    path, data = write_file(tmp_path, "crash.bin", 12 * MiB)
    process = start_cli("upload", str(path), "--server", server.url, "--chunk-size", "4MiB", "--limit-rate", "8MiB",
                        "--json", token=token)
    try:
        wait_for_offset(process, path.name, 2 * MiB)
        pid = server.process.pid
        for worker in open(f"/proc/{pid}/task/{pid}/children").read().split():
            os.kill(int(worker), signal.SIGKILL)
        out, err = process.communicate(timeout=CLI_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    (summary,) = json_lines(out)
    assert summary["retries"] >= 1 and "retry 1/8" in err
    assert summary["sha256"] == sha256(data)
    assert_invariants(UploadSession.objects.get(pk=summary["id"]), data)


# --- Transient errors through a misbehaving proxy ----------------------------------------------


class FaultyProxy:
    """A forwarding proxy that fails on purpose: a 502 HTML page for the first create, a 503 with
    Retry-After for the first chunk, a connection cut half-way through the second chunk, a 423
    for the third; everything else goes through to the real server."""

    def __init__(self, backend: str) -> None:
        self.backend, self.seen, self.lock = backend, [], threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                with proxy.lock:
                    proxy.seen.append(self.command)
                    nth = proxy.seen.count(self.command)
                if self.command == "PUT" and nth == 2:
                    self.rfile.read(length // 2)
                    self.connection.shutdown(socket.SHUT_RDWR)  # the line drops mid-chunk
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else b""
                if self.command == "POST" and nth == 1:
                    return self._reply(502, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                if self.command == "PUT" and nth == 1:
                    return self._reply(503, b'{"detail": "Try later.", "code": "storage_failure"}',
                                       "application/json", {"Retry-After": "1"})
                if self.command == "PUT" and nth == 3:
                    return self._reply(423, b'{"detail": "Busy.", "code": "busy"}', "application/json")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = requests.request(self.command, proxy.backend + self.path, headers=headers, data=body,
                                          timeout=30)
                self._reply(answer.status_code, answer.content, answer.headers.get("Content-Type", ""))

            def _reply(self, status, body, content_type, extra=None):
                self.send_response(status)
                for key, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                                   **(extra or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_transient_errors_are_retried(gunicorn_server, token, tmp_path):
    proxy = FaultyProxy(gunicorn_server.url)
    try:
        path, data = write_file(tmp_path, "flaky.bin", 5 * MiB + 1)
        started = time.monotonic()
        result = run_cli("upload", str(path), "--server", proxy.url, "--chunk-size", "1MiB", "--json", token=token)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    (summary,) = json_lines(result.stdout)
    assert summary["sha256"] == sha256(data)
    assert summary["retries"] == 4
    err = result.stderr
    assert "flaky.bin: starting the upload: HTTP 502: <html><body>502 Bad Gateway</body></html>; retry 1/8" in err
    assert "HTTP 503 (storage_failure): Try later.; retry 1/8 in 1.0 s" in err  # Retry-After: 1
    assert "HTTP 423 (busy)" in err
    assert any(reason in err for reason in ("connection failed", "the server closed the connection")), err
    assert time.monotonic() - started >= 1  # the 503's Retry-After: 1 was honoured
    assert proxy.seen.count("PUT") >= 6 + 3
    assert_invariants(UploadSession.objects.get(pk=summary["id"]), data)


# --- Permanent errors ---------------------------------------------------------------------------


def test_bad_token_fails_fast_with_401(gunicorn_server, tmp_path):
    path, _ = write_file(tmp_path, "a.bin", 1000)
    other, _ = write_file(tmp_path, "b.bin", 1000)
    started = time.monotonic()
    result = run_cli("upload", str(path), str(other), "--server", gunicorn_server.url, token="not-a-valid-token")
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "a.bin: HTTP 401" in result.stderr and "Invalid token" in result.stderr
    assert "retry" not in result.stderr
    assert "check --token / UPLOADS_TOKEN and --server; not trying the other 1 file(s)" in result.stderr
    assert not UploadSession.objects.exists()


def test_file_over_the_servers_maximum_fails_with_413(start_gunicorn, token, tmp_path):
    server = start_gunicorn(UPLOADS_MAX_SIZE="1000")
    big, _ = write_file(tmp_path, "big.bin", 2000)
    small, data = write_file(tmp_path, "small.bin", 500)
    result = run_cli("upload", str(big), str(small), "--server", server.url, "--json", token=token)
    assert result.returncode == 1  # one file failed…
    assert f"{big}: HTTP 413 (too_large): size exceeds the maximum upload size of 1000 bytes." in result.stderr
    failed, done = json_lines(result.stdout)
    assert (failed["status"], failed["http_status"], failed["code"]) == ("error", 413, "too_large")
    assert done["status"] == "complete" and done["sha256"] == sha256(data)  # …the other went on


def test_changed_file_conflicts_then_restart_uploads_it_anew(gunicorn_server, token, tmp_path):
    path, _ = write_file(tmp_path, "doc.bin", 16 * MiB)
    start_and_kill(gunicorn_server, token, path)
    stale = UploadSession.objects.get(filename="doc.bin")
    new_data = os.urandom(16 * MiB)  # the same name and size, other content
    path.write_bytes(new_data)

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, token=token)
    assert result.returncode == 1
    assert "HTTP 409 (conflict)" in result.stderr and "--restart" in result.stderr
    assert UploadSession.objects.get(pk=stale.pk).status == Status.PARTIAL  # nothing mixed in

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, "--restart", "--json", token=token)
    assert result.returncode == 0, result.stderr
    (summary,) = json_lines(result.stdout)
    assert summary["id"] != str(stale.pk) and summary["resumed_from"] == 0
    assert summary["sha256"] == sha256(new_data)
    assert not UploadSession.objects.filter(pk=stale.pk).exists()


def test_checksum_mismatch_is_a_permanent_error(gunicorn_server, token, tmp_path):
    """Started without a checksum, the file changed under the stored prefix, resumed with one:
    the server finds the whole file does not match (422) and the CLI says so."""
    path, data = write_file(tmp_path, "photo.raw", 16 * MiB)
    start_and_kill(gunicorn_server, token, path, "--no-checksum")
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # surely changed (b"X" was data[0] 1 time in 256)

    result = run_cli("upload", str(path), "--server", gunicorn_server.url, token=token)
    assert result.returncode == 1
    assert "HTTP 422 (checksum_mismatch)" in result.stderr and "photo.raw" in result.stderr
    assert "retry" not in result.stderr
    assert UploadSession.objects.get(filename="photo.raw").status == Status.FAILED


# --- status, list, usage ------------------------------------------------------------------------


def test_status_and_list(gunicorn_server, token, user, tmp_path):
    done, data = write_file(tmp_path, "done.bin", 3000)
    assert run_cli("upload", str(done), "--server", gunicorn_server.url, "-q", token=token).returncode == 0
    pending = requests.post(f"{gunicorn_server.url}/api/uploads/", json={"filename": "pending.bin", "size": 4000},
                            headers={"Authorization": f"Token {token}"}, timeout=10).json()
    complete = UploadSession.objects.get(filename="done.bin")

    result = run_cli("status", pending["id"], str(done), "--server", gunicorn_server.url, token=token)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{pending['id']}  pending.bin  0/4000  0.0%  partial",
        f"{complete.pk}  done.bin  3000/3000  100.0%  complete",
    ]
    missing = run_cli("status", "00000000-0000-0000-0000-000000000000", "--server", gunicorn_server.url, token=token)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr

    # Enough rows for two pages (50 a page): `list` follows `next`.
    UploadSession.objects.bulk_create(
        UploadSession(owner=user, filename=f"bulk-{i}.bin", size=10, status=Status.FAILED) for i in range(55)
    )
    table = run_cli("list", "--server", gunicorn_server.url, token=token)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "DONE", "SIZE", "UPDATED", "FILENAME"]
    assert len(lines) == 1 + 57
    assert any(line.startswith(pending["id"]) and "partial" in line and line.endswith("pending.bin") for line in lines)

    partial = run_cli("list", "--status", "partial", "--json", "--server", gunicorn_server.url, token=token)
    assert [u["id"] for u in json_lines(partial.stdout)] == [pending["id"]]
    named = run_cli("list", "--filename", "done.bin", "--json", "--server", gunicorn_server.url, token=token)
    assert [u["sha256"] for u in json_lines(named.stdout)] == [sha256(data)]


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (["upload", "x.bin"], None, "no API token: pass --token TOKEN or set UPLOADS_TOKEN"),
        (["upload", "missing.bin"], "t", "missing.bin: no such file"),
        (["upload", "tests", "--chunk-size", "8XB"], "t", "invalid size '8XB'"),
        (["list", "--status", "done"], "t", "invalid choice: 'done'"),
        (["status"], "t", "the following arguments are required"),
        (["upload", "README.md", "--server", "localhost:8000"], "t", "--server must be an http(s) URL"),
    ],
)
def test_usage_errors_exit_2(args, token, message):
    result = run_cli(*args, token=token, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_token_option_overrides_a_missing_environment(gunicorn_server, token):
    result = run_cli("list", "--token", token, "--server", gunicorn_server.url, token=None)
    assert result.returncode == 0, result.stderr


# --- Pure functions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("8MiB", 8 * MiB), ("8M", 8 * MiB), ("8mb", 8 * MiB), ("512K", 512 * 1024), ("1048576", MiB),
     ("1.5G", 3 * 512 * MiB), ("100B", 100), (" 2 MiB ", 2 * MiB)],
)
def test_parse_size(text, size):
    assert client.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "8 XB", "1.5", "MiB", "0.1K"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="invalid size"):
        client.parse_size(text)


def test_backoff_is_exponential_jittered_capped_and_honours_retry_after():
    assert client.backoff_delay(1, rng=lambda: 0.0) == 0.25
    assert client.backoff_delay(1, rng=lambda: 1.0) == 0.5
    assert client.backoff_delay(4, rng=lambda: 1.0) == 4.0
    assert client.backoff_delay(20, rng=lambda: 1.0) == client.BACKOFF_CAP
    assert client.backoff_delay(1, retry_after=3, rng=lambda: 0.0) == 3
    assert client.backoff_delay(1, retry_after=10**6, rng=lambda: 0.0) == client.RETRY_AFTER_CAP
    assert client.parse_retry_after("7") == 7
    assert client.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert client.parse_retry_after("soon") is None and client.parse_retry_after(None) is None
