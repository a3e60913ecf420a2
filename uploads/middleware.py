"""X-HTTP-Method-Override, for clients and proxies that can only send GET and POST.

tus-js-client sends `POST` + `X-HTTP-Method-Override: PATCH` with `overridePatchMethod` (TUS.md L1).
The method is replaced here, before CSRF, authentication and URL routing see the request, so the
request is then handled exactly as if it had been sent with that method (DRF's docs recommend a
middleware for this). Only a real POST is overridden, as tusd does; an unknown value is ignored.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from django.core.exceptions import MiddlewareNotUsed
from django.http import HttpRequest, HttpResponse

from .conf import conf

OVERRIDABLE = frozenset({"PATCH", "PUT", "DELETE", "HEAD", "GET"})


class MethodOverrideMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            override = request.headers.get("X-HTTP-Method-Override", "").strip().upper()
            if override in OVERRIDABLE:
                request.method = override
        return self.get_response(request)


class TestHooksMiddleware:
    """Test-only (RELIABILITY.md §4): `X-Worker-Pid` on every response, so a fault test knows which
    worker to kill. Django drops this middleware at start-up unless UPLOADS_TEST_HOOKS is on."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        if not conf.TEST_HOOKS:
            raise MiddlewareNotUsed()
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response["X-Worker-Pid"] = str(os.getpid())
        return response
