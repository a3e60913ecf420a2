"""Request-body plumbing shared by the front ends: the declared length and a stream to read.

Chunk bytes are never read through `request.body` / `request.data` (that buffers the whole body
and is capped by DATA_UPLOAD_MAX_MEMORY_SIZE); the services read the stream in fixed blocks.
"""
from __future__ import annotations

import errno
import io
import socket
import threading
import time
from typing import BinaryIO

from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import FileResponse, HttpRequest
from django.template.defaultfilters import filesizeformat

from . import storage
from .conf import conf
from .exceptions import LengthRequired, StorageFailure, StorageFull, TooLarge, UploadError
from .models import UploadSession
from .validation import parse_non_negative_int

# gunicorn puts the client socket in the WSGI environ under this key.
GUNICORN_SOCKET = "gunicorn.socket"


def content_length(request: HttpRequest, *, allow_unframed: bool = False) -> int | None:
    """The declared body length. Without one the body cannot be trusted: Django reads a chunked
    body as empty (ticket 35838), which would look like a successful empty chunk.

    With `allow_unframed`, a body without Content-Length is accepted (None) when the server marks
    its end itself (`wsgi.input_terminated`, as gunicorn does for chunked bodies); it is then read
    to its end from the raw WSGI input.
    """
    raw = request.META.get("CONTENT_LENGTH")
    if not raw:
        if allow_unframed and request.META.get("wsgi.input_terminated"):
            return None
        raise LengthRequired("Content-Length is required; chunked request bodies are not accepted.")
    return parse_non_negative_int(raw, "Content-Length")


# The body is read from the server in pieces of this size, so "no progress" is measured per piece:
# a trickle (1 byte a second) that never lets one read time out is still cut (RELIABILITY H5).
PIECE = 64 * 1024


class BodyStream:
    """The request body, read in blocks by the engine, which another request may interrupt.

    `interrupt()` (from the lock's release watcher thread) makes the next read return b"" and
    shuts the socket's read side down, which wakes a read blocked on a half-open connection. The
    response can still be written. Once the whole body has been read, an interruption changes
    nothing: the request ends on its own, and the kept-alive connection must stay readable for
    the client's next request. A read returns early, with whole pieces, once it has taken
    UPLOADS_COMMIT_INTERVAL, so a slow body is committed as often as a fast one. `stalled()` is
    true when one piece of the body has taken longer than UPLOADS_BODY_TIMEOUT; the watcher then
    `cut()`s the body the same way, and the engine keeps what arrived (an incomplete body, not a
    release).
    """

    def __init__(self, source: BinaryIO, sock: socket.socket | None, length: int | None = None) -> None:
        self._source = source
        self._sock = sock
        self._remaining = length  # None: until the source ends (a body framed by the server)
        self._finished = False
        self._piece_started: float | None = None
        self._error: Exception | None = None
        self._hand_over_after = conf.COMMIT_INTERVAL  # read once: `read` runs for every block
        self._mutex = threading.Lock()
        self.interrupted = False  # by a newer request for the upload
        self.cut_off = False  # for making no progress

    def read(self, size: int) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        pieces = []
        began = time.monotonic()
        while size > 0 and not (self.interrupted or self.cut_off):
            if pieces and time.monotonic() - began >= self._hand_over_after:
                # A slow body: hand over what arrived, so the engine commits it on time. Else a
                # client slower than a block per worker timeout would never get past one block.
                break
            self._piece_started = time.monotonic()
            try:
                piece = self._source.read(min(PIECE, size))
            except Exception as exc:  # noqa: BLE001 - any server's broken-body error
                if not pieces:
                    raise
                # Hand over what did arrive first; the error comes with the next read.
                self._error = exc
                break
            finally:
                self._piece_started = None
            with self._mutex:
                if self._remaining is not None:
                    self._remaining -= len(piece)
                if not piece or self._remaining == 0:
                    self._finished = True
            if not piece:
                break
            pieces.append(piece)
            size -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def stalled(self) -> bool:
        started = self._piece_started
        return bool(conf.BODY_TIMEOUT) and started is not None and time.monotonic() - started > conf.BODY_TIMEOUT

    def interrupt(self) -> None:
        self._stop("interrupted")

    def cut(self) -> None:
        self._stop("cut_off")

    def _stop(self, flag: str) -> None:
        with self._mutex:
            if self._finished:
                return
            setattr(self, flag, True)
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed: the read has ended anyway


def body_stream(request: HttpRequest, *, unframed: bool = False) -> BodyStream:
    """The request body as a stream, with an idle timeout on the socket where the server allows.

    A client whose laptop lid closed leaves a half-open connection; without a timeout the worker
    would wait in recv() for ever, holding the upload's lock, and every resume would get 423.
    gunicorn has no body timeout of its own but hands us the socket; a read that stalls for
    UPLOADS_BODY_TIMEOUT seconds then raises, and the engine keeps what was durably received.
    (Behind nginx, its client_body_timeout does the same job.) A newer request for the same
    upload does not wait for that timeout: it interrupts the stream (see locks.py).

    `unframed`: the body has no Content-Length (see `content_length`); read the raw WSGI input,
    which the server ends where the chunked body ends.
    """
    django_request = getattr(request, "_request", request)
    sock = request.META.get(GUNICORN_SOCKET)
    if not isinstance(sock, socket.socket):
        sock = None
    elif conf.BODY_TIMEOUT:
        sock.settimeout(conf.BODY_TIMEOUT)
    length = None if unframed else _declared_length(request)
    # Django's own request (under DRF's wrapper) reads from a stream limited to Content-Length.
    source = request.META["wsgi.input"] if unframed else django_request
    if length is not None and sock is not None:
        source = DirectBody.of(request.META["wsgi.input"], sock) or source
    return BodyStream(source, sock, length)


