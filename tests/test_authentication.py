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


# --- Views of one upload read the token and the upload in one statement (`read_with_token`) ---------


def _send(client: APIClient, request: str, upload_id: str):
    protocol, method = request.split()
    if protocol == "rest":
        return getattr(client, method)(f"/api/uploads/{upload_id}/")
    path, headers = f"/files/{upload_id}", {"HTTP_TUS_RESUMABLE": "1.0.0"}
    if method == "patch":
        return client.patch(path, b"ab", content_type="application/offset+octet-stream", HTTP_UPLOAD_OFFSET="0",
                            **headers)
    return getattr(client, method)(path, **headers)


def _new_upload(owner, request: str) -> str:
    from uploads import services

    if request.startswith("rest"):
        upload, _ = services.upload_create(owner=owner, filename="a.bin", size=10)
    else:
        upload = services.upload_create_tus(owner=owner, filename="a.bin", size=10, metadata="", concat="")
    return str(upload.pk)


SUCCESS = {"tus head": 200, "tus patch": 204, "tus delete": 204, "rest get": 200, "rest delete": 204}


@pytest.mark.parametrize("request_", list(SUCCESS))
@pytest.mark.parametrize(
    "header",
    [
        "Token {token}", "token {token}", "Token {inactive}", "Token 0123456789abcdef0123456789abcdef01234567",
        "Token " + "x" * 300, "Token", "Token a b", "Bearer {token}", None,
    ],
)
@pytest.mark.parametrize("whose", ["mine", "another's", "missing", "not an id"])
def test_a_view_of_one_upload_answers_every_header_as_drf_does(request_, header, whose, user, other_user, token,
                                                               inactive_token):
    """Authenticated with the token read along with the upload, a tus HEAD, PATCH or DELETE and a
    REST GET or DELETE get DRF's answer for the header (401 with its message and
    `WWW-Authenticate: Token`), and then, authenticated, the upload only if it is the caller's (404
    otherwise, RELIABILITY K1)."""
    upload_id = {
        "mine": lambda: _new_upload(user, request_), "another's": lambda: _new_upload(other_user, request_),
        "missing": lambda: "0b5bd5a6-1f3c-4a8e-9d7e-2f64b1a9c001", "not an id": lambda: "nope",
    }[whose]()
    if header is not None:
        header = header.format(token=token, inactive=inactive_token)
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = _send(client, request_, upload_id)

    drf = outcome(drf_authentication.TokenAuthentication, header)
    if whose == "not an id" and request_.startswith("rest"):
        assert response.status_code == 404  # the REST route only matches ids: no view runs
    elif drf is None or drf[0] == "refused":
        assert response.status_code == 401, response.content
        assert response["WWW-Authenticate"] == "Token"
        if request_ != "tus head":
            expected = drf[1] if drf else "Authentication credentials were not provided."
            assert response.json()["detail"] == expected
    elif whose != "mine":
        assert response.status_code == 404, response.content
        assert "Upload-Offset" not in response
    else:
        assert response.status_code == SUCCESS[request_], response.content
        if request_ in ("tus head", "tus patch"):
            assert response["Upload-Offset"] == {"tus head": "0", "tus patch": "2"}[request_]
        if request_ == "rest get":
            assert response.json()["id"] == upload_id and response.json()["offset"] == 0


@pytest.mark.parametrize("request_", ["tus head", "tus patch", "rest get"])
def test_a_request_signed_in_by_session_reads_the_upload_as_usual(request_, user):
    client = APIClient()
    client.force_login(user)
    response = _send(client, request_, _new_upload(user, request_))
    assert response.status_code == SUCCESS[request_], response.content


@pytest.mark.parametrize("request_", ["tus head", "rest get"])
def test_a_look_up_with_a_token_is_one_statement(request_, user, token, django_assert_num_queries):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    upload_id = _new_upload(user, request_)
    with django_assert_num_queries(1):
        assert _send(client, request_, upload_id).status_code == 200
