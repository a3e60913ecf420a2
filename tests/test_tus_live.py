"""tus under a real gunicorn: what only a real server and real sockets show.

A half-dead PATCH released by a newer request (TUS.md N7, C7), chunked bodies without
Content-Length (D11), an interrupted PATCH keeping its bytes (D9), and the proxy-facing
Location (E9). The protocol's rules themselves are in test_tus.py, real clients in
test_tus_clients.py.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import pytest
import requests
from rest_framework.authtoken.models import Token

from uploads.models import Status, UploadSession

from .invariants import assert_invariants

pytestmark = pytest.mark.live
MiB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


@pytest.fixture
def headers(user):
    return {**TUS, "Authorization": f"Token {Token.objects.create(user=user).key}"}


def _create(server, headers, size: int | None) -> str:
    length = {"Upload-Length": str(size)} if size is not None else {"Upload-Defer-Length": "1"}
    response = requests.post(f"{server.url}/files/", headers={**headers, **length}, timeout=10)
    assert response.status_code == 201, response.text
    return response.headers["Location"]


def _row(url: str) -> UploadSession:
    return UploadSession.objects.get(pk=uuid.UUID(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]))


def _head(url, headers) -> requests.Response:
    return requests.head(url, headers=headers, timeout=30)


def _patch(url, headers, data: bytes, offset: int, **extra) -> requests.Response:
    return requests.patch(
        url, data=data, timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": str(offset), **extra},
    )


def _open_raw_patch(url: str, headers: dict, offset: int, length: int) -> socket.socket:
    """A PATCH whose headers declare `length` bytes; the caller sends as much body as it likes."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    lines = [f"PATCH {parts.path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Type: {OCTETS}",
             f"Upload-Offset: {offset}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _wait_for_offset(url, headers, at_least: int, timeout: float = 10) -> None:
    """Wait until the server has committed `at_least` bytes (REST GET takes no lock)."""
    rest = url.replace("/files/", "/api/uploads/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(rest, headers=headers, timeout=10)
        if response.json()["offset"] >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"the server never committed {at_least} bytes")


@pytest.mark.parametrize("newcomer", ["HEAD", "PATCH"])
def test_a_half_dead_patch_is_released_for_a_newer_request(gunicorn_server, headers, newcomer):
    """N7/C7: the old PATCH holds the upload with its connection open and silent (a laptop lid
    closed). A new HEAD or PATCH does not wait for the 30 s body timeout or get 423: the holder
    is asked to stop, commits what it has, and the newcomer is served within a few seconds."""
    data = os.urandom(8 * MiB)
    url = _create(gunicorn_server, headers, len(data))
    sent = 3 * MiB
    with _open_raw_patch(url, headers, 0, len(data)) as stale:
        stale.sendall(data[:sent])
        _wait_for_offset(url, headers, at_least=1)  # the holder is streaming and has the lock
        committed_before = _row(url).offset

        started = time.monotonic()
        if newcomer == "HEAD":
            response = _head(url, headers)
            assert response.status_code == 200
            offset = int(response.headers["Upload-Offset"])
        else:
            response = _patch(url, headers, data[:MiB], 0)  # a retry from the offset it knew
            assert response.status_code == 409
            offset = int(response.headers["Upload-Offset"])
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"the newcomer waited {elapsed:.1f}s"
        # The holder committed what it had read before it stopped. Bytes still in the kernel's
        # socket buffer when its read side is shut are not read: never acknowledged, sent again.
        assert committed_before <= offset <= sent

        # The stale request was told it was stopped (if its client still listens).
        stale.settimeout(5)
        reply = stale.recv(65536)
        assert reply.startswith(b"HTTP/1.1 409"), reply[:200]
        assert b"released" in reply

    assert_invariants(_row(url), data, acked=offset)
    response = _patch(url, headers, data[offset:], offset)
    assert response.status_code == 204, response.text
    assert int(response.headers["Upload-Offset"]) == len(data)
    row = assert_invariants(_row(url), data, acked=len(data))
    assert row.status == Status.COMPLETE
    assert "a newer request asked this one to stop" in gunicorn_server.output()


def test_delete_during_a_patch_stops_it_and_leaves_nothing_behind(gunicorn_server, headers, media_root):
    """J5: termination while a PATCH streams aborts the PATCH; no half-written state remains."""
    data = os.urandom(4 * MiB)
    url = _create(gunicorn_server, headers, len(data))
    with _open_raw_patch(url, headers, 0, len(data)) as stale:
        stale.sendall(data[: 2 * MiB])
        _wait_for_offset(url, headers, at_least=1)
        started = time.monotonic()
        response = requests.delete(url, headers=headers, timeout=30)
        assert response.status_code == 204
        assert time.monotonic() - started < 3
    assert _head(url, headers).status_code == 404
    assert not UploadSession.objects.filter(pk=_row_id(url)).exists()
    assert list((media_root / "partial").glob("*")) == []


def _row_id(url: str) -> uuid.UUID:
    return uuid.UUID(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])


def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_a_chunked_patch_without_content_length_is_streamed(gunicorn_server, headers):
    """D11: gunicorn frames a chunked body itself (wsgi.input_terminated), so it is read to its
    end and stored: not a 204 with an unchanged offset, and not a 411 either."""
    data = os.urandom(5 * MiB + 123)
    url = _create(gunicorn_server, headers, len(data))
    response = requests.patch(
        url, data=_chunks(data[:3 * MiB], 256 * 1024), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": "0"},
    )
    assert response.status_code == 204, response.text
    assert response.headers["Upload-Offset"] == str(3 * MiB)
    response = requests.patch(
        url, data=_chunks(data[3 * MiB:], 100_000), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": str(3 * MiB)},
    )
    assert response.status_code == 204, response.text
    assert response.headers["Upload-Offset"] == str(len(data))
    row = assert_invariants(_row(url), data, acked=len(data))
    assert row.status == Status.COMPLETE


