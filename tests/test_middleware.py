"""X-HTTP-Method-Override (TUS.md L1): a POST that names another method is handled as that method."""
from __future__ import annotations

import os

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from uploads import storage
from uploads.middleware import MethodOverrideMiddleware
from uploads.models import UploadSession


def _method_seen_by_the_view(method: str, override: str | None) -> str:
    """The method the rest of the stack (CSRF, auth, routing, the view) sees after the middleware."""
    seen: list[str] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append(request.method)
        return HttpResponse()

    headers = {} if override is None else {"HTTP_X_HTTP_METHOD_OVERRIDE": override}
    request = RequestFactory().generic(method, "/files/x", **headers)
    MethodOverrideMiddleware(view)(request)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("PATCH", "PATCH"),  # tus-js-client's overridePatchMethod
        ("patch", "PATCH"),  # header values are not case-normalised by clients
        ("Patch", "PATCH"),
        (" PATCH ", "PATCH"),
        ("DELETE", "DELETE"),
        ("HEAD", "HEAD"),
        ("PUT", "PUT"),
        ("GET", "GET"),
    ],
)
def test_post_takes_the_overriding_method(override, expected):
    assert _method_seen_by_the_view("POST", override) == expected


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_only_a_real_post_is_overridden(method):
    # As tusd: a GET must never turn into a DELETE (a link or an <img> could then delete uploads).
    assert _method_seen_by_the_view(method, "DELETE") == method
    assert _method_seen_by_the_view(method, "PATCH") == method


@pytest.mark.parametrize("override", ["TRACE", "", "  ", "CONNECT", "OPTIONS", "POST", "PATCH, DELETE", "DEL ETE", "FOO"])
def test_an_unknown_override_leaves_the_post_alone(override):
    assert _method_seen_by_the_view("POST", override) == "POST"


def test_a_post_without_the_header_stays_a_post():
    assert _method_seen_by_the_view("POST", None) == "POST"


def test_the_middleware_returns_the_views_response():
    response = HttpResponse(status=204)
    request = RequestFactory().post("/files/x", HTTP_X_HTTP_METHOD_OVERRIDE="PATCH")
    assert MethodOverrideMiddleware(lambda request: response)(request) is response


@pytest.mark.django_db
def test_post_overridden_to_delete_deletes_a_rest_upload(api, media_root):
    # Through the whole stack: the middleware sits before CSRF, authentication and URL routing,
    # so the REST view's `destroy` runs as for a real DELETE.
    created = api.post("/api/uploads/", {"filename": "a.bin", "size": 10}, format="json")
    assert created.status_code == 201, created.content
    upload_id = created.json()["id"]
    assert storage.partial_size(upload_id) == 0

    response = api.post(f"/api/uploads/{upload_id}", HTTP_X_HTTP_METHOD_OVERRIDE="DELETE")

    assert response.status_code == 204, response.content
    assert not UploadSession.objects.filter(pk=upload_id).exists()
    assert storage.partial_size(upload_id) is None
    assert api.get(f"/api/uploads/{upload_id}").status_code == 404


@pytest.mark.django_db
def test_post_without_override_to_a_rest_upload_is_not_a_delete(api):
    created = api.post("/api/uploads/", {"filename": "a.bin", "size": 10}, format="json")
    upload_id = created.json()["id"]

    response = api.post(f"/api/uploads/{upload_id}", HTTP_X_HTTP_METHOD_OVERRIDE="TRACE")

    assert response.status_code == 405
    assert UploadSession.objects.filter(pk=upload_id).exists()


@pytest.mark.django_db
def test_worker_pid_header_only_with_test_hooks(settings):
    """X-Worker-Pid tells a fault test which worker to kill; without the hooks it is not sent."""
    from django.test import Client

    assert "X-Worker-Pid" not in Client().get("/accounts/login/").headers
    settings.UPLOADS_TEST_HOOKS = True
    response = Client().get("/accounts/login/")  # a new client loads the middleware afresh
    assert response.headers["X-Worker-Pid"] == str(os.getpid())


def test_crash_points_are_off_without_the_hooks(settings):
    """Off, `crash_point` is a function that does nothing; on, a bad point name fails loudly."""
    from uploads import faults

    assert faults.crash_point is faults._nothing or faults.crash_point.name == ""
    for point in faults.POINTS:
        faults._nothing(point)
    with pytest.raises(ValueError, match="names no crash point"):
        faults._Crasher("nowhere")
    assert faults._Crasher("mid_body@3").remaining == 3
