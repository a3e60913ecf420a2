"""The REST API contract, end to end through the Django test client.

Every failure test also asserts that nothing changed: the row, the partial file and (where it
matters) the Redis running total (RELIABILITY.md §3 INV8, §5 F, G, I, J, K). Real services, no mocks.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from uploads import progress, storage
from uploads.models import Status, UploadSession

pytestmark = pytest.mark.django_db

LIST_URL = "/api/uploads/"
OCTET = "application/octet-stream"
MiB = 1024 * 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TEN = b"0123456789"


# --- Helpers ------------------------------------------------------------------------------------


def detail_url(upload_id: str, *, slash: bool = True) -> str:
    return f"/api/uploads/{upload_id}/" if slash else f"/api/uploads/{upload_id}"


def content_url(upload_id: str, *, slash: bool = True) -> str:
    return f"/api/uploads/{upload_id}/content" + ("/" if slash else "")


def create(client: APIClient, filename: object = "data.bin", size: object = 10, **fields):
    return client.post(LIST_URL, {"filename": filename, "size": size, **fields}, format="json")


def new_upload(client: APIClient, filename: str = "data.bin", size: int = 10, **fields) -> dict:
    response = create(client, filename, size, **fields)
    assert response.status_code == 201, response.content
    return response.json()


def put_chunk(client: APIClient, upload_id: str, data: bytes, start: int, size: int, **extra):
    end = start + len(data) - 1
    return client.put(
        detail_url(upload_id), data=data, content_type=OCTET,
        HTTP_CONTENT_RANGE=f"bytes {start}-{end}/{size}", **extra,
    )


def upload_all(client: APIClient, upload_id: str, data: bytes, chunk: int):
    response = None
    for start in range(0, len(data), chunk):
        response = put_chunk(client, upload_id, data[start:start + chunk], start, len(data))
        assert response.status_code == 200, response.content
    return response


def digest_header(data: bytes, algorithm: str = "sha-256") -> str:
    hasher = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}[algorithm]
    return f"{algorithm}=:{base64.b64encode(hasher(data).digest()).decode()}:"


def partial_bytes(upload_id: str) -> bytes | None:
    path = storage.partial_path(uuid.UUID(upload_id))
    return path.read_bytes() if path.exists() else None


def state(upload_id: str) -> tuple:
    """Everything a failed request must leave alone: the row and the bytes on disk."""
    row = UploadSession.objects.filter(pk=upload_id).values(
        "offset", "status", "updated_at", "expires_at", "file", "sha256", "error", "filename", "size"
    ).first()
    final = storage.open_final(row["file"]).read() if row and row["file"] else None
    return row, partial_bytes(upload_id), final


def files_under(root: Path) -> list[str]:
    """The data files under `root`. Lock files are locking machinery, not data: on SQLite a
    finished upload's stays (its holder still locks it when it publishes) until cleanup."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")


# Reading a streaming response to the end closes it (the test client wraps the iterator); never
# call `response.close()` on top: that fires `request_finished` and closes the test's DB connection.


def assert_error(response, status: int, code: str | None = None) -> dict:
    """Errors are JSON with a human `detail` (and a machine `code`)."""
    assert response.status_code == status, (response.status_code, response.content)
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_links_to(client: APIClient, url: str, path: str) -> None:
    """An absolute link to `path` (with or without the optional trailing slash) that answers 200."""
    assert url.rstrip("/") == f"http://testserver{path}", url
    response = client.get(url)
    assert response.status_code == 200, url
    if response.streaming:
        b"".join(response.streaming_content)  # reading to the end closes the file


def sample_bytes(size: int, seed: int = 1) -> bytes:
    """Random binary data that surely holds NUL, CR/LF and a multipart-looking boundary."""
    data = bytearray(random.Random(seed).randbytes(size))
    tricky = b"\x00\r\n\r\n--boundary\r\n\x00\xff\xfe"
    for at in (0, size // 2, size - len(tricky)):
        data[at:at + len(tricky)] = tricky
    return bytes(data)


# --- Creation -----------------------------------------------------------------------------------


def test_create_returns_201_with_the_documented_fields(api, user):
    response = create(api, "report.pdf", 1234)

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {
        "id", "filename", "size", "offset", "status", "protocol", "checksum", "sha256", "error",
        "created_at", "updated_at", "completed_at", "expires_at", "url", "content_url",
    }
    assert body["protocol"] == "rest"
    assert uuid.UUID(body["id"]).version == 4
    assert body["filename"] == "report.pdf"
    assert (body["size"], body["offset"], body["status"]) == (1234, 0, "partial")
    assert body["checksum"] is None and body["sha256"] is None and body["completed_at"] is None
    assert body["expires_at"] is not None
    assert_links_to(api, body["url"], f"/api/uploads/{body['id']}")
    assert api.get(body["url"]).json()["id"] == body["id"]
    assert body["content_url"] is None
    row = UploadSession.objects.get(pk=body["id"])
    assert row.owner == user and row.offset == 0
    assert partial_bytes(body["id"]) == b""


def test_create_again_resumes_the_same_upload_at_its_offset(api, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        first = new_upload(api, "movie.mkv", 10)
        assert put_chunk(api, first["id"], TEN[:4], 0, 10).status_code == 200
        progress.forget(UploadSession.objects.get(pk=first["id"]))  # Redis lost meanwhile

        response = create(api, "movie.mkv", 10)

    assert response.status_code == 200
    assert response.json()["id"] == first["id"]
    assert response.json()["offset"] == 4
    assert UploadSession.objects.count() == 1
    # Resuming refills the running total from the database (B2).
    assert progress.read(UploadSession.objects.get(pk=first["id"])) == 4


def test_create_with_another_size_starts_a_new_upload(api):
    first = new_upload(api, "a.bin", 10)
    other_size = create(api, "a.bin", 11)
    assert other_size.status_code == 201 and other_size.json()["id"] != first["id"]


def test_create_with_another_checksum_conflicts_with_the_unfinished_upload(api):
    # Same name and size but another declared digest: another file. Refuse rather than mix bytes.
    first = new_upload(api, "a.bin", 10, checksum="sha256:" + "a" * 64)
    other = create(api, "a.bin", 10, checksum="sha256:" + "b" * 64)
    body = assert_error(other, 409, "conflict")
    assert body["id"] == first["id"] and body["offset"] == 0
    assert UploadSession.objects.count() == 1


def test_create_does_not_resume_a_completed_upload(api):
    first = new_upload(api, "a.bin", 10)
    upload_all(api, first["id"], TEN, 10)

    again = create(api, "a.bin", 10)

    assert again.status_code == 201
    assert again.json()["id"] != first["id"]


INVALID_CREATE = [
    pytest.param({"size": 5}, "filename", id="filename-missing"),
    pytest.param({"filename": None, "size": 5}, "filename", id="filename-null"),
    pytest.param({"filename": ["a.txt"], "size": 5}, "filename", id="filename-list"),
    pytest.param({"filename": "", "size": 5}, "filename", id="filename-empty"),
    pytest.param({"filename": "   ", "size": 5}, "filename", id="filename-blank"),
    pytest.param({"filename": "a\x00.png", "size": 5}, "filename", id="filename-nul"),
    pytest.param({"filename": "../", "size": 5}, "filename", id="filename-directory"),
    pytest.param({"filename": "a/..", "size": 5}, "filename", id="filename-dotdot"),
    pytest.param({"filename": "a\r\nSet-Cookie: x=1", "size": 5}, "filename", id="filename-crlf"),
    pytest.param({"filename": "invoice\u202efdp.exe", "size": 5}, "filename", id="filename-rtl-override"),
    pytest.param({"filename": "a\u200bb.txt", "size": 5}, "filename", id="filename-zero-width"),
    pytest.param({"filename": "a\x85b.txt", "size": 5}, "filename", id="filename-c1-control"),
    pytest.param({"filename": "x" * 4097, "size": 5}, "filename", id="filename-4097-chars"),
    pytest.param({"filename": "a.bin"}, "size", id="size-missing"),
    pytest.param({"filename": "a.bin", "size": "5"}, "size", id="size-string"),
    pytest.param({"filename": "a.bin", "size": 5.0}, "size", id="size-float"),
    pytest.param({"filename": "a.bin", "size": 5.5}, "size", id="size-fraction"),
    pytest.param({"filename": "a.bin", "size": True}, "size", id="size-true"),
    pytest.param({"filename": "a.bin", "size": False}, "size", id="size-false"),
    pytest.param({"filename": "a.bin", "size": None}, "size", id="size-null"),
    pytest.param({"filename": "a.bin", "size": [5]}, "size", id="size-list"),
    pytest.param({"filename": "a.bin", "size": {"bytes": 5}}, "size", id="size-object"),
    pytest.param({"filename": "a.bin", "size": -1}, "size", id="size-negative"),
    pytest.param({"filename": "a.bin", "size": 2**63}, "size", id="size-2^63"),
    pytest.param({"filename": "a.bin", "size": 10**30}, "size", id="size-10^30"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": "md5:" + "a" * 32}, "checksum", id="checksum-md5"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": "a" * 64}, "checksum", id="checksum-bare-hex"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": "sha256:" + "a" * 63}, "checksum", id="checksum-short"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": "sha256:" + "g" * 64}, "checksum", id="checksum-not-hex"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": "sha256: " + "a" * 64}, "checksum", id="checksum-inner-space"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": None}, "checksum", id="checksum-null"),
    pytest.param({"filename": "a.bin", "size": 5, "checksum": 5}, "checksum", id="checksum-number"),
]


