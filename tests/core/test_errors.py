"""The error envelope: OpenAI's shape with `code` = HTTP status, upstream errors re-enveloped."""

from __future__ import annotations

import orjson
import pytest

from gateway.core.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    RateLimited,
    upstream_error_body,
)


def test_gateway_errors_render_openais_envelope():
    error = BadRequest("`model` must be a string.", param="model")
    assert error.status == 400
    assert orjson.loads(error.body()) == {"error": {"message": "`model` must be a string.",
                                                    "type": "invalid_request_error", "code": 400, "param": "model"}}
    limited = RateLimited("Slow down.", headers={"Retry-After": "3"}, metadata={"limit": "requests_per_minute"})
    assert orjson.loads(limited.body())["error"]["metadata"] == {"limit": "requests_per_minute"}
    assert limited.headers == {"Retry-After": "3"} and PayloadTooLarge("x").status == 413
    assert GatewayError("boom", status=418).status == 418 and GatewayError("boom").status == 500


@pytest.mark.parametrize(
    ("status", "raw", "message", "kind"),
    [
        (429, b'{"error":{"code":429,"message":"Rate limit exceeded"}}', "Rate limit exceeded", "rate_limit_error"),
        (502, b'{"error":{"code":502,"message":"Provider returned error"}}', "Provider returned error",
         "upstream_error"),
        (503, b"", "upstream returned HTTP 503", "upstream_error"),
        (500, b"<html>oops</html>", "upstream returned HTTP 500: <html>oops</html>", "upstream_error"),
        (422, b'{"error": "flat string"}', 'upstream returned HTTP 422: {"error": "flat string"}',
         "invalid_request_error"),
        (403, b'{"error":{"code":403,"message":""}}', 'upstream returned HTTP 403: {"error":{"code":403,"message":""}}',
         "permission_error"),
    ],
)
def test_upstream_errors_keep_status_and_message(status, raw, message, kind):
    error = orjson.loads(upstream_error_body(status, raw))["error"]
    assert error == {"message": message, "type": kind, "code": status, "param": None}


def test_upstream_metadata_is_kept():
    raw = orjson.dumps({"error": {"code": 403, "message": "Flagged", "metadata": {"reasons": ["x"]}}, "user_id": "u"})
    assert orjson.loads(upstream_error_body(403, raw))["error"]["metadata"] == {"reasons": ["x"]}


@pytest.mark.parametrize(
    ("status", "message", "hint"),
    [
        (400, "No models provided", "https://openrouter.ai/settings/preferences"),
        (404, "No endpoints found matching your data policy (Paid model training).", "https://openrouter.ai/settings/privacy"),
        (401, "User not found", "PUT /v1/account/openrouter-key"),
        (401, "No auth credentials found", "OpenRouter refused the OpenRouter key connected to your account"),
    ],
)
def test_fixable_upstream_errors_say_how_to_fix_them(status, message, hint):
    body = orjson.dumps({"error": {"code": status, "message": message}})
    error = orjson.loads(upstream_error_body(status, body))["error"]
    assert error["message"].startswith(message) and hint in error["message"] and error["code"] == status


def test_other_errors_get_no_hint():
    body = orjson.dumps({"error": {"code": 400, "message": "x/y is not a valid model ID"}})
    assert orjson.loads(upstream_error_body(400, body))["error"]["message"] == "x/y is not a valid model ID"
