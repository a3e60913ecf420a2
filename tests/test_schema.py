"""The OpenAPI document and the docs page: valid, complete, and served without any CDN."""
from __future__ import annotations

import json
import re

import pytest
from django.core.management import call_command
from drf_spectacular.validation import validate_schema

pytestmark = pytest.mark.django_db

SCHEMA_URL = "/api/schema/"
DOCS_URL = "/api/docs/"
CDN_HOSTS = ("cdn.", "jsdelivr", "unpkg", "cdnjs", "googleapis", "gstatic", "cloudflare")


def schema(client) -> dict:
    response = client.get(SCHEMA_URL, {"format": "json"})
    assert response.status_code == 200, response.content[:500]
    return json.loads(response.content)


def test_schema_is_a_valid_openapi_document(client):
    document = schema(client)

    validate_schema(document)  # drf-spectacular's bundled OpenAPI 3 JSON Schema
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] == "Resumable uploads API"


def test_schema_default_format_is_yaml(client):
    response = client.get(SCHEMA_URL)

    assert response.status_code == 200
    assert "openapi" in response["Content-Type"]
    assert response.content.startswith(b"openapi: 3.")


def test_schema_describes_every_upload_route_and_method(client):
    paths = schema(client)["paths"]

    assert set(paths) == {"/api/uploads/", "/api/uploads/{id}/", "/api/uploads/{id}/content/"}
    assert {"get", "post"} <= set(paths["/api/uploads/"])
    assert {"get", "put", "delete"} <= set(paths["/api/uploads/{id}/"])
    assert "get" in paths["/api/uploads/{id}/content/"]


def test_schema_documents_the_chunk_protocol(client):
    put = schema(client)["paths"]["/api/uploads/{id}/"]["put"]

    assert list(put["requestBody"]["content"]) == ["application/octet-stream"]
    headers = {p["name"]: p for p in put["parameters"] if p["in"] == "header"}
    assert headers["Content-Range"]["required"] is True
    assert "Content-Digest" in headers
    for status in ("200", "400", "404", "409", "410", "411", "415", "422"):
        assert status in put["responses"], status


def test_schema_documents_create_and_list(client):
    paths = schema(client)["paths"]
    create = paths["/api/uploads/"]["post"]
    listing = paths["/api/uploads/"]["get"]

    assert {"200", "201", "400", "413"} <= set(create["responses"])
    assert "application/json" in create["requestBody"]["content"]
    query = {p["name"] for p in listing["parameters"] if p["in"] == "query"}
    assert {"filename", "status", "page"} <= query


def test_schema_generates_without_warnings(tmp_path):
    # A warning means the document silently lost detail (e.g. the id parameter's type).
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    assert (tmp_path / "schema.yaml").read_text().startswith("openapi: 3.")


def test_docs_render_from_local_static_files_without_any_cdn(client):
    response = client.get(DOCS_URL)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert not any(host in html.lower() for host in CDN_HOSTS)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets, html
    assert all(asset.startswith("/static/") for asset in assets), assets
    assert any("swagger-ui-bundle.js" in asset for asset in assets)
    assert SCHEMA_URL in html


def test_docs_assets_are_served(client):
    html = client.get(DOCS_URL).content.decode()

    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        response = client.get(asset)
        assert response.status_code == 200, asset
        if response.streaming:
            b"".join(response.streaming_content)  # reading to the end closes the file
