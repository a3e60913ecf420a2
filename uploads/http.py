"""Request-body plumbing shared by the front ends: the declared length and a stream to read.

Chunk bytes are never read through `request.body` / `request.data` (that buffers the whole body
and is capped by DATA_UPLOAD_MAX_MEMORY_SIZE); the services read the stream in fixed blocks.
"""
from __future__ import annotations

import socket
from typing import BinaryIO

from django.http import FileResponse, HttpRequest

from . import storage
from .conf import conf
from .exceptions import LengthRequired
from .models import UploadSession
from .validation import parse_non_negative_int

# gunicorn puts the client socket in the WSGI environ under this key.
GUNICORN_SOCKET = "gunicorn.socket"


def content_length(request: HttpRequest) -> int:
    """The declared body length. Without one the body cannot be trusted: Django reads a chunked
    body as empty (ticket 35838), which would look like a successful empty chunk."""
    raw = request.META.get("CONTENT_LENGTH")
    if not raw:
        raise LengthRequired("Content-Length is required; chunked request bodies are not accepted.")
    return parse_non_negative_int(raw, "Content-Length")


def body_stream(request: HttpRequest) -> BinaryIO:
    """The request body as a stream, with an idle timeout on the socket where the server allows.

    A client whose laptop lid closed leaves a half-open connection; without a timeout the worker
    would wait in recv() for ever, holding the upload's lock, and every resume would get 423.
    gunicorn has no body timeout of its own but hands us the socket; a read that stalls for
    UPLOADS_BODY_TIMEOUT seconds then raises, and the engine keeps what was durably received.
    (Behind nginx, its client_body_timeout does the same job.)
    """
    sock = request.META.get(GUNICORN_SOCKET)
    if isinstance(sock, socket.socket) and conf.BODY_TIMEOUT:
        sock.settimeout(conf.BODY_TIMEOUT)
    # Django's own request (under DRF's wrapper) reads from a stream limited to Content-Length.
    return getattr(request, "_request", request)


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
