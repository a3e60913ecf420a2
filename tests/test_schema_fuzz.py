"""Fuzzing from the outside (RELIABILITY.md §5 M5 and F5, INV8).

1. Schemathesis reads the OpenAPI document the app serves at /api/schema/ and throws generated
   requests at every operation in it, in-process through the WSGI app, as alice (token auth):
   schema-valid ones ("positive") and schema-violating ones ("negative"), with path ids drawn both
   at random and from real uploads (alice's, in every state, and bob's). Every response must be a
   non-5xx whose status code, Content-Type, headers and JSON body the schema documents.
2. Strict number parsing (X7, F5): every value that is not `^[0-9]{1,19}$` (or does not fit a
   bigint) in Content-Range / Content-Length (REST PUT) and Upload-Offset / Upload-Length /
   Content-Length (tus) is a 400 that changes nothing; never a 500.

`HYPOTHESIS_PROFILE=thorough` runs many more examples than the default `ci`.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from uploads import services, storage
from uploads.exceptions import ChecksumMismatch
from uploads.models import UploadSession
from uploads.validation import BIGINT_MAX

pytestmark = pytest.mark.django_db(transaction=True)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
# Examples per operation and generation mode (schemathesis), and per header (number parsing).
SCHEMA_EXAMPLES = {"ci": 100, "thorough": 1000}.get(PROFILE, 100)
NUMBER_EXAMPLES = {"ci": 120, "thorough": 1000}.get(PROFILE, 120)
HYPOTHESIS = dict(
    # The same examples on every `ci` run (a red run is the change's fault); new ones when thorough.
    derandomize=PROFILE == "ci",
    deadline=None,
    database=None,  # no .hypothesis/ directory in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

SCHEMA_URL = "/api/schema/"
# Every operation the schema must describe; the test below fails if one is added and not fuzzed.
OPERATIONS = [
    ("GET", "/api/uploads/"),
    ("POST", "/api/uploads/"),
    ("GET", "/api/uploads/{id}/"),
    ("PUT", "/api/uploads/{id}/"),
    ("DELETE", "/api/uploads/{id}/"),
    ("GET", "/api/uploads/{id}/content/"),
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OCTET = "application/octet-stream"
TUS_OCTET = "application/offset+octet-stream"
TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}


# --- Schemathesis over the OpenAPI document --------------------------------------------------


@pytest.fixture
def api_schema():
    """The served document, loaded through the WSGI app it describes (and then called in-process)."""
    return schemathesis.openapi.from_wsgi(SCHEMA_URL, WSGIHandler())


@pytest.fixture
def upload_ids(user, other_user):
    """Real ids to aim at: alice's uploads in every state, and one of bob's (must be a 404)."""
    ten = b"0123456789"
    partial, _ = services.upload_create(owner=user, filename="partial.bin", size=1000)
    services.upload_append(upload=partial, offset=0, stream=_Body(ten), length=len(ten))
    complete, _ = services.upload_create(owner=user, filename="complete.txt", size=len(ten))
    services.upload_append(upload=complete, offset=0, stream=_Body(ten), length=len(ten))
    empty, _ = services.upload_create(owner=user, filename="empty.txt", size=0)
    failed, _ = services.upload_create(
        owner=user, filename="failed.bin", size=len(ten), checksum="sha256:" + hashlib.sha256(b"x").hexdigest()
    )
    with pytest.raises(ChecksumMismatch):
        services.upload_append(upload=failed, offset=0, stream=_Body(ten), length=len(ten))
    past = timezone.now() - timedelta(days=1)
    expired, _ = services.upload_create(owner=user, filename="expired.bin", size=100)
    UploadSession.objects.filter(pk=expired.pk).update(expires_at=past)
    services.uploads_cleanup()
    lapsed, _ = services.upload_create(owner=user, filename="lapsed.bin", size=100)  # past expiry, not cleaned
    UploadSession.objects.filter(pk=lapsed.pk).update(expires_at=past)
    bobs, _ = services.upload_create(owner=other_user, filename="bob.bin", size=100)
    ids = [str(u.pk) for u in (partial, complete, empty, failed, expired, lapsed, bobs)]
    # The undashed and upper-case spellings the path pattern also allows.
    return ids + [uuid.UUID(ids[0]).hex, ids[1].upper()]


def _plausible(drawn):
    case, size, filename = drawn
    if isinstance(case.body, dict):
        case.body = {**case.body, "size": size, "filename": filename}
    return case


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def read(self, size: int) -> bytes:
        block = self.data[self.position : self.position + size]
        self.position += len(block)
        return block


def test_the_fuzzed_operations_are_every_operation_in_the_schema(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _fuzz_cases() -> list:
    """(method, path, generation mode, where ids come from). Real ids reach past the 404 branch;
    a negative case with a real id must break something else, which only PUT has (headers, body)."""
    cases = []
    for method, path in OPERATIONS:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases.append(pytest.param(method, path, mode, "random", id=f"{method} {path} {mode.value}"))
            if "{id}" in path and (mode == GenerationMode.POSITIVE or method == "PUT"):
                cases.append(pytest.param(method, path, mode, "real", id=f"{method} {path} {mode.value} real-ids"))
    return cases


@pytest.mark.parametrize(("method", "path", "mode", "ids"), _fuzz_cases())
def test_schema_fuzz(api_schema, token, upload_ids, method, path, mode, ids, capsys):
    operation = api_schema[path][method]
    if ids == "real":
        strategy = st.sampled_from(upload_ids).flatmap(
            lambda upload_id: operation.as_strategy(generation_mode=mode, path_parameters={"id": upload_id})
        )
    else:
        strategy = operation.as_strategy(generation_mode=mode)
    if (method, path, mode) == ("POST", "/api/uploads/", GenerationMode.POSITIVE):
        # `size` is any JSON in the schema, so almost every generated create is a 400: half the
        # time make it a plausible size (and the name one of a few) to reach creation and resume.
        strategy = st.one_of(strategy, st.tuples(strategy, st.sampled_from([0, 1, 10, 1000, 2**63, -1]),
                                                 st.sampled_from(["a.bin", "partial.bin", "x y.txt"])).map(_plausible))
    headers = {"Authorization": f"Token {token}"}
    statuses: Counter = Counter()

    @settings(max_examples=SCHEMA_EXAMPLES, **HYPOTHESIS)
    @given(case=strategy)
    def fuzz(case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        statuses[response.status_code] += 1

    started = time.monotonic()
    try:
        fuzz()
    finally:
        with capsys.disabled():
            print(
                f"\n[schemathesis] {method} {path} {mode.value} {ids}-ids: {sum(statuses.values())} requests in "
                f"{time.monotonic() - started:.1f}s, statuses {dict(sorted(statuses.items()))}"
            )
    assert sum(statuses.values()) > 0


# --- Strict numbers in every front end's headers (F5) -----------------------------------------

_VALID = re.compile(r"[0-9]{1,19}\Z", re.ASCII)


def _is_valid_number(value: str) -> bool:
    return bool(_VALID.match(value)) and int(value) <= BIGINT_MAX


def _as_on_the_wire(value: str) -> str:
    """What a WSGI server hands the app for these characters sent as UTF-8 (PEP 3333: latin-1)."""
    return value.encode("utf-8", "surrogatepass").decode("latin-1")


# Near misses that int() or `\d` would take (X7), over-long and over-bigint numbers, and noise.
_DECORATED = st.builds(
    lambda before, digits, after: before + digits + after,
    st.sampled_from(["", " ", "+", "-", "0x", "\t", "\u00a0", "0b", "−"]),
    st.text("0123456789", min_size=0, max_size=21),
    st.sampled_from(["", " ", ".0", ".", "_0", "e3", "\x00", "\r\n", ",1", "\u0663", "\uff15", "L", "n"]),
)
_UNICODE_DIGITS = st.text(
    st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=5
)
_TOO_BIG = st.one_of(
    st.integers(BIGINT_MAX + 1, 10**19 - 1).map(str),  # 19 digits, past a signed 64-bit column
    st.integers(10**19, 10**30).map(str),  # 20+ digits
)
BAD_NUMBERS = st.one_of(
    _DECORATED,
    _UNICODE_DIGITS,
    _TOO_BIG,
    st.text(max_size=24),
    st.text(max_size=24).map(_as_on_the_wire),
    st.sampled_from(["-0", "-1", "+5", "1_000", " 5", "5 ", "٣", "５", "1e3", "0x10", "1.0", "00 1", "١٢"]),
).filter(lambda value: not _is_valid_number(value))


def _state() -> tuple:
    """Everything a refused request must leave as it was: every row's progress and every byte."""
    rows = tuple(UploadSession.objects.order_by("pk").values_list("pk", "offset", "size", "status", "file"))
    files = tuple(sorted(
        (path.name, path.read_bytes()) for path in storage.partial_dir().glob("*.part")
    )) if storage.partial_dir().exists() else ()
    return rows, files