@pytest.mark.parametrize(("payload", "field"), INVALID_CREATE)
def test_create_rejects_invalid_input_naming_the_field(api, payload, field):
    response = api.post(LIST_URL, payload, format="json")

    body = assert_error(response, 400)
    assert field in body["detail"].lower(), body
    assert UploadSession.objects.count() == 0


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        pytest.param(b'{"filename": "a.bin", "size": 5', "application/json", id="truncated-json"),
        pytest.param(b"[]", "application/json", id="array"),
        pytest.param(b"null", "application/json", id="null"),
        pytest.param(b'"a.bin"', "application/json", id="string"),
        pytest.param(b'{"filename": "a.bin", "size": NaN}', "application/json", id="nan"),
        pytest.param(b'{"filename": "a.bin", "size": Infinity}', "application/json", id="infinity"),
        pytest.param(b'{"filename": "a.bin", "size": ' + b"9" * 5000 + b"}", "application/json", id="5000-digit-int"),
        pytest.param(b"[" * 30000 + b"]" * 30000, "application/json", id="nested-30000-deep"),
        pytest.param(b'{"filename": "\xff\xfe.bin", "size": 5}', "application/json", id="invalid-utf8"),
        pytest.param(b'{"filename": "a\\ud800.bin", "size": 5}', "application/json", id="lone-surrogate"),
        pytest.param(b'{"filename": "a\\u0000.bin", "size": 5}', "application/json", id="escaped-nul"),
        pytest.param(b"filename=a.bin&size=5", "application/x-www-form-urlencoded", id="form-encoded"),
        pytest.param(b"--x\r\nContent-Disposition: form-data; name=size\r\n\r\n5\r\n--x--\r\n",
                     "multipart/form-data; boundary=x", id="multipart"),
        pytest.param(b"a.bin,5", "text/csv", id="csv"),
    ],
)
def test_create_with_a_malformed_body_is_4xx_json_and_creates_nothing(api, raw, content_type):
    response = api.post(LIST_URL, data=raw, content_type=content_type)

    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)
    assert UploadSession.objects.count() == 0


@pytest.mark.parametrize("size", [64 * 1024 + 1, 3 * MiB])
def test_create_with_a_json_body_over_64_kib_is_refused(api, size):
    body = json.dumps({"filename": "a.bin", "size": 5, "pad": "x" * size}).encode()

    response = api.post(LIST_URL, data=body, content_type="application/json")

    assert response.status_code in (400, 413)
    assert_error(response, response.status_code)
    assert UploadSession.objects.count() == 0


def test_create_above_the_maximum_size_is_413_and_creates_nothing(api, settings):
    settings.UPLOADS_MAX_SIZE = 100

    response = create(api, "big.bin", 101)

    assert_error(response, 413, "too_large")
    assert UploadSession.objects.count() == 0
    assert create(api, "big.bin", 100).status_code == 201


def test_create_beyond_the_active_upload_cap_is_429(api, settings):
    settings.UPLOADS_MAX_ACTIVE_PER_USER = 2
    new_upload(api, "a.bin")
    new_upload(api, "b.bin")

    assert_error(create(api, "c.bin"), 429, "too_many_uploads")
    assert UploadSession.objects.count() == 2
    assert create(api, "a.bin").status_code == 200  # resuming one of them still works


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("/abs/path/x.txt", "x.txt"),
        ("C:\\Users\\me\\x.txt", "x.txt"),
        ("....//....//x.txt", "x.txt"),
        ("dir/sub/report.pdf", "report.pdf"),
        ("%2e%2e%2fetc%2fpasswd", "%2e%2e%2fetc%2fpasswd"),  # never URL-decoded: no slash, no path
        ("%252e%252e%252f", "%252e%252e%252f"),
    ],
)
def test_create_reduces_paths_to_a_basename_and_writes_only_under_media_root(
    api, media_root, tmp_path, sent, stored
):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_bytes(b"canary")

    body = new_upload(api, sent, 10)
    upload_all(api, body["id"], TEN, 5)

    assert body["filename"] == stored
    assert UploadSession.objects.get(pk=body["id"]).filename == stored
    # I1: every file stays inside MEDIA_ROOT, named by the server, and the canary is untouched.
    root = media_root.resolve()
    for path in media_root.rglob("*"):
        assert root in path.resolve().parents
        if path.is_file():
            assert path.name.startswith(uuid.UUID(body["id"]).hex), path  # named by the server
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary", "media"]
    assert files_under(canary) == ["keep.txt"] and (canary / "keep.txt").read_bytes() == b"canary"


