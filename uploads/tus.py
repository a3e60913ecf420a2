"""tus 1.0.0 at /files/: read the protocol's headers, call one engine service, answer in headers.

Extensions: creation, creation-with-upload, creation-defer-length, termination, checksum (sha1,
md5, sha256), expiration and concatenation. Not `checksum-trailer` (WSGI cannot read trailers) and
not `concatenation-unfinished` (a final upload is built from finished parts, at once).

The upload URL `/files/<id>` names the same UploadSession as `/api/uploads/<id>`: one engine, one
lock, one offset. Policies where the protocol leaves a choice are noted where they are made;
`docs/tus.md` lists them.
"""
from __future__ import annotations

import logging
from urllib.parse import urljoin, urlsplit

from django.http import HttpResponse
from django.urls import Resolver404, get_script_prefix, resolve, reverse
from django.utils.http import http_date
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions as drf_exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.permissions import BasePermission
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import api, locks, selectors, services
from . import http as http_body
from .conf import conf
from .exceptions import (
    ChecksumMismatch,
    FinalNotWritable,
    IncompleteBody,
    InvalidRequest,
    OffsetMismatch,
    UnsupportedMediaType,
    UnsupportedVersion,
    UploadComplete,
    UploadError,
    UploadGone,
    UploadReleased,
)
from .models import Status, UploadSession
from .validation import (
    TUS_CHECKSUM_ALGORITHMS,
    parse_non_negative_int,
    parse_tus_metadata,
    parse_upload_checksum,
    parse_upload_concat,
    tus_metadata_filename,
)

logger = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "termination",
    "checksum",
    "expiration",
    "concatenation",
)
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
UPLOAD_URL_NAME = "tus-upload"

# How the engine's errors read in tus, where it differs from their own status.
CHECKSUM_MISMATCH = 460  # tus checksum extension
# An interrupted body (a timeout, a broken connection) is transient: clients retry 5xx and give up
# on 4xx (TUS.md N2, D10). tusd answers 500; a 500 means a bug here, so 503.
INCOMPLETE_BODY = 503


