"""Optional API key: `Authorization: Bearer KEY`, compared in constant time."""
from __future__ import annotations

import hmac

from fastapi import Request

from . import errors

OPEN_PATHS = frozenset({"/health", "/live", "/metrics"})


def check(request: Request, api_key: str | None) -> None:
    if api_key is None or request.url.path in OPEN_PATHS:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise errors.ApiError(401, "Invalid or missing API key (expected 'Authorization: Bearer KEY')",
                              code="invalid_api_key")
