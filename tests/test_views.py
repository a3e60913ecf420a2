"""The upload page: login required, configuration handed to the JavaScript, static files served."""
from __future__ import annotations

import json
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
