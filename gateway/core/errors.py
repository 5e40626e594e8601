"""One error tree, rendered as OpenAI's envelope `{"error": {"message", "type", "code", "param"}}`.

`code` is the HTTP status as an integer, as OpenRouter sends it, so both the OpenAI SDKs
(which read `message`) and OpenRouter's SDKs (which type `code` as int) parse our errors.
"""

from __future__ import annotations

from typing import Any

import orjson

SETTINGS_HINT = (
    " Check your OpenRouter settings at https://openrouter.ai/settings/preferences "
    "(default model) and https://openrouter.ai/settings/privacy (data policy)."
)
# No model in the request and none on the account: the gateway's own setting fixes it too.
NO_MODEL_HINT = (
    " Name a model in the request, or set a default for your account here with "
    "`PUT /v1/settings {\"default_model\": \"openai/gpt-4o-mini\"}`, or at OpenRouter: "
    "https://openrouter.ai/settings/preferences."
)
# An upstream 401 is about the user's OpenRouter key, not the platform token the client sent.
UPSTREAM_KEY_HINT = (
    " (OpenRouter refused the OpenRouter key connected to your account; connect a working one with "
    "`PUT /v1/account/openrouter-key` or ask your admin.)"
)


class GatewayError(Exception):
    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.param = param
        self.headers = headers or {}
        self.metadata = metadata

    def body(self) -> bytes:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.status, "param": self.param}
        if self.metadata:
            error["metadata"] = self.metadata
        return orjson.dumps({"error": error})


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"


class PaymentRequired(GatewayError):
    status = 402
    type = "insufficient_quota"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class Conflict(GatewayError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"


class BadGateway(GatewayError):
    status = 502
    type = "upstream_error"


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def upstream_error_body(status: int, raw: bytes) -> bytes:
    """Re-envelope an upstream error body, keeping its status, message and metadata.

    OpenRouter's "No models provided" and data-policy 404s get a hint pointing to the
    settings pages where the user can fix them; a 401 says it is the user's OpenRouter key
    that was refused (the platform token was fine, or we would not have forwarded).
    """
    message = None
    metadata = None
    try:
        parsed = orjson.loads(raw)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            message = parsed["error"].get("message")
            metadata = parsed["error"].get("metadata")
    except orjson.JSONDecodeError:
        pass
    if not isinstance(message, str) or not message:
        text = raw.decode("utf-8", "replace").strip()[:500]
        message = f"upstream returned HTTP {status}" + (f": {text}" if text else "")
    if "No models provided" in message:
        message += NO_MODEL_HINT
    elif "data policy" in message:
        message += SETTINGS_HINT
    elif status == 401:
        message += UPSTREAM_KEY_HINT
    error: dict[str, Any] = {
        "message": message,
        "type": _TYPE_BY_STATUS.get(status, "upstream_error" if status >= 500 else "invalid_request_error"),
        "code": status,
        "param": None,
    }
    if metadata:
        error["metadata"] = metadata
    return orjson.dumps({"error": error})
