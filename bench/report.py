"""Turning runs into the tables: per-run rows, the ratios, and the issue-8 targets with PASS/FAIL.

Targets compare like with like: added latency and TTFB are differences of p50s measured
the same way against the same upstream; memory is the gateway process's VmRSS.
"""

from __future__ import annotations

import statistics
from typing import Any

DIRECT, MINIMAL, RELAY = "direct", "minimal", "relay"
GATEWAY, MISSING, GRANIAN = "gateway", "gateway-missing", "gateway-granian"  # policy all, policy missing, granian
TARGETS = (DIRECT, MINIMAL, RELAY, GATEWAY, MISSING, GRANIAN)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def header(generator: str, pinned: bool, settings: Any) -> str:
    return (f"bench: json load from {generator}, streams from the Python client; "
            f"{'servers pinned to core 1, load and upstream on core 0' if pinned else 'no pinning'}; "
            f"{settings.duration:g} s per run after {settings.warmup:g} s warm-up; "
            f"streams of {settings.chunks} chunks\n"
            + f"{'target':<16} {'mode':<6} {'c':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'TTFB p50':>9} {'errors':>6} {'CPU us/req':>10} {'settled':>8} {'in s':>5}")


def row_line(row: dict[str, Any]) -> str:
    return (f"{row['target']:<16} {row['mode']:<6} {row['concurrency']:>4} {_fmt(row['rps'], 1):>9} "
            f"{_fmt(row['p50_ms'], 3):>8} {_fmt(row['p99_ms'], 3):>8} {_fmt(row.get('ttfb_p50_ms'), 3):>9} "
            f"{row['errors']:>6} {_fmt(row.get('cpu_us_per_request'), 1):>10} {_settled(row):>8} "
            f"{_fmt(row.get('settle_s'), 1):>5}"
            + (f"  first failure: {row['failures'][0]}" if row.get("failures") else ""))


def _settled(row: dict[str, Any]) -> str:
    if row.get("mode") == "stream" or "cpu_us_settled" not in row:
        return "-"
    return "did not settle" if row["cpu_us_settled"] is None else _fmt(row["cpu_us_settled"], 1)


def sustained_line(summary: dict[str, Any]) -> str:
    settled = summary["settled_s"]
    return (f"sustained {summary['target']}: {summary['seconds']:g} s at c={summary['concurrency']}, "
            f"{_fmt(summary['rps'], 0)} req/s; backlog peak {_fmt(summary['peak'], 0)}, at the load's end "
            f"{_fmt(summary['at_load_end'], 0)}, {_bounded(summary['bounded'])}; "
            + ("did not settle" if settled is None else f"empty {settled:.1f} s after the load")
            + f"; CPU {_fmt(summary['cpu_us_per_request'], 1)} us/request during, "
            f"{_fmt(summary.get('cpu_us_settled'), 1)} settled")


def _bounded(value: bool | None) -> str:
    return {True: "bounded", False: "still growing (cannot keep up)", None: "too short to tell"}[value]


def _kept_up(run: dict[str, Any]) -> bool:
    """The offered rate was served: nothing dropped or failed, and the client sent on time."""
    return not run["dropped"] and not run["errors"] and run["late"] <= 0.01 * max(run["requests"], 1)


def paced_line(workers: int, run: dict[str, Any]) -> str:
    return (f"paced --workers {workers}: {_fmt(run['offered_rps'], 0)} req/s offered, {_fmt(run['rps'], 0)} "
            f"answered ({run['errors']} errors, {run['dropped']} dropped, {run['late']} sent late), "
            f"p50 {_fmt(run['p50_ms'], 3)} ms p99 {_fmt(run['p99_ms'], 3)} ms from schedule; "
            f"{run['processes']} processes: CPU {_fmt(run['cpu_us_per_request'], 1)} us/request during, "
            f"{_fmt(run.get('cpu_us_settled'), 1)} settled")


def streams_line(target: str, extra: dict[str, Any]) -> str:
    return (f"{target:<16} {extra['streams']} streams x {extra['chunks']} chunks at once "
            f"({extra['chunk_delay_ms']:g} ms apart): {extra['byte_exact']}/{extra['streams']} byte-exact, "
            f"peak {extra['peak_open']} open, RSS idle {extra['idle_rss_kb'] / 1024:.1f} MB -> peak "
            f"{extra['peak_rss_kb'] / 1024:.1f} MB = {extra['rss_per_stream_kb']:.1f} KB/stream, "
            f"{extra['seconds']:.1f} s"
            + (f"; first failure: {extra['failures'][0]}" if extra.get("failures") else ""))


