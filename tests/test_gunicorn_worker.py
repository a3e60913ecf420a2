"""project/gunicorn_worker.py under a real gunicorn (project/gunicorn.py), serving tests/gunicorn_app.py."""
from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from .server import _free_port, spawn_gunicorn


@pytest.fixture
def start(tmp_path):
    """`start(threads=..., linger=...)`: one gunicorn worker serving the thread-id app."""
    servers = []

    def start(*, threads: int, linger: float) -> int:
        port = _free_port()
        env = {
            "PATH": "/usr/bin:/bin", "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": str(threads), "GUNICORN_LINGER": str(linger),
        }
        log = tmp_path / f"gunicorn-{port}.log"
        servers.append(spawn_gunicorn("tests.gunicorn_app:application", env, port, log, tmp_path / "unused"))
        return port

    yield start
    for server in servers:
        server.stop()


def _get(connection: http.client.HTTPConnection) -> str:
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200
    return response.read().decode()


def test_back_to_back_requests_on_a_connection_are_served_by_one_thread(start):
    port = start(threads=4, linger=2)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    threads = {_get(connection) for _ in range(30)}
    connection.close()
    assert len(threads) == 1


def test_a_connection_that_pauses_longer_than_the_linger_is_still_served(start):
    port = start(threads=4, linger=0.05)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        _get(connection)
        time.sleep(0.2)  # back to gthread's main loop, then to a thread again
    connection.close()


def test_pipelined_requests_are_all_answered(start):
    port = start(threads=2, linger=2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
        received = b""
        while received.count(b"HTTP/1.1 200") < 3:
            data = sock.recv(65536)
            assert data, received
            received += data


def test_a_waiting_connection_gets_the_thread_of_a_busy_one(start):
    """One thread; a client sending requests back to back must not keep a second client waiting
    until it pauses."""
    port = start(threads=1, linger=5)
    busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    _get(busy)
    stop = threading.Event()
    errors = []

    def keep_busy() -> None:
        try:
            deadline = time.monotonic() + 8
            while not stop.is_set() and time.monotonic() < deadline:
                _get(busy)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=keep_busy)
    thread.start()
    try:
        time.sleep(0.3)
        began = time.monotonic()
        other = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        _get(other)
        waited = time.monotonic() - began
        other.close()
    finally:
        stop.set()
        thread.join()
    busy.close()
    assert not errors
    assert waited < 2  # without the check: until the busy client stops, 8 s


def test_a_client_that_closes_during_the_linger_frees_the_thread(start):
    port = start(threads=1, linger=5)
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    _get(first)
    first.close()  # while the only thread waits up to 5 s for its next request
    began = time.monotonic()
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    _get(second)
    second.close()
    assert time.monotonic() - began < 2