def _check_refused(response, before: tuple, *, what: str, value: str) -> None:
    assert response.status_code == 400, f"{what}={value!r}: {response.status_code} {response.content[:300]!r}"
    assert _state() == before, f"{what}={value!r} changed something"


@pytest.fixture
def rest_upload(api):
    body = api.post("/api/uploads/", {"filename": "n.bin", "size": 100}, format="json").json()
    response = api.put(f"/api/uploads/{body['id']}/", data=b"x" * 10, content_type=OCTET, HTTP_CONTENT_RANGE="bytes 0-9/100")
    assert response.status_code == 200, response.content
    return body["id"]


def _tus_create(api, **headers) -> str:
    response = api.generic("POST", "/files/", b"", CONTENT_LENGTH="0", **TUS, **headers)
    assert response.status_code == 201, response.content
    return response["Location"].rstrip("/").rsplit("/", 1)[-1]


@pytest.fixture
def tus_upload(api):
    upload_id = _tus_create(api, HTTP_UPLOAD_LENGTH="100")
    response = api.generic(
        "PATCH", f"/files/{upload_id}", b"x" * 10, content_type=TUS_OCTET, CONTENT_LENGTH="10",
        HTTP_UPLOAD_OFFSET="0", **TUS,
    )
    assert response.status_code == 204, response.content
    return upload_id


