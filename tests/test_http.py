"""Request-body plumbing: the declared length (ticket 35838) and an interruptible body stream (TUS.md N7)."""
from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from django.http import HttpRequest
from django.test import RequestFactory
from rest_framework.request import Request

from uploads.exceptions import InvalidRequest, LengthRequired
from uploads.http import GUNICORN_SOCKET, BodyStream, body_stream, content_length

# --- content_length -------------------------------------------------------------------------------


def _request(**meta: object) -> HttpRequest:
    request = HttpRequest()
    request.META.update(meta)
    return request


@pytest.mark.parametrize("allow_unframed", [False, True])
@pytest.mark.parametrize("raw, expected", [("0", 0), ("10", 10), ("1048576", 1048576)])
def test_content_length_is_the_declared_length(allow_unframed, raw, expected):
    assert content_length(_request(CONTENT_LENGTH=raw), allow_unframed=allow_unframed) == expected


def test_a_declared_length_wins_over_an_unframed_body():
    # gunicorn may set wsgi.input_terminated on every request: a Content-Length still frames the body.
    request = _request(CONTENT_LENGTH="5", **{"wsgi.input_terminated": True})
    assert content_length(request, allow_unframed=True) == 5
    assert content_length(request) == 5


@pytest.mark.parametrize("raw", [None, ""])
def test_unframed_body_is_accepted_only_when_the_server_ends_it(raw):
    meta = {"wsgi.input_terminated": True}
    if raw is not None:
        meta["CONTENT_LENGTH"] = raw
    assert content_length(_request(**meta), allow_unframed=True) is None


@pytest.mark.parametrize(
    "meta, allow_unframed",
    [
        ({}, False),
        ({}, True),  # the server does not mark the end: Django would read the body as empty
        ({"CONTENT_LENGTH": ""}, True),
        ({"wsgi.input_terminated": False}, True),
        ({"wsgi.input_terminated": True}, False),  # the caller does not take unframed bodies
        ({"CONTENT_LENGTH": "", "wsgi.input_terminated": True}, False),
    ],
)
def test_missing_length_is_411(meta, allow_unframed):
    with pytest.raises(LengthRequired) as excinfo:
        content_length(_request(**meta), allow_unframed=allow_unframed)
    assert excinfo.value.status_code == 411


@pytest.mark.parametrize("raw", ["-1", "+5", " 5", "5.0", "0x10", "٣", "1" * 20, "abc"])
@pytest.mark.parametrize("allow_unframed", [False, True])
def test_malformed_length_is_400(raw, allow_unframed):
    request = _request(CONTENT_LENGTH=raw, **{"wsgi.input_terminated": True})
    with pytest.raises(InvalidRequest) as excinfo:
        content_length(request, allow_unframed=allow_unframed)
    assert excinfo.value.status_code == 400


# --- BodyStream -----------------------------------------------------------------------------------


def test_body_stream_reads_its_source():
    stream = BodyStream(io.BytesIO(b"hello world"), None)
    assert stream.read(5) == b"hello"
    assert stream.read(100) == b" world"
    assert stream.read(100) == b""
    assert not stream.interrupted


def test_after_interrupt_reads_return_nothing():
    # Even bytes already waiting are not read: the holder stops at once and commits what it has.
    stream = BodyStream(io.BytesIO(b"hello world"), None)
    assert stream.read(5) == b"hello"
    stream.interrupt()
    assert stream.interrupted
    assert stream.read(5) == b""
    assert stream.read(5) == b""


def test_interrupt_twice_is_harmless():
    stream = BodyStream(io.BytesIO(b"x"), None)
    stream.interrupt()
    stream.interrupt()
    assert stream.read(1) == b""


def test_interrupt_of_a_closed_socket_is_harmless():
    # The connection may be closed already; the watcher thread must not fail on it.
    ours, peer = socket.socketpair()
    ours.close()
    peer.close()
    stream = BodyStream(io.BytesIO(b"x"), ours)
    stream.interrupt()
    assert stream.read(1) == b""


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    client.settimeout(None)
    return accepted, client


