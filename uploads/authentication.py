"""DRF's token authentication, with its one query composed once.

Every tus and REST request of a script or mobile client authenticates with a token. DRF looks the
token up with `select_related("user").get(key=...)`, which the ORM compiles anew per request: on a
tus HEAD that was a fifth of the whole request's CPU (bench/README.md, issue 6). This class sends
the same statement (the token joined with its user), composed once by `rows`; what it accepts and
refuses, and with which messages, is DRF's.
"""
from __future__ import annotations

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions

from . import rows


class TokenAuthentication(authentication.TokenAuthentication):
    def authenticate_credentials(self, key: str):
        token = rows.get(self.get_model(), key=key, related="user")
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
