"""The REST API: parse the request, call one service, render the result."""
from __future__ import annotations

import functools
import logging

from django.db import InterfaceError, OperationalError
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions as drf_exceptions
from rest_framework import status as http
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from . import authentication, locks, selectors, services
from . import http as http_body
from .exceptions import NotComplete, UnsupportedMediaType, UploadError
from .models import Status, UploadSession
from .serializers import ErrorSerializer, UploadCreateSerializer, UploadSerializer
from .validation import InvalidRequest, parse_content_digest, parse_content_range

logger = logging.getLogger(__name__)

CHUNK_CONTENT_TYPE = "application/octet-stream"
# A creation request is a few hundred bytes of JSON; refuse to parse megabytes of it.
MAX_JSON_BYTES = 64 * 1024
_UUID = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


class BoundedJSONParser(JSONParser):
    @staticmethod
    def check_length(request) -> None:
        declared = request.META.get("CONTENT_LENGTH") if request is not None else None
        if declared and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
            raise drf_exceptions.ParseError(f"JSON bodies are limited to {MAX_JSON_BYTES} bytes.")

    def parse(self, stream, media_type=None, parser_context=None):
        self.check_length((parser_context or {}).get("request"))
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            # json raises RecursionError (not ValueError) for `[[[[...` a few KiB deep: a 400, not a 500.
            raise drf_exceptions.ParseError("JSON parse error - nested too deeply.") from exc


class ChunkParser(BaseParser):
    """Declares that PUT takes raw bytes. It is never asked to parse: the view streams the body
    itself, block by block, instead of letting a parser read it into memory."""

    media_type = CHUNK_CONTENT_TYPE

    def parse(self, stream, media_type=None, parser_context=None):  # pragma: no cover
        raise drf_exceptions.ParseError("Chunk bodies are streamed, not parsed.")


class UploadFilter(filters.FilterSet):
    filename = filters.CharFilter(field_name="filename", lookup_expr="exact")
    status = filters.ChoiceFilter(choices=Status.choices, method="filter_status")

    class Meta:
        model = UploadSession
        fields = ["filename", "status"]

    def filter_status(self, queryset, name: str, value: str):
        return selectors.uploads_with_effective_status(queryset, value)


ERRORS = {code: OpenApiResponse(ErrorSerializer) for code in (400, 401, 403, 404)}


class UploadReadAhead:
    """For a view of one upload named by its URL: with a token, the token and the upload are read in
    one statement before DRF authenticates (`authentication.read_with_token`), one round trip
    instead of two (issue 6); `owned_upload` hands the upload out once the request is authenticated,
    and only to its owner. Without a token (a session), the upload is read as usual.

    A chunk (`lock=True`) takes the upload's lock in that statement too, if the token's user owns
    the upload (`selectors.upload_read_with(lock_for=...)`): `held` is then passed to the engine,
    which adopts it, and a request that ends before (refused, say) releases it in `dispatch`."""

    # (held, upload row or None) read with the token, or None: read when asked.
    _read: tuple[bool, UploadSession | None] | None = None
    # The upload's lock, taken by the read ahead of a chunk, or None.
    held: locks.Held | None = None

    def read_ahead(self, request: Request, upload_id: str, *, look: bool = False, lock: bool = False) -> None:
        read = functools.partial(authentication.read_with_token, request)
        if not lock:
            self._read = selectors.upload_read_with(read, upload_id=upload_id, look=look)
            return
        found = selectors.upload_read_with(read, upload_id=upload_id, lock_for=authentication.TOKEN_USER)
        if found is not None:
            self.held, found = found[0], (False, found[1])
        self._read = found

    def dispatch(self, request, *args, **kwargs):
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            if self.held is not None:
                services.upload_lock_release(self.held)  # a no-op once the engine has released it

    def owned_upload(self, upload_id: str) -> UploadSession:
        # Another user's upload is "not found" (RELIABILITY K1), whatever the method.
        if self._read is not None:
            return selectors.upload_owned_by(self._read[1], user=self.request.user)
        return selectors.upload_get_for_user(user=self.request.user, upload_id=upload_id)