class DirectBody:
    """A gunicorn request body of known length, read straight from its socket.

    gunicorn's readers pass every byte through several BytesIO buffers, about a quarter of the CPU
    time of a large upload (py-spy); this receives each piece into one buffer. It first takes the
    bytes gunicorn already holds, and keeps gunicorn's count of what is left of the body exact, so
    after the request gunicorn finds the connection at the next request, as it would have. An error
    marks the body failed, so gunicorn closes the connection rather than guess where it stands.
    """

    def __init__(self, body, sock: socket.socket) -> None:
        self._body, self._reader, self._sock = body, body.reader, sock
        held = body.buf.getvalue()  # already counted out of the body's length
        body.buf = io.BytesIO()
        buffered = self._reader.unreader.take_buffered()  # received, not yet counted
        taken = buffered[: self._reader.length]
        if len(taken) < len(buffered):
            self._reader.unreader.unread(buffered[len(taken):])  # the next request's
        self._reader.length -= len(taken)
        self._pending = held + taken
        self._error: BaseException | None = None

    @classmethod
    def of(cls, wsgi_input: object, sock: socket.socket) -> DirectBody | None:
        """A DirectBody for gunicorn's body of known length on `sock`; None for any other input."""
        reader = getattr(wsgi_input, "reader", None)
        unreader = getattr(reader, "unreader", None)
        if (
            type(reader).__name__ != "LengthReader"
            or getattr(unreader, "sock", None) is not sock
            or not isinstance(getattr(wsgi_input, "buf", None), io.BytesIO)
            or not hasattr(unreader, "take_buffered")
        ):
            return None
        return cls(wsgi_input, sock)

    def read(self, size: int) -> bytes | bytearray:
        """Up to `size` bytes: fewer only at the end of the body or of the connection."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        size = min(size, self._reader.length)
        if size <= 0:
            return b""
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        try:
            while received < size:
                count = self._sock.recv_into(view[received:])
                if not count:
                    break
                received += count
        except BaseException as exc:
            self._body.failed = True
            if not received:
                raise
            self._error = exc  # hand over what arrived first
        finally:
            self._reader.length -= received
            view.release()
        return buffer if received == size else buffer[:received]


def _declared_length(request: HttpRequest) -> int | None:
    raw = request.META.get("CONTENT_LENGTH")
    return int(raw) if raw and raw.isdigit() else None


class DiskUploadHandler(TemporaryFileUploadHandler):
    """Multipart files (the page's form without JavaScript) for settings.FILE_UPLOAD_HANDLERS.

    Every file goes to a temporary file on disk, however small (never memory); none may pass
    UPLOADS_MAX_SIZE; and a full temporary disk is a clean refusal rather than an exception in
    the middle of CSRF's form parsing (a 500). On refusal the file so far is deleted, the rest of
    the body is read and dropped (so the browser sees the error page, not a reset connection),
    and `refused` holds the error for the view to show.
    """

    refused: UploadError | None = None

    def new_file(self, *args, **kwargs) -> None:
        try:
            super().new_file(*args, **kwargs)
        except OSError as exc:
            self._refuse(_disk_error(exc))
        self._received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self._received += len(raw_data)
        if self._received > conf.MAX_SIZE:
            self._refuse(TooLarge(
                f"“{self.file_name}” is larger than the limit of {filesizeformat(conf.MAX_SIZE)} per file; "
                "nothing was stored."
            ))
        try:
            super().receive_data_chunk(raw_data, start)
        except OSError as exc:
            self._refuse(_disk_error(exc))

    def _refuse(self, error: UploadError) -> None:
        self.refused = error
        self.upload_interrupted()  # closes and deletes this file's temporary file
        raise StopUpload(connection_reset=False)


def _disk_error(exc: OSError) -> UploadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The server has no room to receive this file right now; nothing was stored. Retry later.")
    return StorageFailure("The server could not receive this file; nothing was stored. Retry later.")


def download_response(upload: UploadSession) -> FileResponse:
    """A completed upload as an attachment that no browser renders (RELIABILITY.md J1): always
    octet-stream, nosniff, and a sandboxing CSP, whoever downloads it (owner or staff).

    Raises DataLost when the stored file has gone missing.
    """
    response = FileResponse(
        storage.open_final(upload.file),
        as_attachment=True,
        filename=upload.filename,  # Django builds an RFC 6266 header with filename*
        content_type="application/octet-stream",
    )
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "sandbox; default-src 'none'"
    response["Cache-Control"] = "private, no-cache"
    return response