def test_a_chunked_patch_longer_than_the_upload_is_413_and_writes_nothing_past_it(gunicorn_server, headers):
    """D7 without Content-Length: the body may not run past Upload-Length. The overlong request
    is refused when its end shows; what it had committed while streaming (every
    UPLOADS_COMMIT_BYTES, 1 MiB here) stays, as for any interrupted request, and nothing else."""
    data = os.urandom(2 * MiB)
    url = _create(gunicorn_server, headers, len(data))
    response = requests.patch(
        url, data=_chunks(data + b"one byte too many"[:1], 64 * 1024), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": "0"},
    )
    assert response.status_code == 413, response.text
    offset = int(_head(url, headers).headers["Upload-Offset"])
    assert offset == int(response.json()["offset"]) < len(data)
    assert_invariants(_row(url), data)  # the file holds exactly the committed prefix, nothing past it
    # The honest rest then completes.
    response = requests.patch(
        url, data=_chunks(data[offset:], 64 * 1024), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": str(offset)},
    )
    assert response.status_code == 204
    assert assert_invariants(_row(url), data, acked=len(data)).status == Status.COMPLETE


def test_a_chunked_patch_with_deferred_length(gunicorn_server, headers):
    """D11 + G3: a stream of unknown length, its length declared with the last PATCH."""
    data = os.urandom(3 * MiB + 7)
    url = _create(gunicorn_server, headers, None)
    response = requests.patch(
        url, data=_chunks(data[:MiB], 50_000), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": "0"},
    )
    assert response.status_code == 204 and response.headers["Upload-Offset"] == str(MiB)
    assert _head(url, headers).headers["Upload-Defer-Length"] == "1"
    response = requests.patch(
        url, data=_chunks(data[MiB:], 50_000), timeout=30,
        headers={**headers, "Content-Type": OCTETS, "Upload-Offset": str(MiB), "Upload-Length": str(len(data))},
    )
    assert response.status_code == 204 and response.headers["Upload-Offset"] == str(len(data))
    head = _head(url, headers)
    assert head.headers["Upload-Length"] == str(len(data)) and "Upload-Defer-Length" not in head.headers
    row = assert_invariants(_row(url), data, acked=len(data))
    assert row.status == Status.COMPLETE and row.sha256 == hashlib.sha256(data).hexdigest()


def test_an_interrupted_patch_keeps_what_arrived(gunicorn_server, headers):
    """D9: the client sends N of M bytes and drops the connection: HEAD then shows the bytes
    received, and a PATCH from there completes the upload."""
    data = os.urandom(4 * MiB)
    url = _create(gunicorn_server, headers, len(data))
    with _open_raw_patch(url, headers, 0, len(data)) as sock:
        sock.sendall(data[: 3 * MiB])
        time.sleep(1.5)  # let the server read and commit what was sent
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        sock.recv(65536)
    offset = int(_head(url, headers).headers["Upload-Offset"])
    assert offset == 3 * MiB
    assert_invariants(_row(url), data, acked=offset)
    # A dropped client is routine: a warning, not an ERROR for every 5xx (error trackers listen there).
    assert "The body ended after" in gunicorn_server.output()
    assert "ERROR" not in gunicorn_server.output()
    response = _patch(url, headers, data[offset:], offset)
    assert response.status_code == 204
    assert assert_invariants(_row(url), data, acked=len(data)).status == Status.COMPLETE


def test_location_behind_a_tls_proxy(start_gunicorn, headers):
    """E9/N1: behind a proxy that sets X-Forwarded-Host/-Proto, Location points at the proxy."""
    server = start_gunicorn(USE_X_FORWARDED="1", ALLOWED_HOSTS="uploads.example,127.0.0.1")
    response = requests.post(
        f"{server.url}/files", timeout=10,
        headers={**headers, "Upload-Length": "5", "X-Forwarded-Host": "uploads.example",
                 "X-Forwarded-Proto": "https"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"].startswith("https://uploads.example/files/")


def _final_status(sock: socket.socket) -> tuple[int, bytes]:
    """Read responses until a final (non-1xx) status line; return it and everything read."""
    received = b""
    sock.settimeout(10)
    while True:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
        for line in received.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 ") and not line.startswith(b"HTTP/1.1 1"):
                return int(line.split()[1]), received


@pytest.mark.parametrize(
    ("length", "credentials", "status"),
    [("99999999999999", True, 413), ("5", False, 401)],
    ids=["too-large", "no-credentials"],
)
def test_expect_100_continue_gets_the_error_before_the_body_is_sent(
    gunicorn_server, headers, length, credentials, status
):
    """F6: a client that waits for `100 Continue` learns about a 413 or 401 without uploading."""
    parts = urlsplit(gunicorn_server.url)
    lines = [
        "POST /files/ HTTP/1.1", f"Host: {parts.netloc}", "Tus-Resumable: 1.0.0", f"Upload-Length: {length}",
        f"Content-Type: {OCTETS}", "Content-Length: 5", "Expect: 100-continue",
    ]
    if credentials:
        lines.append(f"Authorization: {headers['Authorization']}")
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        code, received = _final_status(sock)  # no body byte was sent
    assert code == status, received
    assert b"Tus-Resumable: 1.0.0" in received
    assert UploadSession.objects.count() == 0