@pytest.fixture(params=["socketpair", "tcp"])
def connection_pair(request) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of a connection: a Unix socketpair, and a loopback TCP connection
    like the one gunicorn hands over."""
    ours, peer = socket.socketpair() if request.param == "socketpair" else _tcp_pair()
    ours.settimeout(None)  # block like a half-open connection with no body timeout
    try:
        yield ours, peer
    finally:
        # Closing the peer also ends a read the test failed to wake, so no thread is left behind.
        peer.close()
        ours.close()


class BlockedReader(threading.Thread):
    def __init__(self, stream: BodyStream, size: int) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.size = size
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.returned_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.stream.read(self.size)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
        self.returned_at = time.monotonic()


def test_interrupt_wakes_a_read_blocked_on_a_silent_client(connection_pair):
    # A client whose laptop lid closed sends nothing and never closes: the read would block for
    # ever, holding the upload's lock. interrupt() from another thread must end it promptly.
    ours, peer = connection_pair
    reader_file = ours.makefile("rb")
    stream = BodyStream(reader_file, ours)
    peer.sendall(b"0123")  # part of a body arrived, then the client went silent
    reader = BlockedReader(stream, 10)
    reader.start()
    reader.join(0.3)
    assert reader.is_alive(), f"the read should be blocked waiting for more bytes: {reader.result!r}"

    interrupted_at = time.monotonic()
    stream.interrupt()
    reader.join(2)

    assert not reader.is_alive(), "interrupt() did not wake the blocked read"
    assert reader.error is None, reader.error
    assert reader.returned_at - interrupted_at < 1.0
    assert reader.result == b"0123"  # what had arrived is returned, then the body ends
    assert stream.read(10) == b""
    reader_file.close()


def test_interrupt_shuts_only_the_read_side(connection_pair):
    # The interrupted request still answers its client (e.g. 409 with the committed offset).
    ours, peer = connection_pair
    stream = BodyStream(ours.makefile("rb"), ours)
    stream.interrupt()
    ours.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    peer.settimeout(5)
    assert peer.recv(100) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_interrupt_after_the_client_went_away_is_harmless(connection_pair):
    ours, peer = connection_pair
    peer.close()
    stream = BodyStream(ours.makefile("rb"), ours)
    stream.interrupt()
    assert stream.read(10) == b""


def test_interrupt_shuts_the_sockets_read_side(connection_pair):
    ours, peer = connection_pair
    stream = BodyStream(ours.makefile("rb"), ours)
    stream.interrupt()
    ours.settimeout(2)
    # A read straight from the socket (not through the stream) sees the end at once, not a timeout.
    assert ours.recv(10) == b""


# --- body_stream ----------------------------------------------------------------------------------

OCTET = "application/octet-stream"


def _read_to_end(stream: BodyStream) -> bytes:
    blocks = []
    for _ in range(1000):
        block = stream.read(4)
        if not block:
            return b"".join(blocks)
        blocks.append(block)
    pytest.fail("the body never ended")


def test_body_stream_reads_the_framed_body():
    request = RequestFactory().put("/x", data=b"hello world", content_type=OCTET)
    assert _read_to_end(body_stream(request)) == b"hello world"


def test_body_stream_reads_through_a_drf_request():
    request = Request(RequestFactory().put("/x", data=b"hello world", content_type=OCTET))
    assert _read_to_end(body_stream(request)) == b"hello world"


def test_unframed_body_stream_reads_the_raw_wsgi_input():
    # Without Content-Length Django's own stream is empty (ticket 35838); the server ends the raw input.
    request = RequestFactory().generic("PUT", "/x", content_type=OCTET)
    request.META["wsgi.input"] = io.BytesIO(b"a chunked body")
    request.META["wsgi.input_terminated"] = True
    assert _read_to_end(body_stream(request, unframed=True)) == b"a chunked body"


def test_body_stream_sets_the_idle_timeout_on_the_servers_socket(settings, connection_pair):
    settings.UPLOADS_BODY_TIMEOUT = 7
    ours, _ = connection_pair
    request = RequestFactory().put("/x", data=b"x", content_type=OCTET, **{GUNICORN_SOCKET: ours})
    stream = body_stream(request)
    assert ours.gettimeout() == 7
    stream.interrupt()  # and it is the socket an interrupt shuts down
    ours.settimeout(2)
    assert ours.recv(1) == b""


def test_body_stream_without_a_body_timeout_leaves_the_socket_alone(settings, connection_pair):
    settings.UPLOADS_BODY_TIMEOUT = 0
    ours, _ = connection_pair
    request = RequestFactory().put("/x", data=b"x", content_type=OCTET, **{GUNICORN_SOCKET: ours})
    body_stream(request)
    assert ours.gettimeout() is None


def test_body_stream_ignores_a_socket_entry_that_is_not_a_socket():
    request = RequestFactory().put("/x", data=b"abc", content_type=OCTET, **{GUNICORN_SOCKET: object()})
    stream = body_stream(request)
    stream.interrupt()  # nothing to shut down, and no error
    assert stream.read(3) == b""


def test_an_interruption_after_the_whole_body_was_read_changes_nothing():
    """The request ends on its own; shutting the socket then would break the kept-alive
    connection for the client's next request (found by the chaos run)."""
    import socket as socket_module

    server, client = socket_module.socketpair()
    with server, client:
        stream = BodyStream(io.BytesIO(b"abcdef"), server, length=6)
        assert stream.read(4) == b"abcd" and stream.read(4) == b"ef"
        stream.interrupt()
        assert not stream.interrupted
        client.sendall(b"next request")
        assert server.recv(64) == b"next request"  # the read side is still open


def test_an_interruption_before_the_end_still_stops_the_body():
    stream = BodyStream(io.BytesIO(b"abcdef"), None, length=6)
    assert stream.read(2) == b"ab"
    stream.interrupt()
    assert stream.interrupted and stream.read(4) == b""