@pytest.fixture
def deferred_tus_upload(api):
    return _tus_create(api, HTTP_UPLOAD_DEFER_LENGTH="1")


NUMBER_SETTINGS = settings(max_examples=NUMBER_EXAMPLES, **HYPOTHESIS)


def test_rest_put_refuses_malformed_content_range(api, rest_upload):
    before = _state()
    url = f"/api/uploads/{rest_upload}/"

    @NUMBER_SETTINGS
    @given(position=st.sampled_from(["start", "end", "size", "whole"]), bad=BAD_NUMBERS)
    def check(position, bad) -> None:
        numbers = {"start": "10", "end": "19", "size": "100"}
        if position == "whole":
            value = bad
        else:
            numbers[position] = bad
            value = f"bytes {numbers['start']}-{numbers['end']}/{numbers['size']}"
        response = api.put(url, data=b"y" * 10, content_type=OCTET, HTTP_CONTENT_RANGE=value)
        _check_refused(response, before, what="Content-Range", value=value)

    check()


def test_rest_put_refuses_malformed_content_length(api, rest_upload):
    before = _state()
    url = f"/api/uploads/{rest_upload}/"

    @NUMBER_SETTINGS
    @given(bad=BAD_NUMBERS.filter(lambda value: value != ""))
    def check(bad) -> None:
        response = api.put(
            url, data=b"y" * 10, content_type=OCTET, HTTP_CONTENT_RANGE="bytes 10-19/100", CONTENT_LENGTH=bad
        )
        _check_refused(response, before, what="Content-Length", value=bad)

    check()
    # An empty Content-Length is an absent one (PEP 3333): 411, never an empty successful chunk.
    response = api.put(url, data=b"y" * 10, content_type=OCTET, HTTP_CONTENT_RANGE="bytes 10-19/100", CONTENT_LENGTH="")
    assert response.status_code == 411 and _state() == before


# The WSGI key of each tus PATCH header; Upload-Length declares a deferred length.
_TUS_PATCH_NUMBERS = {"Upload-Offset": "HTTP_UPLOAD_OFFSET", "Content-Length": "CONTENT_LENGTH", "Upload-Length": "HTTP_UPLOAD_LENGTH"}


@pytest.mark.parametrize("header", list(_TUS_PATCH_NUMBERS))
def test_tus_patch_refuses_malformed_numbers(api, request, header):
    deferred = header == "Upload-Length"
    upload_id = request.getfixturevalue("deferred_tus_upload" if deferred else "tus_upload")
    before = _state()
    # An empty Content-Length is an absent one (PEP 3333), not a malformed number.
    numbers = BAD_NUMBERS.filter(lambda value: value != "") if header == "Content-Length" else BAD_NUMBERS

    @NUMBER_SETTINGS
    @given(bad=numbers)
    def check(bad) -> None:
        headers = {"CONTENT_LENGTH": "10", "HTTP_UPLOAD_OFFSET": "0" if deferred else "10"}
        headers[_TUS_PATCH_NUMBERS[header]] = bad
        response = api.generic("PATCH", f"/files/{upload_id}", b"y" * 10, content_type=TUS_OCTET, **headers, **TUS)
        _check_refused(response, before, what=header, value=bad)

    check()


def test_tus_post_refuses_malformed_upload_length(api):
    before = _state()

    @NUMBER_SETTINGS
    @given(bad=BAD_NUMBERS, with_body=st.booleans())
    def check(bad, with_body) -> None:
        body = b"y" * 10 if with_body else b""
        response = api.generic(
            "POST", "/files/", body, content_type=TUS_OCTET, CONTENT_LENGTH=str(len(body)),
            HTTP_UPLOAD_LENGTH=bad, HTTP_UPLOAD_METADATA=f"filename {base64.b64encode(b'n.bin').decode()}", **TUS,
        )
        _check_refused(response, before, what="Upload-Length", value=bad)

    check()