@extend_schema_view(
    # 404: a page number past the last page, or not a positive number ("Invalid page.").
    list=extend_schema(summary="Your uploads, newest first", responses={200: UploadSerializer, **ERRORS}),
    retrieve=extend_schema(summary="One upload, with its current offset", responses={200: UploadSerializer, **ERRORS}),
    destroy=extend_schema(summary="Cancel or delete an upload and its file", responses={204: None, **ERRORS}),
)
class UploadViewSet(UploadReadAhead, viewsets.GenericViewSet):
    serializer_class = UploadSerializer
    filterset_class = UploadFilter
    lookup_value_regex = _UUID
    parser_classes = [BoundedJSONParser]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            # drf-spectacular introspects with an anonymous user: give it the model, no rows.
            return UploadSession.objects.none()
        return selectors.uploads_for_user(user=self.request.user)

    def get_parsers(self):
        # drf-spectacular calls this with `self.request` still None while building the schema.
        request = getattr(self, "request", None)
        if getattr(self, "action", None) == "update" or (request is not None and request.method == "PUT"):
            return [ChunkParser()]
        return super().get_parsers()

    def initial(self, request: Request, *args, **kwargs) -> None:
        if "pk" in kwargs:
            self.read_ahead(request, kwargs["pk"], lock=request.method == "PUT")
        super().initial(request, *args, **kwargs)

    def _upload(self) -> UploadSession:
        return self.owned_upload(self.kwargs["pk"])

    def _render(self, upload: UploadSession, status: int = http.HTTP_200_OK) -> Response:
        return Response(self.get_serializer(upload).data, status=status)

    def list(self, request: Request) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        summary="Start an upload, or resume yours of the same file name and size",
        request=UploadCreateSerializer,
        responses={
            201: UploadSerializer, 200: UploadSerializer,
            **{code: OpenApiResponse(ErrorSerializer) for code in (409, 413, 429)}, **ERRORS,
        },
    )
    def create(self, request: Request) -> Response:
        # DRF reads `request.body` before a JSON parser runs, and Django answers a body over
        # DATA_UPLOAD_MAX_MEMORY_SIZE with an HTML 400: check the bound before touching `data`.
        BoundedJSONParser.check_length(request)
        serializer = UploadCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload, created = services.upload_create(owner=request.user, **serializer.validated_data)
        return self._render(upload, http.HTTP_201_CREATED if created else http.HTTP_200_OK)

    def retrieve(self, request: Request, pk: str) -> Response:
        upload = self._upload()
        if upload.status == Status.PARTIAL and upload.offset == upload.size:
            # Every byte is committed but the request that would have finalized it died (a crash
            # while hashing): finish it now, so "offset == size" always means complete to a client.
            upload = services.upload_settle(upload=upload)
        return self._render(upload)

    @extend_schema(
        summary="Append one chunk at the current offset",
        description=(
            "The body is the raw chunk. `Content-Range: bytes START-END/SIZE` (END inclusive) must "
            "start at the upload's `offset` and SIZE must be its declared size; otherwise 409 with "
            "the current `offset`. Progress is committed while the body streams: after an "
            "interruption, GET the upload and continue from its `offset`. With `Content-Digest: "
            "sha-256=:<base64>:` the chunk is all or nothing (422 on mismatch)."
        ),
        request={CHUNK_CONTENT_TYPE: OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter("Content-Range", str, OpenApiParameter.HEADER, required=True),
            OpenApiParameter("Content-Digest", str, OpenApiParameter.HEADER),
        ],
        responses={
            200: UploadSerializer,
            **ERRORS,
            **{code: OpenApiResponse(ErrorSerializer) for code in (409, 410, 411, 413, 415, 422, 423, 507)},
        },
    )
    def update(self, request: Request, pk: str) -> Response:
        upload = self._upload()
        content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != CHUNK_CONTENT_TYPE:
            raise UnsupportedMediaType()
        length = http_body.content_length(request)
        content_range = parse_content_range(request.headers.get("Content-Range"))
        if content_range.total != upload.size:
            raise InvalidRequest(
                f"Content-Range SIZE {content_range.total} differs from the upload's size {upload.size}."
            )
        if content_range.length != length:
            raise InvalidRequest(
                f"Content-Length {length} differs from the {content_range.length} bytes Content-Range names."
            )
        digest = parse_content_digest(request.headers.get("Content-Digest"))
        upload = services.upload_append(
            upload=upload, offset=content_range.start, stream=http_body.body_stream(request),
            length=length, digest=digest, held=self.held,
        )
        return self._render(upload)

    def destroy(self, request: Request, pk: str) -> Response:
        services.upload_delete(upload=self._upload())
        return Response(status=http.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Download a completed upload",
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            409: ErrorSerializer, 410: ErrorSerializer, **ERRORS,
        },
    )
    @action(detail=True, methods=["get"], url_path="content")
    def content(self, request: Request, pk: str) -> FileResponse:
        upload = self._upload()
        if upload.status != Status.COMPLETE:
            raise NotComplete(offset=upload.offset)
        return http_body.download_response(upload)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """Every error as JSON `{"detail": ..., "code": ...}` plus recovery facts such as `offset`."""
    if isinstance(exc, UploadError):
        response = Response({"detail": exc.detail, "code": exc.code, **exc.extra()}, status=exc.status_code)
        if exc.status_code in (423, 503, 507):
            response["Retry-After"] = "1"
        return response
    if isinstance(exc, (OperationalError, InterfaceError)):
        # The database went away (restart, failover, network): transient, so a retryable 503
        # that clients back off from, not a 500. Nothing was acknowledged; the next writer
        # truncates whatever this request wrote past the committed offset.
        logger.warning("database unavailable: %s", exc)
        return Response(
            {"detail": "The database is unavailable; retry shortly.", "code": "database_unavailable"},
            status=http.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, drf_exceptions.ValidationError):
        response.data = {"detail": _flatten(exc.detail), "code": "invalid", "errors": exc.detail}
    elif response is not None and isinstance(response.data, dict) and "detail" in response.data:
        response.data["code"] = getattr(response.data["detail"], "code", "error")
    return response


def _flatten(detail: object, prefix: str = "") -> str:
    if isinstance(detail, dict):
        return "; ".join(_flatten(value, f"{prefix}{key}: ") for key, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_flatten(item, prefix) for item in detail)
    return f"{prefix}{detail}"


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """The project's 404 page (`handler404`): JSON for any URL under /api/ that matches no route,
    such as an id that is not a UUID, as API clients (and the schema) expect; HTML elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)
    return defaults.page_not_found(request, exception)