@pytest.mark.parametrize(
    ("sent", "check"),
    [
        pytest.param('"><img src=x onerror=alert(1)>.png', lambda s: s == '"><img src=x onerror=alert(1)>.png', id="html"),
        pytest.param("e\u0301te\u0301.txt", lambda s: s == "\u00e9t\u00e9.txt", id="nfd-to-nfc"),
        pytest.param("x" * 300 + ".tar.gz", lambda s: len(s.encode()) == 255 and s.endswith(".gz"), id="300-ascii"),
        pytest.param("é" * 200 + ".txt", lambda s: len(s.encode()) <= 255 and s.endswith(".txt"), id="400-utf8-bytes"),
        pytest.param("CON", lambda s: s == "CON", id="reserved-windows-name"),
        pytest.param(".htaccess", lambda s: s == ".htaccess", id="dotfile"),
        pytest.param("  spaced.txt  ", lambda s: s == "spaced.txt", id="surrounding-spaces"),
    ],
)
def test_create_stores_hostile_names_sanitised_on_every_backend(api, sent, check):
    response = create(api, sent, 10)

    assert response.status_code == 201, response.content
    stored = UploadSession.objects.get(pk=response.json()["id"]).filename
    assert check(stored), stored
    assert response.json()["filename"] == stored
    stored.encode("utf-8")  # never a split multi-byte character


def test_ids_are_random_uuids_not_derived_from_the_name(api):
    # K2: the same name twice (different sizes, and two empty files) gives unrelated ids.
    ids = [
        new_upload(api, "same.txt", 10)["id"],
        new_upload(api, "same.txt", 11)["id"],
        new_upload(api, "same.txt", 0)["id"],
        new_upload(api, "same.txt", 0)["id"],
    ]

    parsed = [uuid.UUID(i) for i in ids]
    assert len(set(ids)) == 4
    assert all(u.version == 4 for u in parsed)
    assert all("same" not in i for i in ids)
    numbers = sorted(u.int for u in parsed)
    assert all(b - a > 2**64 for a, b in zip(numbers, numbers[1:]))  # not sequential


def test_zero_byte_upload_is_complete_at_creation_and_downloads_empty(api):
    body = new_upload(api, "empty.txt", 0)

    assert (body["status"], body["offset"], body["size"]) == ("complete", 0, 0)
    assert body["sha256"] == EMPTY_SHA256
    assert body["completed_at"] is not None and body["expires_at"] is None
    assert_links_to(api, body["content_url"], f"/api/uploads/{body['id']}/content")
    response = api.get(body["content_url"])
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b""


def test_zero_byte_upload_with_a_wrong_checksum_is_422_and_creates_nothing(api, media_root):
    response = create(api, "empty.txt", 0, checksum="sha256:" + "0" * 64)

    assert_error(response, 422, "checksum_mismatch")
    assert UploadSession.objects.count() == 0
    assert files_under(media_root) == []


# --- Appending chunks ---------------------------------------------------------------------------


def test_multi_chunk_binary_upload_completes_and_downloads_identically(
    api, media_root, django_capture_on_commit_callbacks
):
    # Every chunk is above DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB): the body must be streamed.
    sizes = [3 * MiB + 17, int(2.75 * MiB), int(2.6 * MiB) + 3]
    data = sample_bytes(sum(sizes))
    body = new_upload(api, "dump.bin", len(data))
    upload = UploadSession.objects.get(pk=body["id"])

    start = 0
    with django_capture_on_commit_callbacks(execute=True):
        for index, size in enumerate(sizes):
            chunk = data[start:start + size]
            response = put_chunk(api, body["id"], chunk, start, len(data))
            assert response.status_code == 200, response.content
            start += size
            assert response.json()["offset"] == start
            assert response.json()["status"] == ("complete" if index == len(sizes) - 1 else "partial")
            assert api.get(detail_url(body["id"])).json()["offset"] == start

    done = api.get(detail_url(body["id"])).json()
    assert done["status"] == "complete" and done["offset"] == len(data)
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert done["completed_at"] is not None and done["expires_at"] is None
    assert_links_to(api, done["content_url"], f"/api/uploads/{body['id']}/content")
    assert progress.read(upload) == len(data)
    # INV5: the final file exists once, no partial or lock file remains.
    assert partial_bytes(body["id"]) is None
    assert files_under(media_root) == [UploadSession.objects.get(pk=body["id"]).file]

    response = api.get(content_url(body["id"]))
    assert response.status_code == 200
    assert int(response["Content-Length"]) == len(data)
    assert b"".join(response.streaming_content) == data


@pytest.mark.parametrize("slash", [True, False])
def test_trailing_slash_is_optional_on_every_route(api, slash):
    list_url = LIST_URL if slash else LIST_URL.rstrip("/")
    created = api.post(list_url, {"filename": "s.bin", "size": 10}, format="json")
    assert created.status_code == 201
    upload_id = created.json()["id"]

    assert api.get(list_url).json()["count"] == 1
    assert api.get(detail_url(upload_id, slash=slash)).status_code == 200
    put = api.put(
        detail_url(upload_id, slash=slash), data=TEN, content_type=OCTET,
        HTTP_CONTENT_RANGE="bytes 0-9/10",
    )
    assert put.status_code == 200 and put.json()["status"] == "complete"
    download = api.get(content_url(upload_id, slash=slash))
    assert download.status_code == 200 and b"".join(download.streaming_content) == TEN
    assert api.delete(detail_url(upload_id, slash=slash)).status_code == 204


def test_get_detail_shows_the_current_offset(api):
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:3], 0, 10)

    response = api.get(detail_url(body["id"]))

    assert response.status_code == 200
    assert response.json()["offset"] == 3 and response.json()["status"] == "partial"


def test_upload_id_without_dashes_or_in_upper_case_finds_the_same_upload(api):
    body = new_upload(api, "a.bin", 10)

    for spelling in (uuid.UUID(body["id"]).hex, body["id"].upper()):
        response = api.get(detail_url(spelling))
        assert response.status_code == 200 and response.json()["id"] == body["id"]


def test_duplicate_chunk_is_409_with_the_offset_and_changes_nothing(api):
    # F1 (decision §6.3): a resent chunk after a lost ack gets 409 with the offset, never appended twice.
    body = new_upload(api, "a.bin", 10)
    assert put_chunk(api, body["id"], TEN[:5], 0, 10).status_code == 200
    before = state(body["id"])

    response = put_chunk(api, body["id"], TEN[:5], 0, 10)

    assert assert_error(response, 409, "offset_mismatch")["offset"] == 5
    assert state(body["id"]) == before
    assert partial_bytes(body["id"]) == TEN[:5]
    upload_all_from = put_chunk(api, body["id"], TEN[5:], 5, 10)
    assert upload_all_from.json()["sha256"] == hashlib.sha256(TEN).hexdigest()


def test_out_of_order_chunk_is_409_and_writes_nothing(api):
    # F2
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = put_chunk(api, body["id"], TEN[5:], 5, 10)

    assert assert_error(response, 409, "offset_mismatch")["offset"] == 0
    assert state(body["id"]) == before
    assert partial_bytes(body["id"]) == b""


