"""End to end over real HTTP: gunicorn, the REST API, an interrupted chunk, resume by name."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from uploads.models import UploadSession

pytestmark = pytest.mark.live
MiB = 1024 * 1024


def _create(server, token, name, size):
    return requests.post(
        f"{server.url}/api/uploads/", json={"filename": name, "size": size},
        headers={"Authorization": f"Token {token}"}, timeout=10,
    )


def _put(url, token, data, start, size):
    return requests.put(
        url, data=data, timeout=30,
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(data) - 1}/{size}",
        },
    )


def _open_raw_put(url: str, token: str, start: int, length: int, size: int) -> socket.socket:
    """A PUT whose headers declare `length` bytes; the caller sends as much of the body as it likes."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(
        f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Token {token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Range: bytes {start}-{start + length - 1}/{size}\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def _send_and_cut(url: str, token: str, data: bytes, start: int, size: int, send: int) -> None:
    """Declare the whole chunk, send only `send` bytes, then drop the connection (laptop lid shut)."""
    with _open_raw_put(url, token, start, len(data), size) as sock:
        sock.sendall(data[:send])
        time.sleep(1.5)  # let the server commit what it has (UPLOADS_COMMIT_INTERVAL is 1 s)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)  # the 400 for the short body, or nothing


def test_upload_interrupt_and_resume_by_name(gunicorn_server, token):
    chunk = 4 * MiB
    source = os.urandom(18 * MiB + 12345)
    size = len(source)

    created = _create(gunicorn_server, token, "holiday.mov", size)
    assert created.status_code == 201, created.text
    url = created.json()["url"]

    # Two whole chunks, acknowledged.
    for start in (0, chunk):
        response = _put(url, token, source[start : start + chunk], start, size)
        assert response.status_code == 200, response.text
        assert response.json()["offset"] == start + chunk

    # The third chunk breaks off after 3 MiB of 4.
    _send_and_cut(url, token, source[2 * chunk : 3 * chunk], 2 * chunk, size, send=3 * MiB)

    # The client comes back knowing only the file's name and size, and learns the offset.
    deadline = time.monotonic() + 10
    while True:
        resumed = _create(gunicorn_server, token, "holiday.mov", size)
        assert resumed.status_code == 200, resumed.text
        offset = resumed.json()["offset"]
        if offset > 2 * chunk or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resumed.json()["id"] == created.json()["id"]
    # What the server durably received of the broken chunk was kept (committed as it streamed).
    assert 2 * chunk < offset <= 2 * chunk + 3 * MiB

    # Send only the rest, adopting the server's offset on a 409.
    while offset < size:
        response = _put(url, token, source[offset : offset + chunk], offset, size)
        if response.status_code == 409:
            offset = response.json()["offset"]
            continue
        assert response.status_code == 200, response.text
        offset = response.json()["offset"]
    assert response.json()["status"] == "complete"
    assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()

    download = requests.get(response.json()["content_url"], headers={"Authorization": f"Token {token}"}, timeout=30)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == hashlib.sha256(source).hexdigest()
    upload = UploadSession.objects.get(pk=created.json()["id"])
    assert upload.status == "complete" and upload.offset == size


def test_chunked_body_without_length_is_refused(gunicorn_server, token):
    """Django reads a chunked body as empty (ticket 35838): never ack it as an empty success."""
    created = _create(gunicorn_server, token, "c.bin", 10).json()

    def body():
        yield b"0123456789"

    response = requests.put(
        created["url"], data=body(), timeout=10,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/octet-stream",
                 "Content-Range": "bytes 0-9/10"},
    )
    assert response.status_code == 411, response.text
    assert UploadSession.objects.get(pk=created["id"]).offset == 0


def test_a_stalled_connection_does_not_hold_the_upload(start_gunicorn, token):
    """The laptop lid closes mid-chunk: the connection stays half-open and sends nothing more.
    After UPLOADS_BODY_TIMEOUT the server keeps what arrived and frees the upload on its own, with
    no other request asking it to (that path is the next test)."""
    server = start_gunicorn(UPLOADS_BODY_TIMEOUT="2", UPLOADS_LOCK_TIMEOUT="1")
    source = os.urandom(6 * MiB)
    created = _create(server, token, "lid.bin", len(source)).json()
    stalled = _open_raw_put(created["url"], token, 0, len(source), len(source))
    try:
        stalled.sendall(source[: 2 * MiB])  # then silence, connection left open
        _wait_until_writing(created["id"])
        time.sleep(2 + 1)  # the body timeout, and a second for the holder to commit and let go
        offset = requests.get(created["url"], headers={"Authorization": f"Token {token}"}, timeout=10).json()["offset"]
        assert 0 < offset <= 2 * MiB  # what had arrived was kept
        response = _put(created["url"], token, source[offset:], offset, len(source))
        assert response.status_code == 200, response.text  # at once: nothing holds the upload
        assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
        assert "asked this one to stop" not in server.output()
    finally:
        stalled.close()


