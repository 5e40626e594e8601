"""`gateway usage report`: the same report as the API, from the database."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from gateway.accounting.reports import (
    CLI_FORMATS,
    PERIODS,
    choice,
    report_csv,
    report_table,
    usage_report,
)
from gateway.cli.common import open_store
from gateway.core.clock import Clock, system_clock
from gateway.core.config import Config
from gateway.core.money import dumps


def run_usage_command(args: argparse.Namespace, config: Config, *, clock: Clock = system_clock) -> None:
    """`gateway usage report`: the same report as the API, from the database. Bad options exit 2."""
    period = choice("period", args.period, PERIODS, "month")
    fmt = choice("format", args.format, CLI_FORMATS, "table")
    group_by = "model" if args.user else "user"

    async def work() -> dict[str, Any]:
        store = await open_store(config)
        try:
            return await usage_report(store, period=period, group_by=group_by, user_id=args.user, now=clock())
        finally:
            await store.close()

    report = asyncio.run(work())
    if fmt == "json":
        print(dumps(report).decode())  # exact Decimal JSON, the same bytes the API writes
    elif fmt == "csv":
        print(report_csv(report), end="")
    else:
        print(report_table(report), end="")