def test_chunk_behind_the_offset_that_is_not_a_retry_is_409(api):
    # F3
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:6], 0, 10)
    before = state(body["id"])

    response = put_chunk(api, body["id"], b"XXXX", 3, 10)

    assert assert_error(response, 409)["offset"] == 6
    assert state(body["id"]) == before


MALFORMED_RANGES = [
    pytest.param("bytes -1-5/10", id="negative-start"),
    pytest.param("bytes 0-5", id="no-size"),
    pytest.param("bytes 5-1/10", id="end-before-start"),
    pytest.param("bytes 0-10/10", id="end-equals-size"),
    pytest.param("bytes 0-99/10", id="end-beyond-size"),
    pytest.param("bytes \u0663-5/10", id="arabic-indic-digit"),
    pytest.param("bytes \uff10-5/10", id="fullwidth-digit"),
    pytest.param("bytes 0-5/11", id="size-differs-from-declared"),
    pytest.param("bytes 0-5/*", id="unknown-size"),
    pytest.param("bytes */10", id="unsatisfied-form"),
    pytest.param("items 0-5/10", id="wrong-unit"),
    pytest.param("Bytes 0-5/10", id="unit-case"),
    pytest.param("bytes=0-5/10", id="equals-sign"),
    pytest.param("bytes 0 - 5/10", id="spaces"),
    pytest.param(" bytes 0-5/10", id="leading-space"),
    pytest.param("bytes 0-5/10 ", id="trailing-space"),
    pytest.param("bytes +0-5/10", id="plus-sign"),
    pytest.param("bytes 0-5/1_0", id="underscore"),
    pytest.param("bytes 0x0-5/10", id="hex"),
    pytest.param("bytes 0-5.0/10", id="decimal"),
    pytest.param("bytes 0-1e1/10", id="exponent"),
    pytest.param("bytes 0-5/10, bytes 6-9/10", id="list"),
    pytest.param("bytes 0-5/10\x00", id="nul"),
    pytest.param("bytes 00000000000000000000-5/10", id="20-digits"),
    pytest.param(f"bytes 0-5/{2**63}", id="size-2^63"),
    pytest.param(f"bytes 0-{2**63}/{2**63 + 1}", id="end-2^63"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("content_range", MALFORMED_RANGES)
def test_malformed_content_range_is_400_and_changes_nothing(api, content_range):
    # F5: only `bytes START-END/SIZE` in ASCII digits, END inclusive, SIZE the declared size.
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = api.put(
        detail_url(body["id"]), data=TEN[:6], content_type=OCTET, HTTP_CONTENT_RANGE=content_range
    )

    assert_error(response, 400)
    assert state(body["id"]) == before


def test_missing_content_range_is_400(api):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = api.put(detail_url(body["id"]), data=TEN[:6], content_type=OCTET)

    assert "content-range" in assert_error(response, 400)["detail"].lower()
    assert state(body["id"]) == before


def test_content_length_different_from_the_range_is_400(api):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    longer = api.put(detail_url(body["id"]), data=TEN[:6], content_type=OCTET, HTTP_CONTENT_RANGE="bytes 0-4/10")
    shorter = api.put(
        detail_url(body["id"]), data=TEN[:6], content_type=OCTET,
        HTTP_CONTENT_RANGE="bytes 0-5/10", CONTENT_LENGTH="5",
    )

    assert "content-length" in assert_error(longer, 400)["detail"].lower()
    assert "content-length" in assert_error(shorter, 400)["detail"].lower()
    assert state(body["id"]) == before


@pytest.mark.parametrize(
    "content_length",
    ["-1", "+6", " 6", "6 ", "0x6", "6.0", "6e0", "1_0", "\u0666", "\uff16", "6,6", "9" * 20, str(2**63)],
)
def test_malformed_content_length_is_400_and_changes_nothing(api, content_length):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = api.put(
        detail_url(body["id"]), data=TEN[:6], content_type=OCTET,
        HTTP_CONTENT_RANGE="bytes 0-5/10", CONTENT_LENGTH=content_length,
    )

    assert_error(response, 400)
    assert state(body["id"]) == before


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="no-content-length-no-body"),
        pytest.param({"CONTENT_LENGTH": ""}, id="empty-content-length"),
        # What a `Transfer-Encoding: chunked` request looks like to Django (ticket 35838): a body
        # in wsgi.input and no CONTENT_LENGTH. It must be 411, never a 200 that stored 0 bytes.
        pytest.param(
            {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": io.BytesIO(TEN[:6])}, id="chunked-body"
        ),
    ],
)
def test_missing_content_length_is_411_and_changes_nothing(api, extra):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    # With no data the test client sends neither CONTENT_LENGTH nor a body.
    response = api.generic(
        "PUT", detail_url(body["id"]), data=b"", content_type=OCTET,
        HTTP_CONTENT_RANGE="bytes 0-5/10", **extra,
    )

    assert_error(response, 411, "length_required")
    assert state(body["id"]) == before


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "text/plain", "multipart/form-data; boundary=x",
     "application/x-www-form-urlencoded", "application/octet-streamx", ""],
)
def test_wrong_content_type_is_415_and_changes_nothing(api, content_type):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = api.generic(
        "PUT", detail_url(body["id"]), data=TEN[:6], content_type=content_type, HTTP_CONTENT_RANGE="bytes 0-5/10"
    )

    assert_error(response, 415, "unsupported_media_type")
    assert state(body["id"]) == before


@pytest.mark.parametrize("content_type", ["application/octet-stream; charset=binary", "Application/Octet-Stream"])
def test_octet_stream_with_parameters_or_other_case_is_accepted(api, content_type):
    body = new_upload(api, "a.bin", 10)

    response = api.put(detail_url(body["id"]), data=TEN, content_type=content_type, HTTP_CONTENT_RANGE="bytes 0-9/10")

    assert response.status_code == 200 and response.json()["status"] == "complete"


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512"])
def test_chunk_with_a_matching_content_digest_is_stored(api, algorithm):
    body = new_upload(api, "a.bin", 10)

    response = put_chunk(api, body["id"], TEN[:6], 0, 10, HTTP_CONTENT_DIGEST=digest_header(TEN[:6], algorithm))

    assert response.status_code == 200 and response.json()["offset"] == 6
    assert partial_bytes(body["id"]) == TEN[:6]


def test_chunk_with_a_wrong_content_digest_is_422_and_stores_nothing(api, django_capture_on_commit_callbacks):
    # G1: the chunk is thrown away, the offset does not move, and the resend succeeds.
    with django_capture_on_commit_callbacks(execute=True):
        body = new_upload(api, "a.bin", 10)
        put_chunk(api, body["id"], TEN[:3], 0, 10)
    before = state(body["id"])

    with django_capture_on_commit_callbacks(execute=True):
        response = put_chunk(api, body["id"], TEN[3:], 3, 10, HTTP_CONTENT_DIGEST=digest_header(b"other bytes"))

    assert assert_error(response, 422, "checksum_mismatch")["offset"] == 3
    assert state(body["id"]) == before
    assert partial_bytes(body["id"]) == TEN[:3]
    assert progress.read(UploadSession.objects.get(pk=body["id"])) == 3
    retry = put_chunk(api, body["id"], TEN[3:], 3, 10, HTTP_CONTENT_DIGEST=digest_header(TEN[3:]))
    assert retry.status_code == 200 and retry.json()["status"] == "complete"


