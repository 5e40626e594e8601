"""The upstream client: retries only before the response is handed over, backoff, Retry-After.

`UpstreamClient(HttpxTransport(), base_url, sleep=fake_sleep)` under respx: every wait the
client would have slept is recorded instead, so the backoff schedule is asserted exactly
and the tests take no time.
"""

from __future__ import annotations

import email.utils
from decimal import Decimal
from typing import Any, AsyncIterator

import httpx
import pytest
import respx

from gateway.upstream.client import (
    HttpxTransport,
    UpstreamClient,
    UpstreamConnectionError,
    parse_json,
    retry_after_seconds,
)

BASE = "https://openrouter.test/api/v1"
KEY = "sk-or-v1-" + "k" * 64
NOW = 1_800_000_000.0
OK = {"id": "gen-1", "choices": []}


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def make(sleeps):
    clients: list[UpstreamClient] = []

    def build(**options: Any) -> UpstreamClient:
        options.setdefault("jitter", lambda: 0.0)
        client = UpstreamClient(HttpxTransport(), BASE, sleep=sleeps, clock=lambda: NOW, **options)
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
def router():
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


async def chat(client: UpstreamClient, **options: Any):
    return await client.open("POST", "/chat/completions", key=KEY, body=b"{}", **options)


# ---------------------------------------------------------------- what is retried


@pytest.mark.anyio
@pytest.mark.parametrize("failure", [429, 502, 503, "connect", "connect-timeout"])
async def test_retryable_failures_are_retried_until_success(make, router, sleeps, failure):
    if failure == "connect":
        first: Any = httpx.ConnectError("connection refused")
    elif failure == "connect-timeout":
        first = httpx.ConnectTimeout("no connection in time")
    else:
        first = httpx.Response(failure, json={"error": {"code": failure, "message": "busy"}})
    route = router.post("/chat/completions").mock(side_effect=[first, first, httpx.Response(200, json=OK)])
    response = await chat(make())
    assert response.status == 200 and parse_json(await response.read()) == OK
    assert route.call_count == 3 and sleeps == [1.0, 2.0]
    await response.close()


@pytest.mark.anyio
@pytest.mark.parametrize("failure", [
    httpx.ReadTimeout("no headers in time"),
    httpx.ReadError("connection reset after sending"),
    httpx.RemoteProtocolError("server disconnected without a response"),
    httpx.WriteError("broken pipe while writing"),
])
async def test_a_post_that_may_have_reached_the_upstream_is_never_sent_again(make, router, sleeps, failure):
    """A generation is billed: after the request may have been sent, no retry (SPEC §3)."""
    route = router.post("/chat/completions").mock(side_effect=[failure, httpx.Response(200, json=OK)])
    with pytest.raises(UpstreamConnectionError) as raised:
        await chat(make(retries=3))
    assert route.call_count == 1 and sleeps == []
    assert raised.value.sent and raised.value.timeout == isinstance(failure, httpx.TimeoutException)


@pytest.mark.anyio
async def test_an_idempotent_get_is_retried_after_a_read_timeout(make, router, sleeps):
    route = router.get("/generation").mock(side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=OK)])
    status, body = await make().call("GET", "/generation", key=KEY)
    assert status == 200 and body == OK and route.call_count == 2 and sleeps == [1.0]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 408, 500, 504, 524])
async def test_other_statuses_are_handed_back_at_once(make, router, sleeps, status):
    route = router.post("/chat/completions").mock(return_value=httpx.Response(status, text="nope"))
    response = await chat(make())
    assert response.status == status and await response.read() == b"nope"
    assert route.call_count == 1 and sleeps == []


@pytest.mark.anyio
async def test_exhausted_retries_return_the_last_response(make, router, sleeps):
    route = router.post("/chat/completions").mock(return_value=httpx.Response(503, text="down"))
    response = await chat(make(retries=3))
    assert response.status == 503 and await response.read() == b"down"
    assert route.call_count == 4 and sleeps == [1.0, 2.0, 4.0]