def price_line(service: str, priced: dict[str, Any]) -> str:
    cost = service_cost(priced)
    return (f"price of {service}: with {_fmt(priced['with']['rps_median'], 0)} req/s "
            f"{priced['with']['rps_runs']}, without {_fmt(priced['without']['rps_median'], 0)} req/s "
            f"{priced['without']['rps_runs']}; CPU per request {priced['with']['cpu_us_runs']} vs "
            f"{priced['without']['cpu_us_runs']} us, ratios by round {priced['round_ratios']}; "
            f"cost {_fmt(cost['cpu_pct'], 1)}% more CPU per request (median round), "
            f"{_fmt(cost['rps_pct'], 1)}% of req/s (medians)")


def service_cost(priced: dict[str, Any]) -> dict[str, float | None]:
    """What a service costs at json c=32, in percent: CPU per request added (the median of the
    rounds' with/without ratios), and req/s lost (from the sides' medians)."""
    with_, without = priced["with"], priced["without"]
    rps = cpu = None
    if without["rps_median"]:
        rps = round((1 - with_["rps_median"] / without["rps_median"]) * 100, 2)
    if priced.get("round_ratios"):
        cpu = round((statistics.median(priced["round_ratios"]) - 1) * 100, 2)
    return {"rps_pct": rps, "cpu_pct": cpu}


