"""DRF's token authentication, with its one query composed once, or shared with the view's.

Every tus and REST request of a script or mobile client authenticates with a token. DRF looks the
token up with `select_related("user").get(key=...)`, which the ORM compiles anew per request: on a
tus HEAD that was a fifth of the whole request's CPU (bench/README.md, issue 6). This class sends
the same statement (the token joined with its user), composed once by `rows`; what it accepts and
refuses, and with which messages, is DRF's.

A view whose request reads one known row anyway (a tus upload URL) can read the token in that same
statement, before DRF authenticates (`read_with_token`): one round trip instead of two. The token
row read there is only handed to this class, which judges it exactly as one it read itself.
"""
from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token
from rest_framework.request import Request

from . import rows

# Where `read_with_token` leaves (key, token row or None) on the request for `authenticate`.
_READ = "_uploads_token_read"
# The token's user id, for a part read with `read_with_token` to use (the token is its first part).
TOKEN_USER = rows.Column(0, "user")


class TokenAuthentication(authentication.TokenAuthentication):
    model = Token

    def authenticate(self, request: Request):
        # DRF makes a new authenticator per request, so the read is this request's.
        self._read = getattr(request, _READ, None)
        return super().authenticate(request)

    def authenticate_credentials(self, key: str):
        read = getattr(self, "_read", None)
        if read is not None and read[0] == key:
            token = read[1]
        else:
            token = rows.get(self.get_model(), key=key, related="user")
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)


def _token_key(request: Request) -> str | None:
    """The key of a well-formed `Authorization: Token <key>` header, or None (DRF then answers a
    malformed one as usual)."""
    parts = authentication.get_authorization_header(request).split()
    if len(parts) != 2 or parts[0].lower() != TokenAuthentication.keyword.lower().encode():
        return None
    try:
        return parts[1].decode()
    except UnicodeError:
        return None


def read_with_token(request: Request, *parts: rows.Part) -> list[Any] | None:
    """`rows.together(*parts)` with the request's token row in the same statement, kept for
    `TokenAuthentication` to authenticate this request with; None (and nothing read) when the
    request carries no token."""
    key = _token_key(request)
    if key is None:
        return None
    token, *results = rows.together(rows.Part(Token, equals=(("key", key),), related="user"), *parts)
    setattr(request, _READ, (key, token))
    return results