class TusPermission(BasePermission):
    """OPTIONS is discovery and the CORS preflight, which carries no credentials (TUS.md B3)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        return request.method == "OPTIONS" or bool(request.user and request.user.is_authenticated)


class OffsetStreamParser(BaseParser):
    """Declares the tus body type so DRF does not refuse it. Never asked to parse: the engine
    streams the body block by block."""

    media_type = OFFSET_OCTET_STREAM

    def parse(self, stream, media_type=None, parser_context=None):  # pragma: no cover
        raise drf_exceptions.ParseError("tus bodies are streamed, not parsed.")


class TusContentNegotiation(DefaultContentNegotiation):
    """tus answers in headers, whatever the client accepts (its error bodies are JSON, for people).

    DRF's negotiation turned a creation or a HEAD sent with `Accept: text/html` (a browser's
    default, and some HTTP libraries') into 406, which no tus client expects and tusd never sends.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """The REST API's JSON errors, with tus status codes and headers."""
    request = context["request"]
    response = api.exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ChecksumMismatch):
        response.status_code = CHECKSUM_MISMATCH
        response.reason_phrase = "Checksum Mismatch"
    elif isinstance(exc, IncompleteBody):
        response.status_code = INCOMPLETE_BODY
        response["Retry-After"] = "1"
        # A dropped connection is routine, not a server error: log it as a warning here and keep
        # Django from logging every 5xx at ERROR (the flag is how Django marks a logged response).
        logger.warning("tus %s %s: %s", request.method, request.path, exc.detail)
        response._has_been_logged = True
    if isinstance(exc, (OffsetMismatch, UploadReleased, UploadComplete)) and "offset" in exc.extra():
        response["Upload-Offset"] = str(exc.extra()["offset"])  # TUS.md D3: where to resume
    if isinstance(exc, UnsupportedVersion):
        response["Tus-Version"] = TUS_VERSION
    if request.method == "HEAD":
        response.data = None  # a HEAD response has no body, whichever method carried it
    return response


def _media_type(request: Request) -> str:
    return request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()


def _expires(response: HttpResponse, upload: UploadSession) -> None:
    """`Upload-Expires` while an unfinished upload will expire (TUS.md H2), as an IMF-fixdate."""
    if upload.status == Status.PARTIAL and upload.expires_at is not None:
        response["Upload-Expires"] = http_date(upload.expires_at.timestamp())


def _empty(status: int) -> HttpResponse:
    response = HttpResponse(status=status)
    del response["Content-Type"]
    return response


@extend_schema(exclude=True)  # the tus protocol is specified by tus.io, not by our OpenAPI schema
class TusView(APIView):
    permission_classes = [TusPermission]
    parser_classes = [OffsetStreamParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = TusContentNegotiation

    def initial(self, request: Request, *args, **kwargs) -> None:
        self._check_version(request)
        self.before_authentication(request, *args, **kwargs)
        super().initial(request, *args, **kwargs)

    def before_authentication(self, request: Request, *args, **kwargs) -> None:
        """Rows to read before DRF authenticates, in the token's statement (see TusUploadView)."""

    @staticmethod
    def _check_version(request: Request) -> None:
        """412 before anything else happens (TUS.md A2, A3, B2).

        Policy: OPTIONS ignores the header; HEAD (and GET) without it are served, because browsers
        and people open upload URLs directly, but a HEAD naming another version still gets 412.
        """
        if request.method == "OPTIONS":
            return
        version = request.headers.get("Tus-Resumable")
        if version is None and request.method in ("HEAD", "GET"):
            return
        if version != TUS_VERSION:
            raise UnsupportedVersion()

    def get_exception_handler(self):
        return exception_handler

    def finalize_response(self, request: Request, response: HttpResponse, *args, **kwargs) -> HttpResponse:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Tus-Resumable"] = TUS_VERSION  # on every response, errors included (TUS.md A1)
        return response

    def options(self, request: Request, *args, **kwargs) -> HttpResponse:
        response = _empty(204)
        response["Tus-Version"] = TUS_VERSION
        response["Tus-Extension"] = ",".join(TUS_EXTENSIONS)
        response["Tus-Max-Size"] = str(conf.MAX_SIZE)
        response["Tus-Checksum-Algorithm"] = ",".join(TUS_CHECKSUM_ALGORITHMS)
        return response

    def _location(self, upload: UploadSession) -> str:
        # Absolute, as tusd and @tus/server send it; behind a proxy it needs the forwarded host
        # and scheme (USE_X_FORWARDED, see README), which `build_absolute_uri` then honours.
        return self.request.build_absolute_uri(reverse(UPLOAD_URL_NAME, args=[upload.pk]))

    def _append(
        self,
        request: Request,
        upload: UploadSession,
        *,
        offset: int,
        declare_size: int | None = None,
        held: locks.Held | None = None,
    ) -> UploadSession:
        """Stream this request's body into the upload; see `_body_headers` for what was checked.
        `held`: the upload's lock, taken by the read ahead (`api.UploadReadAhead`)."""
        length, digest = self._body_headers(request)
        stream = http_body.body_stream(request, unframed=length is None)
        try:
            return services.upload_append(
                upload=upload, offset=offset, stream=stream, length=length, digest=digest,
                declare_size=declare_size, held=held,
            )
        except UploadComplete:
            # A retried last PATCH gets the 204 its lost answer carried; other bytes get 409 (D8).
            return services.upload_confirm_last_chunk(upload=upload, offset=offset, stream=stream, length=length)

    @staticmethod
    def _body_headers(request: Request):
        # A chunked body (no Content-Length) is read to its end when the server frames it itself;
        # otherwise 411, never a 204 that stored nothing (TUS.md D11).
        length = http_body.content_length(request, allow_unframed=True)
        return length, parse_upload_checksum(request.headers.get("Upload-Checksum"))


