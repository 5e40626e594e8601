"""The ASGI entry point: request ids and access logs for everything, raw dispatch for the proxy routes,
Starlette for the JSON APIs.
"""

from __future__ import annotations

import logging
import time
from typing import Any, MutableMapping
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from gateway.api.common import error_response
from gateway.core.errors import GatewayError
from gateway.core.ids import new_request_id
from gateway.core.logs import redact
from gateway.core.metrics import Metrics, route_label
from gateway.proxy.endpoint import ProxyEndpoint, send_error

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")


class GatewayApp:
    """The ASGI entry point: request ids and access logs for everything, raw dispatch for the proxy."""

    def __init__(self, api: Starlette, *, access_log_enabled: bool = True, cors_origins: list[str] | tuple[str, ...] = ()) -> None:
        self.api = api
        self.proxies: dict[str, ProxyEndpoint] = {}  # path → endpoint, once the instance has started (`serve`)
        self.metrics = Metrics()
        self.access_log_enabled = access_log_enabled
        self._entry: Any = self._dispatch
        if cors_origins:
            self._entry = CORSMiddleware(
                self._dispatch,  # type: ignore[arg-type]
                allow_origins=list(cors_origins),
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["X-Generation-Id", "X-Request-Id", "Retry-After"],
            )

    def serve(self, proxies: dict[str, ProxyEndpoint], metrics: Metrics) -> None:
        """Route to a started instance's proxy endpoints and count into its metrics."""
        self.proxies = proxies
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_logged(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
                if not any(name == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        endpoint = self.proxies.get(scope["path"]) if scope["method"] == "POST" else None
        try:
            if endpoint is not None:
                await endpoint(scope, receive, send_logged)
            elif scope["path"] in self.proxies:
                await send_error(send_logged, wrong_method(scope["method"], scope["path"], "POST"), request_id)
            else:
                await self.api(scope, receive, send_logged)
        except Exception:
            if endpoint is not None or status == 0:  # Starlette's handler already logged its own
                log.exception("unhandled error on %s %s", scope["method"], scope["path"],
                              extra={"request_id": request_id})
            if status == 0:  # nothing sent yet: answer in the error envelope instead of dropping the connection
                await send_error(send_logged, _internal_error(request_id), request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")  # the Starlette route that served it, if any
            self.metrics.observe_request(route_label(scope["path"], self.proxies, getattr(route, "path", None)),
                                         status, elapsed)
            if self.access_log_enabled:  # the formatter redacts every field: a path may carry a token
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "query": unquote(scope["query_string"].decode("latin-1")) if scope.get("query_string") else None,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )


def _incoming_request_id(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                return text
    return None


def _internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        f"Internal error in the gateway (request id {request_id}); it has been logged. Try again or contact the operator."
    )


async def unhandled(request: Request, exc: Exception) -> Any:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc,
              extra={"request_id": request_id})
    return error_response(_internal_error(request_id), request)


async def gateway_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, GatewayError)
    return error_response(exc, request)


async def not_found(request: Request, exc: Exception) -> Any:
    from gateway.core.errors import NotFound

    return error_response(NotFound(f"No route {request.method} {redact(request.url.path)[:200]}; see the API in README.md."),
                          request)


def wrong_method(method: str, path: str, allow: str) -> GatewayError:
    """405 naming the methods the path serves, in the message and in `Allow` (RFC 9110 §15.5.6)."""
    hint = f"; use {allow.replace(', ', ' or ')}" if allow else ""
    err = GatewayError(f"Method {method} is not allowed on {redact(path)[:200]}{hint}.", status=405,
                       headers={"allow": allow} if allow else {})
    err.type = "invalid_request_error"
    return err


async def method_not_allowed(request: Request, exc: Exception) -> Any:
    allow = (getattr(exc, "headers", None) or {}).get("Allow", "")
    return error_response(wrong_method(request.method, request.url.path, allow), request)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: gateway_error,
    404: not_found,
    405: method_not_allowed,
    Exception: unhandled,
}
