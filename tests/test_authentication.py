"""uploads.authentication: the same answers as DRF's TokenAuthentication, from one composed statement."""
from __future__ import annotations

import pytest
from rest_framework import authentication as drf_authentication
from rest_framework import exceptions
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient, APIRequestFactory

from uploads.authentication import TokenAuthentication

pytestmark = pytest.mark.django_db


def outcome(auth_class, header: str | None):
    request = APIRequestFactory().get("/", **({"HTTP_AUTHORIZATION": header} if header is not None else {}))
    try:
        result = auth_class().authenticate(request)
    except exceptions.AuthenticationFailed as exc:
        return ("refused", str(exc.detail))
    return result if result is None else ("accepted", result[0].pk, result[1].key)


@pytest.fixture
def inactive_token(django_user_model):
    return Token.objects.create(user=django_user_model.objects.create(username="gone", is_active=False)).key


@pytest.mark.parametrize(
    "header",
    [
        "Token {token}", "token {token}", "Token {inactive}", "Token 0123456789abcdef0123456789abcdef01234567",
        "Token " + "x" * 300, "Token", "Token a b", "Bearer {token}", "", None,
    ],
)
def test_answers_as_drf_does(header, token, inactive_token):
    if header is not None:
        header = header.format(token=token, inactive=inactive_token)
    ours, drf = outcome(TokenAuthentication, header), outcome(drf_authentication.TokenAuthentication, header)
    assert ours == drf


def test_one_query_and_the_user_comes_with_it(user, token, django_assert_num_queries):
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Token {token}")
    with django_assert_num_queries(1):
        authenticated, auth = TokenAuthentication().authenticate(request)
        assert authenticated == user and authenticated.is_active
        assert auth.key == token and auth.user is authenticated


def test_is_the_api_default_and_refuses_with_401(user, inactive_token):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {inactive_token}")
    response = client.get("/api/uploads/")
    assert response.status_code == 401
    assert response.json()["detail"] == "User inactive or deleted."
    assert response["WWW-Authenticate"] == "Token"


# --- A tus upload URL reads the token and the upload in one statement (`read_with_token`) ------------


def _tus(client: APIClient, method: str, path: str):
    headers = {"HTTP_TUS_RESUMABLE": "1.0.0"}
    if method == "patch":
        return client.patch(path, b"ab", content_type="application/offset+octet-stream", HTTP_UPLOAD_OFFSET="0",
                            **headers)
    return getattr(client, method)(path, **headers)


def _tus_upload(owner) -> str:
    from uploads import services

    upload = services.upload_create_tus(owner=owner, filename="a.bin", size=10, metadata="", concat="")
    return f"/files/{upload.pk}"


@pytest.mark.parametrize("method", ["head", "patch", "delete"])
@pytest.mark.parametrize(
    "header",
    [
        "Token {token}", "token {token}", "Token {inactive}", "Token 0123456789abcdef0123456789abcdef01234567",
        "Token " + "x" * 300, "Token", "Token a b", "Bearer {token}", None,
    ],
)
@pytest.mark.parametrize("whose", ["mine", "another's", "missing", "not an id"])
def test_a_tus_upload_url_answers_every_header_as_drf_does(method, header, whose, user, other_user, token,
                                                           inactive_token, media_root):
    """Authenticated with the token read along with the upload, a tus HEAD, PATCH or DELETE gets
    DRF's answer for the header (401 with its message and `WWW-Authenticate: Token`), and then,
    authenticated, the upload only if it is the caller's (404 otherwise, RELIABILITY K1)."""
    path = {
        "mine": lambda: _tus_upload(user), "another's": lambda: _tus_upload(other_user),
        "missing": lambda: "/files/0b5bd5a6-1f3c-4a8e-9d7e-2f64b1a9c001", "not an id": lambda: "/files/nope",
    }[whose]()
    if header is not None:
        header = header.format(token=token, inactive=inactive_token)
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = _tus(client, method, path)

    drf = outcome(drf_authentication.TokenAuthentication, header)
    if drf is None or drf[0] == "refused":
        assert response.status_code == 401, response.content
        assert response["WWW-Authenticate"] == "Token"
        if method != "head":
            expected = drf[1] if drf else "Authentication credentials were not provided."
            assert response.json()["detail"] == expected
    elif whose != "mine":
        assert response.status_code == 404, response.content
        assert "Upload-Offset" not in response
    else:
        assert response.status_code == {"head": 200, "patch": 204, "delete": 204}[method], response.content
        if method != "delete":
            assert response["Upload-Offset"] == {"head": "0", "patch": "2"}[method]


def test_a_tus_request_signed_in_by_session_reads_the_upload_as_usual(user, media_root):
    client = APIClient()
    client.force_login(user)
    path = _tus_upload(user)
    assert _tus(client, "head", path)["Upload-Offset"] == "0"
    assert _tus(client, "patch", path)["Upload-Offset"] == "2"


def test_a_tus_head_with_a_token_is_one_statement(user, token, django_assert_num_queries, media_root):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    path = _tus_upload(user)
    with django_assert_num_queries(1):
        assert _tus(client, "head", path)["Upload-Offset"] == "0"
