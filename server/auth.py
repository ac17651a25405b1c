"""Bearer-token auth, one rule for every route: HTTP requests and stream upgrades alike."""

from __future__ import annotations

import hmac

AUTH_HINT = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"


def bearer_ok(authorization: str | None, token: bytes | None) -> bool:
    """Does the `Authorization` header carry `token` (None: no auth required)?"""
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