def _find(rows: list[dict[str, Any]], target: str, mode: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if (r["target"], r["mode"], r["concurrency"]) == (target, mode, concurrency)), None)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "rps") -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def _minus(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or a.get(key) is None or b.get(key) is None:
        return None
    return round(a[key] - b[key], 3)


def _target(ident: str, text: str, value: float | None, ok: bool | None, measured: str) -> dict[str, Any]:
    status = "N/A" if value is None or ok is None else ("PASS" if ok else "FAIL")
    return {"id": ident, "target": text, "value": value, "measured": measured, "status": status}


def _cpu(row: dict[str, Any] | None) -> float | None:
    return None if row is None else row.get("cpu_us_settled")


def _status(value: float | None, ok: bool | None) -> str:
    return "N/A" if value is None or ok is None else ("PASS" if ok else "FAIL")


def _goal(ident: str, text: str, value: float | None, ok: bool | None, measured: str,
          status: str | None = None) -> dict[str, Any]:
    return {"id": ident, "target": text, "value": value, "measured": measured,
            "status": status or _status(value, ok)}


def _at_most(ident: str, text: str, value: float | None, limit: float, measured: str,
             missing: str | None = None) -> dict[str, Any]:
    if value is None and missing:
        return _goal(ident, text, None, None, missing, "FAIL" if missing.startswith("did not settle") else None)
    return _goal(ident, text, value, None if value is None else value <= limit, measured)


def target_table(rows: list[dict[str, Any]], targets: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per target: the stack it ran on and its figures, settled CPU included."""
    table = []
    for name in TARGETS:
        info = targets.get(name)
        if info is None:
            continue
        j32, j1, s1 = _find(rows, name, "json", 32), _find(rows, name, "json", 1), _find(rows, name, "stream", 1)
        table.append({
            "target": name, "server": info.get("server", "?"), "loop": info.get("loop", "?"),
            "started_on": info.get("started_on", info.get("server", "?")),
            "available": info.get("available", True), "note": info.get("note", ""),
            "rps_c32": j32 and j32["rps"], "p50_ms_c1": j1 and j1["p50_ms"], "ttfb_ms_c1": s1 and s1["ttfb_p50_ms"],
            "cpu_us_during": j32 and j32.get("cpu_us_per_request"),
            "cpu_us_settled": j32 and j32.get("cpu_us_settled"), "settle_s": j32 and j32.get("settle_s"),
            "settled": j32 is None or j32.get("cpu_us_settled") is not None})
    return table


def summarise(rows: list[dict[str, Any]], extras: dict[str, Any], settings: Any, notes: list[str],
              targets: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    targets = targets or {}
    g32, m32, d32, r32, x32, n32 = (_find(rows, t, "json", 32) for t in (GATEWAY, MINIMAL, DIRECT, RELAY, MISSING,
                                                                         GRANIAN))
    g1, m1, d1 = (_find(rows, t, "json", 1) for t in (GATEWAY, MINIMAL, DIRECT))
    gs1, ms1, ds1 = (_find(rows, t, "stream", 1) for t in (GATEWAY, MINIMAL, DIRECT))
    gs32, ms32 = _find(rows, GATEWAY, "stream", 32), _find(rows, MINIMAL, "stream", 32)
    ratios = {
        "gateway/minimal json c=32": _ratio(g32, m32),
        "gateway/relay json c=32": _ratio(g32, r32),
        "gateway/minimal stream c=32": _ratio(gs32, ms32),
        "gateway-granian/gateway json c=32": _ratio(n32, g32),
        "relay/minimal json c=32": _ratio(r32, m32),
        "minimal/direct json c=32": _ratio(m32, d32),
        "CPU/req settled, gateway/minimal": _ratio(g32, m32, "cpu_us_settled"),
        "CPU/req settled, gateway-missing/minimal": _ratio(x32, m32, "cpu_us_settled"),
        "CPU/req settled, gateway-granian/gateway": _ratio(n32, g32, "cpu_us_settled"),
    }
    added = {
        "json c=1 p50 ms, gateway - direct": _minus(g1, d1, "p50_ms"),
        "json c=1 p50 ms, gateway - minimal": _minus(g1, m1, "p50_ms"),
        "stream c=1 TTFB p50 ms, gateway - direct": _minus(gs1, ds1, "ttfb_p50_ms"),
        "stream c=1 TTFB p50 ms, gateway - minimal": _minus(gs1, ms1, "ttfb_p50_ms"),
    }
    many = extras.get(GATEWAY) or {}
    idle = extras.get(f"{GATEWAY}_idle_rss_kb")
    n = settings.concurrent_streams
    exact, per_stream = many.get("byte_exact"), many.get("rss_per_stream_kb")
    cpu_all, cpu_missing = ratios["CPU/req settled, gateway/minimal"], ratios["CPU/req settled, gateway-missing/minimal"]
    rps_min, rps_relay = ratios["gateway/minimal json c=32"], ratios["gateway/relay json c=32"]
    latency, ttfb = added["json c=1 p50 ms, gateway - direct"], added["stream c=1 TTFB p50 ms, gateway - direct"]
    loop = targets.get(GATEWAY, {}).get("loop")

    def unsettled(row: dict[str, Any] | None, target: str) -> str | None:
        if target in targets and not targets[target].get("available", True):
            return "not available (see notes)"
        if row is not None and row.get("cpu_us_settled") is None and "cpu_us_settled" in row:
            return f"did not settle within {settings.settle_timeout_s:g} s: the gateway cannot keep up"
        return None

    goals = [
        _at_most("1", "CPU/request settled, policy all <= 1.0x minimal", cpu_all, 1.0,
                 f"{_fmt(cpu_all, 3)}x ({_fmt(_cpu(g32), 1)} vs {_fmt(_cpu(m32), 1)} us)", unsettled(g32, GATEWAY)),
        _at_most("4", "CPU/request settled, policy missing <= 0.6x minimal", cpu_missing, 0.6,
                 f"{_fmt(cpu_missing, 3)}x ({_fmt(_cpu(x32), 1)} vs {_fmt(_cpu(m32), 1)} us)", unsettled(x32, MISSING)),
        _goal("6a", "json c=32 req/s >= 1.5x minimal pass-through", rps_min,
              None if rps_min is None else rps_min >= 1.5,
              f"{_fmt(rps_min, 3)}x ({_fmt(g32 and g32['rps'], 0)} vs {_fmt(m32 and m32['rps'], 0)} req/s)"),
        _goal("6b", "json c=32 req/s >= 0.35x speed-of-light relay", rps_relay,
              None if rps_relay is None else rps_relay >= 0.35,
              f"{_fmt(rps_relay, 3)}x ({_fmt(g32 and g32['rps'], 0)} vs {_fmt(r32 and r32['rps'], 0)} req/s)"),
        _at_most("6c", "json c=1 p50 added over direct <= 0.30 ms", latency, 0.30,
                 f"{_fmt(latency, 3)} ms ({_fmt(g1 and g1['p50_ms'], 3)} vs {_fmt(d1 and d1['p50_ms'], 3)})"),
        _at_most("6d", "stream c=1 TTFB p50 added over direct <= 0.5 ms", ttfb, 0.5,
                 f"{_fmt(ttfb, 3)} ms ({_fmt(gs1 and gs1['ttfb_p50_ms'], 3)} vs {_fmt(ds1 and ds1['ttfb_p50_ms'], 3)})"),
        _at_most("6e", "RSS per stream in flight <= 40 KB", per_stream, 40,
                 f"{_fmt(per_stream, 1)} KB ({_fmt(many.get('peak_rss_kb'))} - {_fmt(many.get('idle_rss_kb'))} KB "
                 f"over {n} streams)"),
        _goal("2", "single-worker gateway runs on uvloop", None if loop is None else 1.0,
              None if loop in (None, "?") else loop == "uvloop",
              f"loop {loop or '-'}, server {targets.get(GATEWAY, {}).get('server', '-')} (from GET /health)",
              "N/A" if loop in (None, "?") else None),
    ]
    for target, policy, ident in ((GATEWAY, "all", "1"), (MISSING, "missing", "4")):
        goals += _sustained_goals(extras.get(f"sustained:{target}"), policy, ident, targets.get(target), settings)
    workers = extras.get("workers")
    ratio = workers and workers.get("ratio")
    kept_up = workers and all(_kept_up(workers[n]) for n in ("1", "2"))
    goals.append(_at_most(
        "7", "paced: --workers 2 CPU/request <= 1.1x --workers 1", ratio, 1.1,
        "-" if not workers else (f"{_fmt(ratio, 3)}x ({_fmt(workers['2'].get('cpu_us_settled'), 1)} vs "
                                 f"{_fmt(workers['1'].get('cpu_us_settled'), 1)} us settled at "
                                 f"{workers['rate']:g} req/s offered, {workers['pinning']}"
                                 + ("" if kept_up else "; one did not keep up with the rate") + ")"),
        None if not workers or ratio is not None else "did not settle (one of them)"))
    goals += [  # the standing targets of issues 8 and 5, still checked
        _goal("s1", f"{n} concurrent streams x {settings.concurrent_chunks} chunks all byte-exact", exact,
              None if exact is None else exact == n and many.get("errors") == 0,
              f"{_fmt(exact)}/{n} byte-exact, peak {_fmt(many.get('peak_open'))} open"),
        _at_most("s2", "idle RSS of one gateway worker <= 80 MB", idle, 80 * 1024,
                 f"{_fmt(idle and idle / 1024, 1)} MB"),
    ]
    costs = {}
    for key, priced in extras.items():
        if key.startswith("price:"):
            costs[key.removeprefix("price:")] = {**service_cost(priced), **priced}
    limits = costs.get("limits")
    if limits is not None:
        cost = limits["cpu_pct"]  # judged on CPU per request (median round), the steadier measure on a shared box
        goals.append(_at_most(
            "s3", "json c=32: limits cost <= 5% (CPU/request, with vs without)", cost, 5,
            f"{_fmt(cost, 1)}% CPU/request (median of {len(limits['round_ratios'])} rounds; pooled "
            f"{limits['with']['cpu_us_per_request']} vs {limits['without']['cpu_us_per_request']} us); "
            f"req/s {_fmt(limits['rps_pct'], 1)}% ({_fmt(limits['with']['rps_median'], 0)} vs "
            f"{_fmt(limits['without']['rps_median'], 0)})"))
    table = target_table(rows, targets)
    stack = [t for t in table if t["target"] in (GATEWAY, GRANIAN)]
    return {"rows": rows, "ratios": ratios, "added_ms": added, "service_costs": costs, "per_target": table,
            "server_stack": stack, "sustained": {k.removeprefix("sustained:"): v for k, v in extras.items()
                                                 if k.startswith("sustained:")},
            "workers": workers,
            "concurrent_streams": {k: v for k, v in extras.items()
                                   if not k.startswith(("price:", "sustained:")) and k != "workers"},
            "targets": goals, "notes": notes}


def _sustained_goals(summary: dict[str, Any] | None, policy: str, ident: str, info: dict[str, Any] | None,
                     settings: Any) -> list[dict[str, Any]]:
    bounded_text = f"sustained c=32, policy {policy}: settlement backlog bounded"
    empty_text = f"sustained c=32, policy {policy}: backlog empty <= 30 s after"
    bounded_id, empty_id = ident + "b", ident + "c"
    if summary is None:
        why = "not run" if info is None or info.get("available", True) else "not available (see notes)"
        return [_goal(bounded_id, bounded_text, None, None, why), _goal(empty_id, empty_text, None, None, why)]
    bounded, settled = summary["bounded"], summary["settled_s"]
    return [
        _goal(bounded_id, bounded_text, summary["peak"], bounded,
              f"peak {_fmt(summary['peak'], 0)}, {_bounded(bounded)} over {summary['seconds']:g} s "
              f"({len(summary['samples_during'])} samples)"),
        _goal(empty_id, empty_text, settled, None if settled is None else settled <= 30,
              f"did not settle within {settings.settle_timeout_s:g} s: the gateway cannot keep up" if settled is None
              else f"{settled:.1f} s (from {_fmt(summary['at_load_end'], 0)} at the load's end)",
              "FAIL" if settled is None else None),
    ]


def render(results: dict[str, Any]) -> str:
    lines = ["", "per target (json c=32 unless said; CPU is the server's process tree; settled = until its pending "
             "look-ups and usage writes are back to 0):",
             f"  {'target':<16} {'server':<8} {'loop':<7} {'req/s c32':>9} {'p50 c1':>7} {'TTFB c1':>8} "
             f"{'CPU us/req':>10} {'settled':>14} {'in s':>5}"]
    for t in results.get("per_target", []):
        if not t["available"]:
            lines.append(f"  {t['target']:<16} not available (see notes)")
            continue
        lines.append(f"  {t['target']:<16} {t['server']:<8} {t['loop']:<7} {_fmt(t['rps_c32'], 0):>9} "
                     f"{_fmt(t['p50_ms_c1'], 3):>7} {_fmt(t['ttfb_ms_c1'], 3):>8} {_fmt(t['cpu_us_during'], 1):>10} "
                     f"{_fmt(t['cpu_us_settled'], 1) if t['settled'] else 'did not settle':>14} "
                     f"{_fmt(t['settle_s'], 1):>5}")
    lines += ["", "ratios:"]
    lines += [f"  {name:<44} {_fmt(value, 3)}" for name, value in results["ratios"].items()]
    lines += ["added latency (ms):"]
    lines += [f"  {name:<44} {_fmt(value, 3)}" for name, value in results["added_ms"].items()]
    lines += ["service costs at json c=32 (with vs without; % of req/s lost, % more CPU per request):"]
    lines += [f"  {name:<44} {_fmt(cost['rps_pct'], 1)}% req/s, {_fmt(cost['cpu_pct'], 1)}% CPU"
              for name, cost in results.get("service_costs", {}).items()]
    stack = results.get("server_stack") or []
    if stack:
        lines += ["", "server stack (the gateway, policy all, one worker; started on, then as /health says):",
                  f"  {'started on':<10} {'/health':<16} {'req/s c32':>9} {'CPU us/req settled':>18} "
                  f"{'p50 c1 ms':>9} {'TTFB c1 ms':>10}"]
        lines += [f"  {t['started_on']:<10} {t['server'] + ', ' + t['loop']:<16} {_fmt(t['rps_c32'], 0):>9} "
                  f"{_fmt(t['cpu_us_settled'], 1):>18} {_fmt(t['p50_ms_c1'], 3):>9} {_fmt(t['ttfb_ms_c1'], 3):>10}"
                  f"   ({t['target']})" for t in stack]
    if results.get("sustained"):
        lines += ["", f"sustained: {next(iter(results['sustained'].values()))['bounded_rule']}"]
    lines += ["", "goals (one run, same machine):", f"  {'id':<3} {'goal':<62} {'status':<6} measured"]
    lines += [f"  {t['id']:<3} {t['target']:<62} {t['status']:<6} {t['measured']}" for t in results["targets"]]
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
