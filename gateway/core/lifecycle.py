"""One running instance's background jobs and shutdown steps.

Services are handed this (not the whole instance): they `spawn` their loops and register what must run at
shutdown; `close` cancels the loops, then runs the steps in reverse order of registration, so what was
opened first (the store) closes last.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine

log = logging.getLogger("gateway")


class Lifecycle:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []
        self._steps: list[Callable[[], Awaitable[None]]] = []

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.append(task)
        return task

    def on_shutdown(self, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append(step)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        while self._steps:
            step = self._steps.pop()
            try:
                await step()
            except Exception:
                log.exception("shutdown step %s failed", getattr(step, "__qualname__", step))
