"""The upload page: login required, configuration handed to the JavaScript, static files served."""
from __future__ import annotations

import io
import json
import os
import re

import pytest

pytestmark = pytest.mark.django_db


def test_page_requires_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert b'name="username"' in response.content


def test_login_then_page_has_config(client, user, settings):
    settings.UPLOADS_CHUNK_SIZE = 3 * 1024 * 1024
    assert client.login(username="alice", password="alice-password-1")
    response = client.get("/")
    assert response.status_code == 200
    match = re.search(rb'<script id="uploads-config" type="application/json">(.*?)</script>', response.content)
    assert match, "the page hands its configuration to uploader.js with json_script"
    config = json.loads(match.group(1))
    assert config["chunkSize"] == 3 * 1024 * 1024
    assert config["apiUrl"].rstrip("/") == "/api/uploads"
    assert b"uploader.js" in response.content
    assert b'data-testid="file-input"' in response.content


def test_static_assets_are_served(client):
    for path in ("/static/uploads/uploader.js", "/static/uploads/uploads.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert b"".join(response.streaming_content)


def test_logout_is_a_post(client, user):
    client.login(username="alice", password="alice-password-1")
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert client.get("/").status_code == 302


def test_no_view_is_csrf_exempt():
    # RELIABILITY K5: cookie-authenticated upload views must keep CSRF protection.
    from pathlib import Path

    import uploads

    for path in Path(uploads.__file__).parent.rglob("*.py"):
        assert "csrf_exempt" not in path.read_text(), path


# --- The form without JavaScript -----------------------------------------------------------------

MiB = 1024 * 1024


def _csrf_client(client_class, user):
    """A logged-in client that, like a browser, must send the form's CSRF token."""
    client = client_class(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/")  # sets the csrftoken cookie, as loading the page does
    return client, client.cookies["csrftoken"].value


def _file(name: str, data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


def test_form_upload_streams_files_to_disk_and_records_them(user, media_root):
    from django.contrib.messages import get_messages
    from django.test import Client

    from uploads.http import DiskUploadHandler
    from uploads.models import Status, UploadSession

    from .invariants import assert_invariants

    client, token = _csrf_client(Client, user)
    big, small, empty = os.urandom(3 * MiB + 5), b"hello", b""
    response = client.post(
        "/upload/",
        {"csrfmiddlewaretoken": token, "file": [_file("big.bin", big), _file("small.txt", small), _file("e", empty)]},
    )
    assert response.status_code == 303 and response["Location"] == "/"
    # Every file goes to a temporary file on disk, however small: none is held in memory.
    assert [type(h) for h in response.wsgi_request.upload_handlers] == [DiskUploadHandler]
    for name, data in [("big.bin", big), ("small.txt", small), ("e", empty)]:
        row = UploadSession.objects.get(filename=name)
        assert row.owner == user and row.protocol == "form" and row.status == Status.COMPLETE
        assert_invariants(row, data, acked=len(data))
    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "Uploaded “big.bin” (3.0\xa0MB).", "Uploaded “small.txt” (5\xa0bytes).", "Uploaded “e” (0\xa0bytes).",
    ]


def test_form_upload_needs_the_csrf_token(user):
    from django.test import Client

    from uploads.models import UploadSession

    client, _ = _csrf_client(Client, user)
    response = client.post("/upload/", {"file": _file("a.bin", b"data")})
    assert response.status_code == 403
    assert not UploadSession.objects.exists()


def test_form_upload_needs_a_login(client):
    from uploads.models import UploadSession

    response = client.post("/upload/", {"file": _file("a.bin", b"data")})
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert not UploadSession.objects.exists()


def test_form_upload_over_the_size_limit_is_413_and_stores_nothing(user, settings, media_root):
    from django.test import Client

    from uploads.models import UploadSession

    settings.UPLOADS_MAX_SIZE = 100 * 1024
    client, token = _csrf_client(Client, user)
    response = client.post(
        "/upload/", {"csrfmiddlewaretoken": token, "file": [_file("ok.bin", b"x"), _file("huge.bin", os.urandom(300 * 1024))]}
    )
    assert response.status_code == 413
    assert "“huge.bin” is larger than the limit of 100.0\xa0KB per file" in response.context["form_error"]
    assert not UploadSession.objects.exists()
    assert not any(p.is_file() for p in media_root.rglob("*"))


def test_form_upload_without_a_file_is_400(user):
    from django.test import Client

    client, token = _csrf_client(Client, user)
    response = client.post("/upload/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 400
    assert response.context["form_error"] == "Choose at least one file to upload."


def test_form_upload_refused_by_the_engine_says_why(user, settings):
    """An engine error (here the cap on unfinished uploads) is shown on the page with its status."""
    from django.test import Client

    from uploads import services
    from uploads.models import UploadSession

    settings.UPLOADS_MAX_ACTIVE_PER_USER = 1
    services.upload_create(owner=user, filename="unfinished.bin", size=10)
    client, token = _csrf_client(Client, user)
    response = client.post("/upload/", {"csrfmiddlewaretoken": token, "file": _file("a.bin", b"x")})
    assert response.status_code == 429
    assert response.context["form_error"].startswith("“a.bin” was not stored: You have 1 unfinished uploads")
    assert UploadSession.objects.count() == 1


def test_form_upload_is_post_only(user, client):
    client.force_login(user)
    assert client.get("/upload/").status_code == 405


def test_form_uploads_show_in_the_admin(user, admin_client):
    from uploads import services

    services.upload_receive_file(owner=user, filename="via-form.bin", stream=io.BytesIO(b"abc"), size=3)
    response = admin_client.get("/admin/uploads/uploadsession/?protocol__exact=form")
    assert response.status_code == 200
    assert "via-form.bin" in response.content.decode() and "HTML form" in response.content.decode()
