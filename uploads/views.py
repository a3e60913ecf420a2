"""Browser-facing views: the upload page, and the plain form it falls back to without JavaScript.

With JavaScript the page uploads through the REST API (uploads/static/uploads/uploader.js); these
views only hand it the limits and URLs it needs. Without JavaScript the page's form posts the
files here in one multipart request: not resumable, but streamed to disk and recorded like any
other upload.
"""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.mixins import LoginRequiredMixin
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.views.decorators.http import require_POST
from django.views.generic import TemplateView

from uploads import services
from uploads.conf import conf
from uploads.exceptions import UploadError
from uploads.http import DiskUploadHandler

PAGE_TEMPLATE = "uploads/index.html"


def page_context() -> dict:
    # `config` is serialised with |json_script in the template: safe against injection, and read
    # by uploader.js with a single JSON.parse, so the JS never hard-codes settings or URLs.
    return {
        "max_size": conf.MAX_SIZE,
        "config": {"chunkSize": conf.CHUNK_SIZE, "maxSize": conf.MAX_SIZE, "apiUrl": reverse("upload-list")},
    }


class UploadPageView(LoginRequiredMixin, TemplateView):
    """The drag-and-drop upload page."""

    template_name = PAGE_TEMPLATE

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), **page_context()}


@login_required
@require_POST
def upload_form(request: HttpRequest) -> HttpResponse:
    """The form's files, already on disk: settings.FILE_UPLOAD_HANDLERS (DiskUploadHandler) streams
    every multipart file to a temporary file (never memory) and stops any past UPLOADS_MAX_SIZE."""
    files = request.FILES.getlist("file")
    refused = next((h.refused for h in request.upload_handlers if isinstance(h, DiskUploadHandler)), None)
    if refused is not None:
        return _form_error(request, refused.detail, status=refused.status_code)
    if not files:
        return _form_error(request, "Choose at least one file to upload.", status=400)
    for file in files:
        try:
            upload = services.upload_receive_file(owner=request.user, filename=file.name, stream=file, size=file.size)
        except UploadError as exc:
            return _form_error(request, f"“{file.name}” was not stored: {exc.detail}", status=exc.status_code)
        messages.success(request, f"Uploaded “{upload.filename}” ({filesizeformat(upload.size)}).")
    return _see_other(reverse("upload-page"))


def _see_other(url: str) -> HttpResponse:
    # 303: the browser follows with a GET, so reloading the page never re-posts the files.
    response = HttpResponse(status=303)
    response["Location"] = url
    return response


def _form_error(request: HttpRequest, message: str, *, status: int) -> HttpResponse:
    return render(request, PAGE_TEMPLATE, {**page_context(), "form_error": message}, status=status)