@pytest.mark.anyio
async def test_exhausted_connection_retries_raise_without_the_key(make, router, sleeps):
    route = router.post("/chat/completions").mock(side_effect=httpx.ConnectError(f"refused for {KEY}"))
    with pytest.raises(UpstreamConnectionError) as raised:
        await chat(make(retries=2))
    assert route.call_count == 3 and sleeps == [1.0, 2.0]
    assert KEY not in str(raised.value) and raised.value.__cause__ is None


@pytest.mark.anyio
async def test_per_call_retries_override(make, router, sleeps):
    route = router.post("/chat/completions").mock(return_value=httpx.Response(502))
    response = await chat(make(retries=3), retries=0)
    assert response.status == 502 and route.call_count == 1 and sleeps == []


@pytest.mark.anyio
async def test_no_retry_once_the_response_is_handed_over(make, router, sleeps):
    """A body that breaks after the headers raises to the caller; nothing is sent again."""

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"data: {\"id\":\"gen-1\"}\n\n"
            raise httpx.ReadError("connection reset")

    route = router.post("/chat/completions").mock(
        return_value=httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken())
    )
    response = await chat(make())
    received = []
    with pytest.raises(UpstreamConnectionError):
        async for chunk in response.chunks():
            received.append(chunk)
    await response.close()
    await response.close()  # safe twice
    assert received == [b"data: {\"id\":\"gen-1\"}\n\n"]
    assert route.call_count == 1 and sleeps == []


# ---------------------------------------------------------------- how long it waits


@pytest.mark.anyio
async def test_backoff_doubles_and_is_capped(make, router, sleeps):
    router.post("/chat/completions").mock(return_value=httpx.Response(502))
    await chat(make(retries=6, backoff_base_s=1, backoff_max_s=5))
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


@pytest.mark.anyio
async def test_jitter_adds_at_most_a_quarter_and_never_passes_the_cap(make, router, sleeps):
    router.post("/chat/completions").mock(return_value=httpx.Response(503))
    await chat(make(retries=4, backoff_max_s=6, jitter=lambda: 0.999999))
    assert sleeps == pytest.approx([1.25, 2.5, 5.0, 6.0], abs=1e-5)


def test_jitter_stays_within_its_bounds_over_many_draws():
    client = UpstreamClient(HttpxTransport(), BASE)  # the real random jitter
    for attempt in range(8):
        base = min(2.0**attempt, 30.0)
        for _ in range(200):
            wait = client.delay(attempt)
            assert base <= wait <= min(base * 1.25, 30.0)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_replace_the_backoff(make, router, sleeps, status):
    route = router.post("/chat/completions").mock(side_effect=[
        httpx.Response(status, headers={"Retry-After": "7"}), httpx.Response(200, json=OK)])
    response = await chat(make(jitter=lambda: 0.9))
    assert response.status == 200 and route.call_count == 2 and sleeps == [7.0]


@pytest.mark.anyio
async def test_retry_after_as_an_http_date(make, router, sleeps):
    when = email.utils.formatdate(NOW + 12, usegmt=True)
    router.post("/chat/completions").mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": when}), httpx.Response(200, json=OK)])
    assert (await chat(make())).status == 200
    assert sleeps == [12.0]


@pytest.mark.anyio
async def test_retry_after_longer_than_the_cap_goes_back_to_the_caller(make, router, sleeps):
    route = router.post("/chat/completions").mock(return_value=httpx.Response(429, headers={"Retry-After": "60"}))
    response = await chat(make(backoff_max_s=30))
    assert response.status == 429 and ("retry-after", "60") in response.headers
    assert route.call_count == 1 and sleeps == []


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["soon", "", "nan", "inf", "Mon, 99 Foo 2020"])
async def test_unreadable_retry_after_falls_back_to_backoff(make, router, sleeps, value):
    router.post("/chat/completions").mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": value}), httpx.Response(200, json=OK)])
    assert (await chat(make())).status == 200
    assert sleeps == [1.0]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("3", 3.0), ("2.5", 2.5), ("-4", 0.0), (email.utils.formatdate(NOW - 50, usegmt=True), 0.0),
     (email.utils.formatdate(NOW + 90, usegmt=True), 90.0), ("later", None), ("1e999", None)],
)
def test_retry_after_seconds_parses_both_forms(value, seconds):
    assert retry_after_seconds(value, NOW) == seconds