@pytest.mark.parametrize(
    "header",
    [
        "sha-256=abc",
        "sha-256=:!!!!:",
        "sha-256=::",
        "sha-256=:" + base64.b64encode(b"x" * 16).decode() + ":",
        "md5=:" + base64.b64encode(hashlib.md5(TEN[:6]).digest()).decode() + ":",
        "SHA-256=:" + base64.b64encode(hashlib.sha256(TEN[:6]).digest()).decode() + ":",
        "sha-256=:" + base64.b64encode(hashlib.sha256(TEN[:6]).digest()).decode() + ": \x00",
    ],
)
def test_malformed_content_digest_is_400_and_changes_nothing(api, header):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = put_chunk(api, body["id"], TEN[:6], 0, 10, HTTP_CONTENT_DIGEST=header)

    assert_error(response, 400)
    assert state(body["id"]) == before


def test_declared_checksum_that_matches_completes(api):
    declared = "sha256:" + hashlib.sha256(TEN).hexdigest().upper()
    body = new_upload(api, "a.bin", 10, checksum=declared)
    assert body["checksum"] == declared.lower()

    response = upload_all(api, body["id"], TEN, 4)

    assert response.json()["status"] == "complete"
    assert response.json()["sha256"] == hashlib.sha256(TEN).hexdigest()


def test_declared_checksum_that_does_not_match_fails_the_upload(api, media_root):
    # G4: the last PUT is 422, the upload is failed, nothing is published or left behind.
    body = new_upload(api, "a.bin", 10, checksum="sha256:" + hashlib.sha256(b"other").hexdigest())
    assert put_chunk(api, body["id"], TEN[:5], 0, 10).status_code == 200

    last = put_chunk(api, body["id"], TEN[5:], 5, 10)

    assert assert_error(last, 422, "checksum_mismatch")["status"] == "failed"
    shown = api.get(detail_url(body["id"])).json()
    assert shown["status"] == "failed" and shown["error"]
    assert shown["content_url"] is None and shown["sha256"] is None
    assert assert_error(api.get(content_url(body["id"])), 409, "not_complete")
    assert files_under(media_root) == []
    assert_error(put_chunk(api, body["id"], TEN[5:], 5, 10), 410, "gone")


def test_put_on_a_complete_upload_is_409_with_offset_equal_to_size(api):
    # F12: no modification.
    body = new_upload(api, "a.bin", 10)
    upload_all(api, body["id"], TEN, 10)
    before = state(body["id"])

    response = put_chunk(api, body["id"], b"X", 9, 10)
    resend = put_chunk(api, body["id"], TEN, 0, 10)

    assert assert_error(response, 409)["offset"] == 10
    assert assert_error(resend, 409)["offset"] == 10
    assert state(body["id"]) == before
    assert before[2] == TEN


