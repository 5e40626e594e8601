"""The admin token: compared by its SHA-256 in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.auth.tokens import bearer
from gateway.core.errors import Unauthorized


class AdminAuth:
    """Checks the admin token against its SHA-256 in constant time."""

    def __init__(self, token_hash: str | None) -> None:
        self._hash = token_hash

    @classmethod
    def from_token(cls, token: str | None) -> "AdminAuth":
        return cls(hashlib.sha256(token.encode()).hexdigest() if token else None)

    def check(self, authorization: str | None) -> None:
        token = bearer(authorization)
        if token is None:
            raise Unauthorized("Missing admin token: send `Authorization: Bearer <admin token>`.")
        if self._hash is None or not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self._hash):
            raise Unauthorized("Invalid admin token.")