# ---------------------------------------------------------------- what is sent and read


@pytest.mark.anyio
async def test_request_carries_the_key_and_merged_headers(make, router):
    route = router.post("/chat/completions").mock(return_value=httpx.Response(200, json=OK))
    client = make(default_headers={"HTTP-Referer": "https://platform.example"})
    response = await chat(client, headers={"x-title": "App", "authorization": "Bearer platform-token"})
    await response.close()
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {KEY}"  # a caller's header never replaces the key
    assert sent.headers["http-referer"] == "https://platform.example" and sent.headers["x-title"] == "App"
    assert sent.content == b"{}" and str(sent.url) == f"{BASE}/chat/completions"


@pytest.mark.anyio
async def test_response_headers_are_lower_cased_in_order(make, router):
    router.post("/chat/completions").mock(return_value=httpx.Response(
        200, headers=[("X-Generation-Id", "gen-9"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], json=OK))
    response = await chat(make())
    assert [h for h in response.headers if h[0] in ("x-generation-id", "set-cookie")] == [
        ("x-generation-id", "gen-9"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
    await response.close()


@pytest.mark.anyio
async def test_call_parses_money_as_decimal(make, router):
    router.get("/generation").mock(return_value=httpx.Response(
        200, content=b'{"data": {"total_cost": 0.00000375, "usage": 1.1e-7, "tokens_prompt": 5}}'))
    status, body = await make().call("GET", "/generation?id=gen-1", key=KEY)
    assert status == 200
    assert body["data"] == {"total_cost": Decimal("0.00000375"), "usage": Decimal("1.1e-7"), "tokens_prompt": 5}


@pytest.mark.anyio
async def test_call_sends_json_and_survives_a_non_json_answer(make, router):
    route = router.post("/keys").mock(return_value=httpx.Response(502, text="<html>bad gateway</html>"))
    status, body = await make().call("POST", "/keys", key=KEY, payload={"limit": Decimal("2.50")}, retry=False)
    assert status == 502 and body == {"error": {"message": "<html>bad gateway</html>"}}
    assert route.call_count == 1
    assert route.calls.last.request.content == b'{"limit":2.50}'
    assert route.calls.last.request.headers["content-type"] == "application/json"


@pytest.mark.anyio
async def test_retried_responses_are_released():
    """Each refused attempt's connection goes back to the pool before the wait."""

    class Response:
        def __init__(self, status: int) -> None:
            self.status, self.headers, self.closed = status, [], 0

        async def close(self) -> None:
            self.closed += 1

    class Script:
        def __init__(self) -> None:
            self.sent = [Response(503), Response(429), Response(200)]
            self.queue = list(self.sent)

        async def send(self, method: str, url: str, headers: Any, body: bytes | None) -> Response:
            return self.queue.pop(0)

    transport = Script()
    client = UpstreamClient(transport, BASE, sleep=Sleeps(), jitter=lambda: 0.0)
    response = await client.open("POST", "/chat/completions", key=KEY, body=b"{}")
    assert response is transport.sent[2] and response.closed == 0
    assert [r.closed for r in transport.sent[:2]] == [1, 1]


@pytest.mark.anyio
async def test_an_empty_key_sends_no_authorization_header(make, router) -> None:
    route = router.get("/models").respond(200, json={"data": []})
    status, _ = await make().call("GET", "/models", key="")
    assert status == 200 and "authorization" not in route.calls.last.request.headers