def test_a_trickling_body_is_stalled_and_can_be_cut(settings):
    """RELIABILITY H5: one byte now and then never trips a per-read socket timeout, but a piece of
    the body taking longer than UPLOADS_BODY_TIMEOUT counts as stalled; cutting it ends the read
    with what arrived."""
    import socket as socket_module
    import threading
    import time

    settings.UPLOADS_BODY_TIMEOUT = 0.3
    server, client = socket_module.socketpair()
    with server, client:
        stream = BodyStream(server.makefile("rb"), server, length=100)
        result = []
        reader = threading.Thread(target=lambda: result.append(stream.read(100)))
        reader.start()
        client.sendall(b"x")
        time.sleep(0.1)
        assert not stream.stalled()
        time.sleep(0.4)
        assert stream.stalled()
        stream.cut()
        reader.join(2)
        assert not reader.is_alive() and result == [b"x"]
        assert stream.cut_off and not stream.interrupted


def test_a_slow_body_is_handed_over_every_commit_interval(settings):
    """RELIABILITY A6/X4: a read of a whole block from a slow client returns what arrived once
    UPLOADS_COMMIT_INTERVAL has passed, so the engine commits it; otherwise a client slower than one
    block per worker timeout would lose every attempt's bytes to the kill, for ever."""
    import time

    settings.UPLOADS_COMMIT_INTERVAL = 0.2

    class Slow(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            time.sleep(0.05)
            return b"p" * 1000  # a 64 KiB piece's worth would take 3.3 s at this rate

    stream = BodyStream(Slow(), None, length=10**6)
    started = time.monotonic()
    block = stream.read(1024 * 1024)
    # Without the early return this read would take 50 s (a whole MiB at 20 KB/s).
    assert 1000 <= len(block) < 10**6 and time.monotonic() - started < 10
    assert stream.read(1000) == b"p" * 1000  # and reading goes on


def test_a_broken_connection_after_some_pieces_hands_over_what_arrived_first():
    """Reading a block piece by piece must not lose the pieces read before the connection broke."""

    class Breaks(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 1:
                return b"abcd"
            raise ConnectionResetError("client went away")

    stream = BodyStream(Breaks(), None, length=10)
    assert stream.read(10) == b"abcd"
    with pytest.raises(ConnectionResetError):
        stream.read(6)


# --- DirectBody: gunicorn's body read straight from the socket ------------------------------------


def _gunicorn_body(sock, length: int, *, buffered: bytes = b"", held: bytes = b""):
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader

    unreader = SocketUnreader(sock)
    unreader.unread(buffered)  # what gunicorn received with the headers
    body = Body(LengthReader(unreader, length - len(held)))
    body.buf.write(held)  # what an earlier read took from the reader and kept
    return body


def test_direct_body_reads_exactly_the_body_and_leaves_the_next_request():
    import socket as socket_module

    from uploads.http import DirectBody

    server, client = socket_module.socketpair()
    with server, client:
        body = _gunicorn_body(server, 10, buffered=b"cdef", held=b"ab")
        direct = DirectBody.of(body, server)
        client.sendall(b"ghij" + b"GET /next HTTP/1.1\r\n")
        received = b""
        while piece := direct.read(3):
            received += piece
        assert received == b"abcdefghij"
        assert body.reader.length == 0 and not body.failed
        # gunicorn finds the connection at the next request, as if it had read the body itself.
        assert body.read(100) == b"" and body.reader.unreader.read(9) == b"GET /next"


def test_direct_body_keeps_a_pipelined_request_that_arrived_with_the_headers():
    import socket as socket_module

    from uploads.http import DirectBody

    server, client = socket_module.socketpair()
    with server, client:
        body = _gunicorn_body(server, 4, buffered=b"wxyzHEAD / HTTP/1.1\r\n")
        direct = DirectBody.of(body, server)
        assert direct.read(100) == b"wxyz" and direct.read(100) == b""
        assert body.reader.unreader.read(4) == b"HEAD"


def test_direct_body_hands_over_what_arrived_before_a_broken_connection():
    import socket as socket_module

    from uploads.http import DirectBody

    server, client = socket_module.socketpair()
    with server, client:
        body = _gunicorn_body(server, 100)
        direct = DirectBody.of(body, server)
        client.sendall(b"12345")
        server.settimeout(0.2)
        assert direct.read(50) == b"12345"  # the timeout came after these arrived
        with pytest.raises(TimeoutError):
            direct.read(50)
        assert body.failed  # gunicorn must close the connection, not guess where the next request starts


def test_direct_body_is_only_for_gunicorn_bodies_of_known_length():
    import socket as socket_module

    from gunicorn.http.body import Body, EOFReader
    from gunicorn.http.unreader import SocketUnreader

    from uploads.http import DirectBody

    server, client = socket_module.socketpair()
    with server, client:
        assert DirectBody.of(io.BytesIO(b"x"), server) is None
        assert DirectBody.of(Body(EOFReader(SocketUnreader(server))), server) is None
        assert DirectBody.of(_gunicorn_body(client, 3), server) is None  # another socket
