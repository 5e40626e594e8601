"""What the proxy hands its hooks: the request on its way upstream, what a generation was charged, and the
protocols limits, accounting and the users' settings implement (so the proxy never imports them).

A forwarded request's life: `BodyPreparer.prepare` → `Admission.admit` (a `Ticket`) → upstream →
`Pricing.charge` once the outcome is known → the same `Charge` to `Recorder.record` and `Ticket.release`,
so accounting and limits count exactly one amount.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Awaitable, Callable, Protocol

from gateway.auth.tokens import Principal
from gateway.proxy.sse import Observation

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class ProxyRequest:
    """A parsed, admitted request on its way upstream."""

    endpoint: str  # "/chat/completions", "/completions", "/embeddings"
    body: dict[str, Any]
    raw: bytes
    model: str | None
    stream: bool
    started: float
    request_id: str
    cancelled: bool = False
    status: int = 0
    first_byte: float | None = None
    ended: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Charge:
    """What one generation costs its user and the tokens it used, as `Pricing` computed it once.

    A value nobody changes once made; not `frozen`, because a frozen dataclass's `__init__` costs
    about 1 µs more per request (it sets each field through `object.__setattr__`)."""

    provider_cost: Decimal
    markup: Decimal
    total: Decimal  # provider_cost + markup: what the user is charged
    total_pico: int  # `total` in whole picodollars (half-even), as the limit counters add it
    markup_pct: Decimal
    markup_reason: str
    free: bool
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost_reported: bool = False  # the response carried `usage.cost` (else provider_cost is 0 until settled)


class Pricing(Protocol):
    def charge(self, principal: Principal, request: ProxyRequest, observation: Observation) -> Charge:
        """The charge of a generation that reached the upstream (pure: no I/O)."""


class Ticket(Protocol):
    """What admission hands back: a release once the outcome is known."""

    def release(self, charge: Charge | None) -> None:
        """Once per admitted request: `charge` is None when nothing reached the upstream."""


class Admission(Protocol):
    """Admits a request or raises the refusal. An admission that never waits may also offer
    `admit_now`, the same as a plain method, and the proxy then calls that (no coroutine)."""

    async def admit(self, principal: Principal, request: ProxyRequest) -> Ticket: ...


class Recorder(Protocol):
    def record(self, principal: Principal, request: ProxyRequest, observation: Observation, charge: Charge) -> None:
        """Called once per forwarded request that reached the upstream, before its ticket is released;
        must not block."""


class BodyPreparer(Protocol):
    def prepare(self, principal: Principal, request: ProxyRequest) -> bytes:
        """The bytes to send upstream (the user's defaults may fill absent fields).

        Called once, before admission, so limits see what goes upstream: a preparer that
        fills fields also updates `request.body` and `request.model`."""


class _Open:
    __slots__ = ()

    def release(self, charge: Charge | None) -> None:
        return None


class OpenAdmission:
    """No limits: used until limits are configured, and in tests of the proxy alone."""

    async def admit(self, principal: Principal, request: ProxyRequest) -> Ticket:
        return _Open()

    def admit_now(self, principal: Principal, request: ProxyRequest) -> Ticket:
        return _Open()


class DiscardRecorder:
    def record(self, principal: Principal, request: ProxyRequest, observation: Observation, charge: Charge) -> None:
        return None


class AsSent:
    def prepare(self, principal: Principal, request: ProxyRequest) -> bytes:
        return request.raw


@dataclass(slots=True)
class StreamInFlight:
    user_id: str
    model: str | None
    started_at: float
    observation: Observation