def test_put_on_an_expired_upload_is_410_and_get_shows_expired(api):
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:4], 0, 10)
    UploadSession.objects.filter(pk=body["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))

    assert api.get(detail_url(body["id"])).json()["status"] == "expired"
    response = put_chunk(api, body["id"], TEN[4:], 4, 10)

    assert_error(response, 410, "gone")
    assert api.get(detail_url(body["id"])).json()["status"] == "expired"
    assert UploadSession.objects.get(pk=body["id"]).status == Status.EXPIRED
    assert partial_bytes(body["id"]) is None
    # An expired upload is never resumed by name: creating again starts afresh.
    again = create(api, "a.bin", 10)
    assert again.status_code == 201 and again.json()["id"] != body["id"]


class _DroppedConnection(io.RawIOBase):
    """A request body whose connection breaks after `data` arrived."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data.read(size)
        if not chunk:
            raise ConnectionResetError("client went away")
        return chunk


@pytest.mark.parametrize("body_stream", [io.BytesIO, _DroppedConnection], ids=["short-body", "dropped"])
def test_interrupted_body_reports_exactly_the_bytes_stored_and_resumes(api, body_stream):
    # F7: never complete, never 2xx; the reported offset equals what is stored (decision §6.2:
    # without a digest the received prefix is kept, as the API schema documents).
    body = new_upload(api, "a.bin", 10)

    response = api.generic(
        "PUT", detail_url(body["id"]), data=b"", content_type=OCTET, HTTP_CONTENT_RANGE="bytes 0-9/10",
        CONTENT_LENGTH="10", **{"wsgi.input": body_stream(TEN[:4])},
    )

    reported = assert_error(response, 400, "incomplete_body")["offset"]
    row = UploadSession.objects.get(pk=body["id"])
    assert reported == row.offset == len(partial_bytes(body["id"])) == 4
    assert row.status == Status.PARTIAL
    finish = put_chunk(api, body["id"], TEN[4:], 4, 10)
    assert finish.json()["sha256"] == hashlib.sha256(TEN).hexdigest()


def test_interrupted_body_with_a_digest_stores_nothing(api):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])

    response = api.generic(
        "PUT", detail_url(body["id"]), data=b"", content_type=OCTET, HTTP_CONTENT_RANGE="bytes 0-9/10",
        CONTENT_LENGTH="10", HTTP_CONTENT_DIGEST=digest_header(TEN), **{"wsgi.input": io.BytesIO(TEN[:4])},
    )

    assert assert_error(response, 400, "incomplete_body")["offset"] == 0
    assert state(body["id"]) == before


# --- Listing ------------------------------------------------------------------------------------


def test_list_is_paginated_newest_first_and_only_mine(api, other_api):
    new_upload(other_api, "theirs.bin", 5)
    ids = [new_upload(api, f"f{i:02}.bin", 5)["id"] for i in range(51)]

    first = api.get(LIST_URL)
    assert first.status_code == 200
    page = first.json()
    assert page["count"] == 51 and len(page["results"]) == 50
    assert page["previous"] is None and page["next"].endswith("?page=2")
    second = api.get(page["next"]).json()
    assert len(second["results"]) == 1 and second["next"] is None
    listed = [item["id"] for item in page["results"] + second["results"]]
    assert listed == ids[::-1]
    assert_error(api.get(LIST_URL, {"page": 3}), 404)
    # Found by the schema fuzzer: a page that is no positive number is the same documented 404.
    assert_error(api.get(LIST_URL, {"page": -40434781}), 404, "not_found")


@pytest.mark.parametrize("path", ["/api/uploads/not-a-uuid/", "/api/uploads/%C2%AF%C3%BC/content/", "/api/nothing"])
def test_unrouted_api_urls_are_json_404s(api, path):
    # Found by the schema fuzzer: an id that is not a UUID matches no route; Django's HTML page
    # would break clients that parse every API error as JSON.
    assert_error(api.get(path), 404, "not_found")


def test_unrouted_page_urls_keep_the_html_404(client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_list_filters_by_status_and_filename(api):
    partial = new_upload(api, "x", 10)
    complete = new_upload(api, "y", 10)
    upload_all(api, complete["id"], TEN, 10)
    empty = new_upload(api, "x", 0)

    def ids(query):
        response = api.get(LIST_URL, query)
        assert response.status_code == 200, response.content
        return {item["id"] for item in response.json()["results"]}

    assert ids({"status": "complete"}) == {complete["id"], empty["id"]}
    assert ids({"status": "partial"}) == {partial["id"]}
    assert ids({"filename": "x"}) == {partial["id"], empty["id"]}
    assert ids({"filename": "x", "status": "complete"}) == {empty["id"]}
    assert ids({"filename": "nothing"}) == set()


@pytest.mark.parametrize("query", [{"status": "bogus"}, {"status": "COMPLETE"}, {"status": "\x00"}, {"filename": "a\x00b"}])
def test_list_with_an_invalid_filter_is_400(api, query):
    new_upload(api, "x", 10)

    assert_error(api.get(LIST_URL, query), 400)


# --- Deleting -----------------------------------------------------------------------------------


def test_delete_removes_the_upload_its_partial_file_and_its_total(api, media_root, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        body = new_upload(api, "a.bin", 10)
        put_chunk(api, body["id"], TEN[:4], 0, 10)
    upload = UploadSession.objects.get(pk=body["id"])
    assert progress.read(upload) == 4

    response = api.delete(detail_url(body["id"]))

    assert response.status_code == 204 and response.content == b""
    assert partial_bytes(body["id"]) is None
    assert files_under(media_root) == []
    assert progress.read(upload) is None
    assert_error(api.get(detail_url(body["id"])), 404, "not_found")
    assert_error(api.delete(detail_url(body["id"])), 404)
    assert_error(put_chunk(api, body["id"], TEN[4:], 4, 10), 404)


def test_delete_of_a_complete_upload_removes_its_file(api, media_root):
    body = new_upload(api, "a.bin", 10)
    upload_all(api, body["id"], TEN, 10)
    assert files_under(media_root) != []

    assert api.delete(detail_url(body["id"])).status_code == 204

    assert files_under(media_root) == []
    assert_error(api.get(content_url(body["id"])), 404)


# --- Ownership, authentication, CSRF -------------------------------------------------------------


def test_another_users_upload_is_404_everywhere_and_unchanged(api, other_api, django_capture_on_commit_callbacks):
    # K1: 404, not 403, so ids are no existence oracle; A's row, bytes and Redis total stay put.
    with django_capture_on_commit_callbacks(execute=True):
        partial = new_upload(api, "mine.bin", 10)
        put_chunk(api, partial["id"], TEN[:4], 0, 10)
        complete = new_upload(api, "done.bin", 10)
        upload_all(api, complete["id"], TEN, 10)
    befores = {i: state(i) for i in (partial["id"], complete["id"])}

    with django_capture_on_commit_callbacks(execute=True):
        for upload_id, offset in ((partial["id"], 4), (complete["id"], 10)):
            assert_error(other_api.get(detail_url(upload_id)), 404, "not_found")
            assert other_api.head(detail_url(upload_id)).status_code == 404
            assert_error(put_chunk(other_api, upload_id, TEN[offset:] or b"X", min(offset, 9), 10), 404, "not_found")
            assert_error(put_chunk(other_api, upload_id, TEN, 0, 10), 404, "not_found")
            assert_error(other_api.delete(detail_url(upload_id)), 404, "not_found")
            assert_error(other_api.get(content_url(upload_id)), 404, "not_found")
        assert other_api.get(LIST_URL).json()["count"] == 0
        assert other_api.get(LIST_URL, {"filename": "mine.bin"}).json()["count"] == 0
        # Creating the same name and size starts B's own upload; it never resumes A's.
        theirs = create(other_api, "mine.bin", 10)
        assert theirs.status_code == 201 and theirs.json()["id"] != partial["id"]

    assert {i: state(i) for i in befores} == befores
    assert progress.read(UploadSession.objects.get(pk=partial["id"])) == 4
    assert api.get(detail_url(partial["id"])).json()["offset"] == 4


def _anonymous_requests(upload_id: str):
    return [
        ("get", LIST_URL, {}),
        ("post", LIST_URL, {"data": {"filename": "a.bin", "size": 10}, "format": "json"}),
        ("get", detail_url(upload_id), {}),
        ("put", detail_url(upload_id), {"data": TEN[4:], "content_type": OCTET, "HTTP_CONTENT_RANGE": "bytes 4-9/10"}),
        ("delete", detail_url(upload_id), {}),
        ("get", content_url(upload_id), {}),
    ]


@pytest.mark.parametrize("index", range(6), ids=["list", "create", "retrieve", "update", "destroy", "content"])
def test_anonymous_requests_are_401_and_change_nothing(api, index):
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:4], 0, 10)
    before = state(body["id"])
    method, url, kwargs = _anonymous_requests(body["id"])[index]

    response = getattr(APIClient(), method)(url, **kwargs)

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Token")
    assert state(body["id"]) == before
    assert UploadSession.objects.count() == 1


def test_a_bad_token_is_401(api):
    body = new_upload(api, "a.bin", 10)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    assert_error(client.get(detail_url(body["id"])), 401)


def _session_client() -> tuple[APIClient, str]:
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password="alice-password-1")
    client.get("/accounts/login/")  # any page rendering {% csrf_token %} sets the cookie
    return client, client.cookies["csrftoken"].value


def test_session_auth_needs_the_csrf_token_to_put(api):
    # K5: a cookie-authenticated write without X-CSRFToken is 403, with the cookie's token 200.
    body = new_upload(api, "a.bin", 10)
    client, token = _session_client()
    before = state(body["id"])

    assert client.get(detail_url(body["id"])).status_code == 200  # safe methods need no token
    missing = put_chunk(client, body["id"], TEN[:4], 0, 10)
    wrong = put_chunk(client, body["id"], TEN[:4], 0, 10, HTTP_X_CSRFTOKEN="x" * 32)
    assert "csrf" in assert_error(missing, 403)["detail"].lower()
    assert_error(wrong, 403)
    assert state(body["id"]) == before

    ok = put_chunk(client, body["id"], TEN[:4], 0, 10, HTTP_X_CSRFTOKEN=token)
    assert ok.status_code == 200 and ok.json()["offset"] == 4


def test_session_auth_needs_the_csrf_token_to_create_and_delete(user):
    client, token = _session_client()

    assert_error(client.post(LIST_URL, {"filename": "a.bin", "size": 10}, format="json"), 403)
    assert UploadSession.objects.count() == 0
    created = client.post(LIST_URL, {"filename": "a.bin", "size": 10}, format="json", HTTP_X_CSRFTOKEN=token)
    assert created.status_code == 201
    assert_error(client.delete(detail_url(created.json()["id"])), 403)
    assert UploadSession.objects.count() == 1
    assert client.delete(detail_url(created.json()["id"]), HTTP_X_CSRFTOKEN=token).status_code == 204


# --- Downloading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "disposition"),
    [
        ("naïve résumé.pdf", "attachment; filename*=utf-8''na%C3%AFve%20r%C3%A9sum%C3%A9.pdf"),
        ("日本語.txt", "attachment; filename*=utf-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.txt"),
        ('say "hi".txt', 'attachment; filename="say \\"hi\\".txt"'),
        ("evil.html", 'attachment; filename="evil.html"'),
        ("evil.svg", 'attachment; filename="evil.svg"'),
        ('"><img src=x onerror=alert(1)>.png', 'attachment; filename="\\"><img src=x onerror=alert(1)>.png"'),
    ],
)
def test_download_headers_never_let_the_browser_render_user_content(api, filename, disposition):
    # J1, I4: attachment, nosniff, CSP sandbox, RFC 6266 filename*, no raw CR/LF anywhere.
    data = b"<svg onload=alert(1)><script>alert(1)</script>\r\n"
    body = new_upload(api, filename, len(data))
    upload_all(api, body["id"], data, len(data))

    response = api.get(content_url(body["id"]))

    assert response.status_code == 200
    assert response["Content-Disposition"] == disposition
    assert response["Content-Type"] == OCTET
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response["Content-Security-Policy"]
    assert "default-src 'none'" in response["Content-Security-Policy"]
    assert int(response["Content-Length"]) == len(data)
    for name, value in response.items():
        assert "\r" not in value and "\n" not in value, (name, value)
        value.encode("latin-1")
    assert b"".join(response.streaming_content) == data


def test_content_of_an_incomplete_upload_is_409_with_the_offset(api):
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:4], 0, 10)

    assert assert_error(api.get(content_url(body["id"])), 409, "not_complete")["offset"] == 4


def test_partial_data_is_not_reachable_under_media_url(api):
    # J2: nothing under MEDIA_ROOT is served directly.
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:4], 0, 10)
    name = storage.partial_path(uuid.UUID(body["id"])).name

    for url in (f"/media/partial/{name}", f"/media/{name}"):
        assert api.get(url).status_code == 404


# --- Errors are JSON; no input gives a 500 --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [("patch", "detail"), ("post", "detail"), ("put", "list"), ("delete", "list"), ("post", "content"),
     ("put", "content"), ("delete", "content")],
)
def test_unsupported_methods_are_405_json(api, method, target):
    body = new_upload(api, "a.bin", 10)
    before = state(body["id"])
    url = {"detail": detail_url(body["id"]), "list": LIST_URL, "content": content_url(body["id"])}[target]

    response = getattr(api, method)(url, data=b"{}", content_type="application/json")

    assert_error(response, 405, "method_not_allowed")
    assert state(body["id"]) == before


def test_unknown_upload_id_is_404_json(api):
    missing = str(uuid.uuid4())

    for response in (
        api.get(detail_url(missing)),
        api.get(content_url(missing)),
        api.delete(detail_url(missing)),
        put_chunk(api, missing, TEN, 0, 10),
    ):
        assert_error(response, 404, "not_found")


def _hostile_requests():
    """(name, method, url template, kwargs): each is refused with a 4xx, never a 500."""
    range_ok = {"content_type": OCTET, "HTTP_CONTENT_RANGE": "bytes 0-5/10"}
    return [
        ("list-status-nul", "get", LIST_URL + "?status=%00", {}),
        ("list-filename-nul", "get", LIST_URL + "?filename=%00", {}),
        ("list-filename-huge", "get", LIST_URL + "?filename=" + "x" * 10000, {}),
        ("list-filename-bad-utf8", "get", LIST_URL + "?filename=%ff%fe", {}),
        ("list-page-negative", "get", LIST_URL + "?page=-1", {}),
        ("list-page-huge", "get", LIST_URL + "?page=" + "9" * 30, {}),
        ("list-page-text", "get", LIST_URL + "?page=last", {}),
        ("detail-not-uuid", "get", "/api/uploads/not-a-uuid/", {}),
        ("detail-nul", "get", "/api/uploads/%00/", {}),
        ("detail-traversal", "get", "/api/uploads/..%2f..%2fetc%2fpasswd/", {}),
        ("detail-sql", "get", "/api/uploads/1' OR '1'='1/", {}),
        ("options-detail", "options", "{detail}", {}),
        ("options-list", "options", LIST_URL, {}),
        ("head-detail", "head", "{detail}", {}),
        ("head-content", "head", "{content}", {}),
        ("put-range-nul", "put", "{detail}", {"data": TEN[:6], "content_type": OCTET, "HTTP_CONTENT_RANGE": "\x00"}),
        ("put-range-latin1", "put", "{detail}", {"data": TEN[:6], "content_type": OCTET, "HTTP_CONTENT_RANGE": "bytes 0-5/10\xff"}),
        ("put-range-huge", "put", "{detail}", {"data": TEN[:6], "content_type": OCTET, "HTTP_CONTENT_RANGE": "bytes " + "9" * 5000 + "-5/10"}),
        ("put-length-2^63", "put", "{detail}", {"data": TEN[:6], **range_ok, "CONTENT_LENGTH": str(2**63)}),
        ("put-length-huge", "put", "{detail}", {"data": TEN[:6], **range_ok, "CONTENT_LENGTH": "9" * 5000}),
        ("put-digest-huge", "put", "{detail}", {"data": TEN[:6], **range_ok, "HTTP_CONTENT_DIGEST": "sha-256=:" + "A" * 100000 + ":"}),
        ("put-digest-list", "put", "{detail}", {"data": TEN[:6], **range_ok, "HTTP_CONTENT_DIGEST": "," * 1000}),
        ("put-content-type-nul", "put", "{detail}", {"data": TEN[:6], "content_type": "\x00", "HTTP_CONTENT_RANGE": "bytes 0-5/10"}),
        ("put-json", "put", "{detail}", {"data": {"a": 1}, "format": "json", "HTTP_CONTENT_RANGE": "bytes 0-5/10"}),
        ("put-list", "put", LIST_URL, {"data": TEN[:6], **range_ok}),
        ("post-detail-json", "post", "{detail}", {"data": {"filename": "a", "size": 1}, "format": "json"}),
        ("patch-detail", "patch", "{detail}", {"data": TEN[:6], **range_ok}),
        ("create-charset-latin1", "post", LIST_URL, {"data": b'{"filename": "\xe9.bin", "size": 5}', "content_type": "application/json; charset=latin-1"}),
        ("create-charset-bogus", "post", LIST_URL, {"data": b'{"filename": "a.bin", "size": 5}', "content_type": "application/json; charset=bogus-9"}),
        ("create-length-lies", "post", LIST_URL, {"data": b'{"filename": "a.bin", "size": 5}', "content_type": "application/json", "CONTENT_LENGTH": "9" * 30}),
        ("create-length-negative", "post", LIST_URL, {"data": b'{"filename": "a.bin", "size": 5}', "content_type": "application/json", "CONTENT_LENGTH": "-5"}),
    ]


HOSTILE = _hostile_requests()


@pytest.mark.parametrize("index", range(len(HOSTILE)), ids=[case[0] for case in HOSTILE])
def test_hostile_requests_never_get_a_500_and_change_nothing(api, index):
    # INV8: a 4xx (or a harmless 2xx for OPTIONS/HEAD and a charset the JSON happens to fit), no state change.
    body = new_upload(api, "a.bin", 10)
    put_chunk(api, body["id"], TEN[:2], 0, 10)
    before = state(body["id"])
    _, method, url, kwargs = HOSTILE[index]
    url = url.format(detail=detail_url(body["id"]), content=content_url(body["id"]))

    response = getattr(api, method)(url, **kwargs)

    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code >= 400 and url.startswith("/api/uploads/") and method != "head":
        if response["Content-Type"].startswith("application/json"):
            assert response.json()["detail"]
        else:
            # Only URLs that match no route at all fall through to Django's plain 404 page.
            assert response.status_code == 404 and "/api/uploads/" + body["id"] not in url
    assert state(body["id"]) == before
    assert UploadSession.objects.filter(status=Status.PARTIAL).count() <= 2


def test_download_of_a_file_deleted_behind_the_apps_back_is_410_not_500(api, media_root):
    body = new_upload(api, "a.bin", 10)
    upload_all(api, body["id"], TEN, 10)
    upload = UploadSession.objects.get(pk=body["id"])
    (media_root / upload.file).unlink()
    assert_error(api.get(content_url(body["id"])), 410, "data_lost")


def test_database_outage_mid_chunk_is_a_retryable_503_and_acknowledges_nothing(api, monkeypatch):
    # RELIABILITY C1: the commit after the write fails (PostgreSQL restarting); fault injected
    # at the commit, everything else real.
    from django.db import OperationalError

    from uploads import services

    body = new_upload(api, "a.bin", 10)
    real_commit = services._commit_offset

    def database_gone(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(services, "_commit_offset", database_gone)
    response = put_chunk(api, body["id"], TEN[:5], 0, 10)
    assert assert_error(response, 503, "database_unavailable")
    assert response["Retry-After"] == "1"
    assert UploadSession.objects.get(pk=body["id"]).offset == 0

    monkeypatch.setattr(services, "_commit_offset", real_commit)
    assert put_chunk(api, body["id"], TEN[:5], 0, 10).json()["offset"] == 5  # the stray tail is cut
    assert put_chunk(api, body["id"], TEN[5:], 5, 10).json()["status"] == "complete"
    assert partial_bytes(body["id"]) is None
    assert UploadSession.objects.get(pk=body["id"]).sha256 == hashlib.sha256(TEN).hexdigest()


def test_status_filter_agrees_with_the_status_shown(api):
    # An idle partial past its expiry shows as expired before the cleanup command marks it;
    # the list filter must say the same, or `?status=partial` would list "expired" uploads.
    live = new_upload(api, "live.bin", 10)
    stale = new_upload(api, "stale.bin", 10)
    UploadSession.objects.filter(pk=stale["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))

    partial = api.get("/api/uploads/", {"status": "partial"}).json()["results"]
    expired = api.get("/api/uploads/", {"status": "expired"}).json()["results"]

    assert [u["id"] for u in partial] == [live["id"]]
    assert [(u["id"], u["status"]) for u in expired] == [(stale["id"], "expired")]


def test_get_finishes_an_upload_whose_last_request_died_before_finalizing(api):
    """Every byte committed, never finalized (a crash while hashing): reading it finishes it, so a
    client that sees offset == size always sees a complete upload with its SHA-256."""
    data = b"all bytes are here"
    upload_id = create(api, "crashed.bin", len(data)).json()["id"]
    with storage.PartialWriter(upload_id, 0) as writer:
        writer.write(data)
        writer.sync()
    UploadSession.objects.filter(pk=upload_id).update(offset=len(data))

    body = api.get(f"/api/uploads/{upload_id}").json()
    assert (body["status"], body["offset"]) == ("complete", len(data))
    assert body["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_parallel_creates_cannot_pass_the_active_cap(settings, user, token):
    """RELIABILITY H9: 20 creates at once against a cap of 5: exactly 5 are created. The cap is
    counted under a lock on the user's row, not by a cache throttle."""
    import threading

    from django.db import connection

    settings.UPLOADS_MAX_ACTIVE_PER_USER = 5
    barrier, statuses = threading.Barrier(20), []

    def create_one(index: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        barrier.wait(10)
        statuses.append(client.post("/api/uploads/", {"filename": f"f{index}.bin", "size": 10}, format="json").status_code)
        connection.close()

    threads = [threading.Thread(target=create_one, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [201] * 5 + [429] * 15
    assert UploadSession.objects.filter(owner=user).count() == 5


def test_access_revoked_between_chunks_stops_the_upload(api, user):
    """RELIABILITY K4/K7: a user deactivated (or a token revoked) between chunks is refused at the
    next chunk (401), and nothing is stored or finished for them."""
    from rest_framework.authtoken.models import Token

    data = b"x" * 10
    upload_id = create(api, "revoked.bin", len(data)).json()["id"]
    assert put_chunk(api, upload_id, data[:5], 0, len(data)).status_code == 200
    user.is_active = False
    user.save(update_fields=["is_active"])
    assert put_chunk(api, upload_id, data[5:], 5, len(data)).status_code == 401
    user.is_active = True
    user.save(update_fields=["is_active"])
    Token.objects.filter(user=user).delete()
    assert put_chunk(api, upload_id, data[5:], 5, len(data)).status_code == 401
    row = UploadSession.objects.get(pk=upload_id)
    assert (row.offset, row.status) == (5, "partial")


# --- A chunk's lock taken in its token's statement (issue 6, migration 0006) ---------------------


@pytest.mark.django_db(transaction=True)
def test_a_chunk_costs_two_round_trips_on_postgresql(api):
    """The token, the lock and the row in one statement; the UPDATE and the unlock in another."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    upload = new_upload(api, size=8)
    with CaptureQueriesContext(connection) as queries:
        assert put_chunk(api, upload["id"], b"abcd", 0, 8).status_code == 200
    assert len(queries) == (2 if connection.vendor == "postgresql" else 3), [q["sql"][:80] for q in queries]
    assert put_chunk(api, upload["id"], b"efgh", 4, 8).json()["status"] == "complete"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("refusal", ["content range", "content type", "offset", "another's token"])
def test_a_chunk_refused_after_its_read_ahead_leaves_the_upload_unlocked(api, other_api, refusal):
    from uploads import locks

    upload = new_upload(api, size=8)
    if refusal == "content range":
        response = put_chunk(api, upload["id"], b"abcd", 0, 9)
    elif refusal == "content type":
        response = api.put(
            detail_url(upload["id"]), data=b"abcd", content_type="text/plain", HTTP_CONTENT_RANGE="bytes 0-3/8"
        )
    elif refusal == "offset":
        response = put_chunk(api, upload["id"], b"abcd", 4, 8)
    else:
        response = put_chunk(other_api, upload["id"], b"abcd", 0, 8)
    assert 400 <= response.status_code < 500, response.content
    assert not locks.is_held(uuid.UUID(upload["id"]))
    assert put_chunk(api, upload["id"], b"abcd", 0, 8).status_code == 200
