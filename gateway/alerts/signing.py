"""Webhook signatures: HMAC-SHA256 of the exact body bytes, hex, in `X-Gateway-Signature: sha256=<hex>`.

A receiver recomputes it with the webhook's `secret` over the raw body it received and compares in
constant time (`verify`); the event id in the body lets it drop a repeated delivery.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Gateway-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature)
