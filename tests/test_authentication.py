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