def test_a_stalled_request_is_released_for_the_resume(start_gunicorn, token):
    """The same, but the client comes back before the body timeout: its resume asks the stalled
    request to let go (TUS.md N7, for the REST API too) instead of waiting or getting 423."""
    server = start_gunicorn(UPLOADS_BODY_TIMEOUT="30")
    source = os.urandom(6 * MiB)
    created = _create(server, token, "lid.bin", len(source)).json()
    stalled = _open_raw_put(created["url"], token, 0, len(source), len(source))
    try:
        stalled.sendall(source[: 2 * MiB])
        _wait_until_writing(created["id"])
        started = time.monotonic()
        response = _put(created["url"], token, source, 0, len(source))  # a retry from where it began
        assert time.monotonic() - started < 3
        assert response.status_code == 409, response.text  # the stalled request's bytes were kept
        offset = response.json()["offset"]
        assert 0 < offset <= 2 * MiB
        response = _put(created["url"], token, source[offset:], offset, len(source))
        assert response.status_code == 200, response.text
        assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
        assert "asked this one to stop" in server.output()
    finally:
        stalled.close()


def _wait_until_writing(upload_id: str) -> None:
    """Until the stalled request is the writer: it commits as it streams."""
    deadline = time.monotonic() + 10
    while UploadSession.objects.get(pk=upload_id).offset == 0:
        assert time.monotonic() < deadline, "the stalled request never started writing"
        time.sleep(0.05)


def test_uploads_go_on_when_redis_is_down(start_gunicorn, token):
    """Redis is only the running-total cache: with it unreachable, uploads still complete."""
    server = start_gunicorn(UPLOADS_REDIS_URL="redis://127.0.0.1:1/0")
    source = os.urandom(3 * MiB)
    created = _create(server, token, "no-redis.bin", len(source))
    assert created.status_code == 201, created.text
    offset = 0
    while offset < len(source):
        response = _put(created.json()["url"], token, source[offset : offset + MiB], offset, len(source))
        assert response.status_code == 200, response.text
        offset = response.json()["offset"]
    assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()


def test_worker_killed_mid_chunk_then_resume(start_gunicorn, token, media_root):
    """kill -9 of the worker while a chunk streams: no ack was sent, what was committed is on
    disk, the lock died with the process, and the client finishes from the server's offset."""
    from uploads import storage

    server = start_gunicorn(WEB_CONCURRENCY="1")
    source = os.urandom(8 * MiB)
    created = _create(server, token, "crash.bin", len(source)).json()
    with _open_raw_put(created["url"], token, 0, len(source), len(source)) as sock:
        sock.sendall(source[: 5 * MiB])
        deadline = time.monotonic() + 10
        while UploadSession.objects.get(pk=created["id"]).offset < 2 * MiB:  # it commits as it streams
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for pid in server.workers():
            os.kill(pid, 9)
        sock.settimeout(5)
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""  # the kernel resets a connection closed with unread data: no response either
        assert reply == b"", "no response (so no acknowledgement) after the kill"

    upload = UploadSession.objects.get(pk=created["id"])
    on_disk = storage.partial_size(upload.pk)
    assert 2 * MiB <= upload.offset <= on_disk <= 5 * MiB  # INV1 right after the crash
    assert storage.partial_path(upload.pk).read_bytes()[: upload.offset] == source[: upload.offset]

    # The master starts a new worker; the client resumes by name and sends the rest.
    deadline = time.monotonic() + 15
    while True:
        try:
            resumed = _create(server, token, "crash.bin", len(source))
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    offset = resumed.json()["offset"]
    assert offset == upload.offset
    response = _put(created["url"], token, source[offset:], offset, len(source))
    assert response.status_code == 200, response.text
    assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