class TusCreateView(TusView):
    """The creation URL: POST creates an upload (optionally with its first bytes)."""

    def post(self, request: Request) -> HttpResponse:
        concat_header = request.headers.get("Upload-Concat")
        concat = parse_upload_concat(concat_header)
        raw_metadata = request.headers.get("Upload-Metadata", "")
        metadata = parse_tus_metadata(raw_metadata)
        filename = tus_metadata_filename(metadata)
        raw_metadata = raw_metadata if metadata else ""
        if concat is not None and concat.final:
            # The final's length is the parts' sum: an `Upload-Length` sent anyway is ignored (K4).
            upload = services.upload_concatenate(
                owner=request.user,
                part_ids=[self._part_id(request, url) for url in concat.urls],
                filename=filename,
                metadata=raw_metadata,
                concat=concat_header,
            )
            return self._created(upload)

        size = self._creation_length(request)
        # creation-with-upload: only a body declared as tus data is stored; a body of another type
        # (some HTTP stacks add a default Content-Type) is ignored, as tusd does (TUS.md F3).
        with_body = _media_type(request) == OFFSET_OCTET_STREAM and request.META.get("CONTENT_LENGTH") != "0"
        if with_body:
            self._body_headers(request)  # refuse a bad header before anything is created
        upload = services.upload_create_tus(
            owner=request.user, filename=filename, size=size, metadata=raw_metadata,
            concat="partial" if concat is not None else "",
        )
        if with_body and upload.status == Status.PARTIAL:
            try:
                upload = self._append(request, upload, offset=0)
            except UploadError as exc:
                # The upload exists and keeps what was stored: say where it is, even in an error.
                response = self.handle_exception(exc)
                response["Location"] = self._location(upload)
                return response
        return self._created(upload)

    @staticmethod
    def _creation_length(request: Request) -> int | None:
        length = request.headers.get("Upload-Length")
        defer = request.headers.get("Upload-Defer-Length")
        if length is not None and defer is not None:
            raise InvalidRequest("Send Upload-Length or Upload-Defer-Length, not both.")
        if defer is not None:
            if defer != "1":
                raise InvalidRequest("Upload-Defer-Length must be 1.")
            return None
        if length is None:
            raise InvalidRequest("Upload-Length (or Upload-Defer-Length: 1) is required.")
        return parse_non_negative_int(length, "Upload-Length")

    def _created(self, upload: UploadSession) -> HttpResponse:
        response = _empty(201)
        response["Location"] = self._location(upload)
        response["Upload-Offset"] = str(upload.offset)
        _expires(response, upload)
        return response

    @staticmethod
    def _part_id(request: Request, url: str) -> str:
        """The upload id in a partial upload's URL, which must be one of ours (TUS.md K6)."""
        here = request.build_absolute_uri()
        parts = urlsplit(urljoin(here, url))
        if parts.netloc.lower() != urlsplit(here).netloc.lower():
            raise InvalidRequest(f"Upload-Concat names {url[:200]!r}, which is not on this server.")
        path, prefix = parts.path, get_script_prefix()
        if path.startswith(prefix):
            path = "/" + path[len(prefix):]
        try:
            match = resolve(path)
        except Resolver404:
            match = None
        if match is None or match.url_name != UPLOAD_URL_NAME:
            raise InvalidRequest(f"Upload-Concat names {url[:200]!r}, which is not a tus upload URL.")
        return match.kwargs["pk"]


class TusUploadView(api.UploadReadAhead, TusView):
    """An upload URL: HEAD reports the offset, PATCH appends, DELETE terminates.

    Each of them authenticates and reads the upload (a HEAD after a look at its lock): with a
    token, in one statement (`api.UploadReadAhead`).
    """

    def before_authentication(self, request: Request, pk: str) -> None:
        if request.method in ("HEAD", "PATCH", "DELETE"):
            self.read_ahead(request, pk, look=request.method == "HEAD", lock=request.method == "PATCH")

    def head(self, request: Request, pk: str) -> HttpResponse:
        upload = services.upload_for_resume(user=request.user, upload_id=pk, looked=self._read)
        if selectors.upload_effective_status(upload) in (Status.EXPIRED, Status.FAILED):
            raise UploadGone(f"The upload is {selectors.upload_effective_status(upload)}; start a new one.")
        response = HttpResponse(status=200)
        del response["Content-Type"]
        response["Cache-Control"] = "no-store"
        # A final upload has an offset only once its parts are joined (TUS.md K8).
        if not upload.concat_final or upload.status == Status.COMPLETE:
            response["Upload-Offset"] = str(upload.offset)
        if upload.size is None:
            response["Upload-Defer-Length"] = "1"
        else:
            response["Upload-Length"] = str(upload.size)
        if upload.tus_metadata:
            response["Upload-Metadata"] = upload.tus_metadata
        if upload.tus_concat:
            response["Upload-Concat"] = upload.tus_concat
        _expires(response, upload)
        return response

    def patch(self, request: Request, pk: str) -> HttpResponse:
        upload = self.owned_upload(pk)
        if upload.concat_final:
            raise FinalNotWritable()
        if _media_type(request) != OFFSET_OCTET_STREAM:
            raise UnsupportedMediaType(f"PATCH bodies must be sent as {OFFSET_OCTET_STREAM}.")
        offset = parse_non_negative_int(request.headers.get("Upload-Offset"), "Upload-Offset")
        declared = request.headers.get("Upload-Length")
        declare_size = parse_non_negative_int(declared, "Upload-Length") if declared is not None else None
        upload = self._append(request, upload, offset=offset, declare_size=declare_size, held=self.held)
        response = _empty(204)
        response["Upload-Offset"] = str(upload.offset)
        _expires(response, upload)
        return response

    def delete(self, request: Request, pk: str) -> HttpResponse:
        services.upload_delete(upload=self.owned_upload(pk))
        return _empty(204)
