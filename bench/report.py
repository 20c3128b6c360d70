"""From raw measurements to verdicts: medians, ratios, targets, the Markdown table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .workloads import Sizes

__all__ = [
    "ClusterRow",
    "Row",
    "cluster_markdown",
    "cluster_rows",
    "events_markdown",
    "lean_markdown",
    "markdown",
    "per_run",
    "rows",
    "signing_markdown",
]

# Targets of issue 20 ("Performance, second step"): medians of interleaved runs vs raw, and
# floors that must hold run by run (each aioqueue run against the raw run beside it).
RPC_RATIO = 3.5  # aioqueue rpc ≥ 3.5 x raw
FIRE_RATIO = 4.5  # aioqueue fire ≥ 4.5 x raw
P50_RATIO = 0.8  # aioqueue latency p50 ≤ 0.8 x raw's
FLOOR_RATIO = 1.5  # rpc and fire, every run
P50_FLOOR = 1.0  # latency p50, every run: never slower than raw
SOAK_GROWTH_MB = 20.0  # worker RSS growth between the mark and the end
BACKLOG_FLAT_MB = 5.0  # "flat": producer RSS growth between the mark and the end
RATELIMIT_OFF = 0.10  # issue 18: 600 tasks at 50/s take 12 s within 10 %

Runs = list[dict[str, Any]]
Measurements = dict[str, dict[str, Runs]]  # workload → system → one result per run


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table; a ratio of None means "not compared", passed None "no target"."""

    label: str
    raw: float | None
    aioqueue: float | None
    ratio: float | None = None
    target: str = "—"
    passed: bool | None = None
    digits: int = 0


def _median(runs: Runs, key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def _verdict(value: float | None, low: float = -math.inf, high: float = math.inf) -> bool | None:
    """Whether ``low <= value <= high``; None when there is no value."""
    return None if value is None else low <= value <= high


def _worst_run(by_system: dict[str, Runs], key: str, *, high: bool) -> float | None:
    """The worst aioqueue/raw ratio of ``key`` over runs paired by index (highest when
    ``high``: a latency, lowest otherwise); None without a pair."""
    pairs = zip(by_system.get("aioqueue", []), by_system.get("raw", []), strict=False)
    ratios = [
        _ratio(a.get(key), r.get(key)) for a, r in pairs if "error" not in a and "error" not in r
    ]
    known = [x for x in ratios if x is not None]
    if not known:
        return None
    return max(known) if high else min(known)


def rows(measured: Measurements, sizes: Sizes) -> list[Row]:
    """The table's rows for whatever workloads were measured."""
    out: list[Row] = []
    for workload, factor, what in (
        ("rpc", RPC_RATIO, f"{sizes.rpc:,} concurrent round trips"),
        ("fire", FIRE_RATIO, f"{sizes.fire:,} tasks executed"),
    ):
        if workload in measured:
            raw = _median(measured[workload].get("raw", []), "rate")
            aq = _median(measured[workload].get("aioqueue", []), "rate")
            ratio = _ratio(aq, raw)
            label = f"{workload}: tasks/s ({what})"
            target = f"≥ {factor:.1f}x raw"
            out.append(Row(label, raw, aq, ratio, target, _verdict(ratio, low=factor)))
            worst = _worst_run(measured[workload], "rate", high=False)
            out.append(
                Row(
                    f"{workload}: lowest run-by-run ratio (floor)",
                    None,
                    None,
                    worst,
                    f"≥ {FLOOR_RATIO:.1f}x raw in every run",
                    _verdict(worst, low=FLOOR_RATIO),
                )
            )
    if "latency" in measured:
        raw_runs = measured["latency"].get("raw", [])
        aq_runs = measured["latency"].get("aioqueue", [])
        p50 = _median(aq_runs, "p50_ms")
        raw_p50 = _median(raw_runs, "p50_ms")
        label = f"latency: p50 ms ({sizes.latency:,} sequential)"
        slower = _ratio(p50, raw_p50)  # aioqueue's p50 as a multiple of raw's
        passed = _verdict(slower, high=P50_RATIO)
        target = f"p50 ≤ {P50_RATIO}x raw's (ratio ≥ {1 / P50_RATIO:.2f})"
        out.append(Row(label, raw_p50, p50, _ratio(raw_p50, p50), target, passed, 3))
        slowest = _worst_run(measured["latency"], "p50_ms", high=True)
        worst = None if not slowest else 1 / slowest  # raw/aioqueue, as the row above
        out.append(
            Row(
                "latency: lowest run-by-run ratio (floor)",
                None,
                None,
                worst,
                f"p50 ≤ {P50_FLOOR:.1f}x raw's in every run (ratio ≥ {1 / P50_FLOOR:.2f})",
                _verdict(worst, low=1 / P50_FLOOR),
                2,
            )
        )
        raw_p99, p99 = _median(raw_runs, "p99_ms"), _median(aq_runs, "p99_ms")
        out.append(Row("latency: p99 ms", raw_p99, p99, _ratio(raw_p99, p99), digits=3))
    out += _soak_rows(measured.get("soak", {}).get("aioqueue", []), sizes)
    out += _backlog_rows(measured.get("backlog", {}).get("aioqueue", []), sizes)
    out += _ratelimit_rows(measured.get("ratelimit", {}).get("aioqueue", []), sizes)
    return out


def events_markdown(measured: Measurements) -> str:
    """The cost of task events: aioqueue (events on, the default) against its worker with
    ``--no-events``, medians of the same runs; empty unless ``--events`` measured it."""
    head = [
        "Task events (worker with events on, the default, vs `--no-events`; medians):",
        "",
        "| figure | events on | events off | on vs off |",
        "|---|---:|---:|---:|",
    ]
    return _paired(measured, "aioqueue", "aioqueue-no-events", head)


def lean_markdown(measured: Measurements) -> str:
    """Where this broker's limit is: `bench.lean` (the thinnest client with aioqueue's wire
    guarantees), raw and aioqueue, medians of the same runs, with what the targets ask as a
    share of lean's rate; empty unless ``--lean`` measured it."""
    lines = []
    for workload, target in (("rpc", RPC_RATIO), ("fire", FIRE_RATIO)):
        systems = measured.get(workload, {})
        raw, ours, lean = (_median(systems.get(s, []), "rate") for s in ("raw", "aioqueue", "lean"))
        if raw is None or ours is None or lean is None or not raw or not lean:
            continue
        lines.append(
            f"| {workload} tasks/s | {raw:,.0f} | {ours:,.0f} | {lean:,.0f} | {lean / raw:.2f}x "
            f"| {ours / lean:.0%} | {target}x raw = {target * raw / lean:.0%} of lean |"
        )
    for key, unit in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
        systems = measured.get("latency", {})
        raw, ours, lean = (_median(systems.get(s, []), key) for s in ("raw", "aioqueue", "lean"))
        if raw is None or ours is None or lean is None or not ours:
            continue
        target = f"{P50_RATIO}x raw = {P50_RATIO * raw:.3f} ms" if key == "p50_ms" else "—"
        lines.append(
            f"| latency {unit} | {raw:.3f} | {ours:.3f} | {lean:.3f} | {raw / lean:.2f}x ¹ "
            f"| {lean / ours:.0%} ¹ | {target} |"
        )
    if not lines:
        return ""
    head = [
        "The broker's limit here: `lean` (`bench/lean.py`), the thinnest client with aioqueue's "
        "wire guarantees and none of its features (medians; ¹ latency: raw/lean, lean/aioqueue):",
        "",
        "| figure | raw | aioqueue | lean | lean vs raw | aioqueue vs lean | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    return "\n".join(head + lines)


def signing_markdown(measured: Measurements) -> str:
    """The cost of signed messages: aioqueue with signing keys on producer and worker against
    aioqueue without, medians of the same runs; empty unless ``--signing`` measured it."""
    head = [
        "Signed messages (signing keys on producer and worker vs none; medians):",
        "",
        "| figure | signing on | signing off | on vs off |",
        "|---|---:|---:|---:|",
    ]
    return _paired(measured, "aioqueue-signed", "aioqueue", head)


def otel_markdown(measured: Measurements) -> str:
    """The cost of tracing: aioqueue with a tracer provider configured (spans made and
    exported in batches to nowhere) against the default (the otel extra installed, no
    provider: tracing off), medians of the same runs; empty unless ``--otel`` measured it."""
    head = [
        "Tracing (OpenTelemetry provider configured vs none, the default; medians):",
        "",
        "| figure | tracing on | tracing off | on vs off |",
        "|---|---:|---:|---:|",
    ]
    return _paired(measured, "aioqueue-otel", "aioqueue", head)


def _paired(measured: Measurements, on_system: str, off_system: str, head: list[str]) -> str:
    lines = []
    for workload, key, unit in (
        ("rpc", "rate", "tasks/s"),
        ("fire", "rate", "tasks/s"),
        ("latency", "p50_ms", "p50 ms"),
        ("latency", "p99_ms", "p99 ms"),
    ):
        systems = measured.get(workload, {})
        on = _median(systems.get(on_system, []), key)
        off = _median(systems.get(off_system, []), key)
        if on is None or off is None:
            continue
        digits = 3 if unit.endswith("ms") else 0
        change = (on - off) / off * 100 if off else 0.0
        lines.append(
            f"| {workload} {unit} | {on:,.{digits}f} | {off:,.{digits}f} | {change:+.1f} % |"
        )
    if not lines:
        return ""
    return "\n".join(head + lines)


def _span(mark: int, end: int) -> str:
    return f"{mark // 1000}k→{end // 1000}k" if mark >= 1000 else f"{mark}→{end}"


def _soak_rows(runs: Runs, sizes: Sizes) -> list[Row]:
    if not runs:
        return []
    span = _span(sizes.soak_mark, sizes.soak)
    growth = _median(runs, "worker_growth_mb")
    target = f"< {SOAK_GROWTH_MB:g} MB"
    return [
        Row(
            f"soak: worker RSS growth {span}, MB",
            None,
            growth,
            target=target,
            passed=_verdict(growth, high=SOAK_GROWTH_MB),
            digits=1,
        ),
        Row(
            f"soak: producer RSS growth {span}, MB",
            None,
            _median(runs, "producer_growth_mb"),
            digits=1,
        ),
        Row(
            f"soak: tasks/s ({sizes.soak_window:,} in flight, 1 in {sizes.soak_rpc_every} "
            "a round trip)",
            None,
            _median(runs, "rate"),
        ),
    ]


def _backlog_rows(runs: Runs, sizes: Sizes) -> list[Row]:
    if not runs:
        return []
    growth = _median(runs, "producer_growth_mb")
    return [
        Row(
            f"backlog: producer RSS growth {_span(sizes.backlog_mark, sizes.backlog)}, MB",
            None,
            growth,
            target=f"flat (< {BACKLOG_FLAT_MB:g} MB)",
            passed=_verdict(growth, high=BACKLOG_FLAT_MB),
            digits=1,
        ),
        Row("backlog: sequential submits/s", None, _median(runs, "rate")),
    ]


def _ratelimit_rows(runs: Runs, sizes: Sizes) -> list[Row]:
    if not runs:
        return []
    seconds, ideal = _median(runs, "seconds"), _median(runs, "ideal_seconds")
    rate = _median(runs, "rate_limit")
    most = _median(runs, "most_in_a_second")
    low, high = (None, None) if ideal is None else (ideal * 0.9, ideal * 1.1)
    what = f"{sizes.ratelimit:,} tasks at {rate or 0:g}/s, 2 workers"
    return [
        Row(
            f"ratelimit: seconds ({what})",
            None,
            seconds,
            target="—" if ideal is None else f"{ideal:.1f} s ± 10 %",
            passed=None if low is None else _verdict(seconds, low=low, high=high),
            digits=2,
        ),
        Row(
            "ratelimit: most starts in any 1 s window",
            None,
            most,
            target=f"≤ {rate or 0:g} + 1",
            passed=None if rate is None else _verdict(most, high=rate + 1),
        ),
        Row(
            "ratelimit: busiest 1 s window begins (s after the first start)",
            None,
            _median(runs, "most_at"),
            digits=2,
        ),
    ]


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(table: list[Row]) -> str:
    """The table in Markdown, with a footnote on how the latency ratio reads."""
    lines = [
        "| workload | raw | aioqueue | aioqueue vs raw | target | verdict |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in table:
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}x"
        if row.ratio is not None and row.label.startswith("latency"):
            ratio += " ¹"
        verdict = {True: "PASS", False: "**FAIL**", None: "—"}[row.passed]
        cells = [row.label, _number(row.raw, row.digits), _number(row.aioqueue, row.digits)]
        lines.append("| " + " | ".join([*cells, ratio, row.target, verdict]) + " |")
    lines.append("")
    lines.append(
        "Ratios are aioqueue/raw for throughput; ¹ for latency raw/aioqueue: above 1 means "
        "aioqueue is faster. Throughput and latency are medians over the runs."
    )
    return "\n".join(lines)


def per_run(measured: Measurements, busy: float) -> str:
    """Each run's figure, to judge the spread behind the medians; * marks a contended run
    (other processes used more than ``busy`` cores on average meanwhile), † one during which
    the hypervisor stole more than `STOLEN_PCT` % of the machine's CPU time."""
    keys = {"rpc": ("rate", 0), "fire": ("rate", 0), "latency": ("p50_ms", 3)}
    lines = []
    for workload, (key, digits) in keys.items():
        for system, runs in measured.get(workload, {}).items():
            figures = ", ".join(_run_figure(run, key, digits, busy) for run in runs)
            lines.append(f"- {workload} {key} {system}: {figures}")
    for run in measured.get("ratelimit", {}).get("aioqueue", []):
        if "error" not in run:
            lines.append(
                f"- ratelimit aioqueue: {_run_figure(run, 'seconds', 2, busy)} s, most starts "
                f"in 1 s {run.get('most_in_a_second')} (from {run.get('most_at', 0.0):.2f} s)"
            )
    return "\n".join(lines)


STOLEN_PCT = 5.0  # the hypervisor took more of the machine's CPU time than this: marked †


def _run_figure(run: dict[str, Any], key: str, digits: int, busy: float) -> str:
    if "error" in run:
        return "error"
    machine = run.get("machine", {})
    other, stolen = machine.get("other_cores", 0.0), machine.get("steal_pct", 0.0)
    marks = ("*" if other > busy else "") + ("†" if stolen > STOLEN_PCT else "")
    return _number(run.get(key), digits) + marks


CLUSTER_NOTE = (
    "On this {cpus}-core machine the three nodes, the workers and the producer share {cpus} "
    "cores, so these figures show the cost of replication, not growth with more workers."
)


@dataclass(frozen=True, slots=True)
class ClusterRow:
    """One line of the cluster table: a system with some workers, its medians and the ratio of
    each to the single-node aioqueue (classic queue) median when that was measured."""

    label: str
    system: str
    workers: int
    rpc: float | None
    fire: float | None
    rpc_vs_single: float | None
    fire_vs_single: float | None


def cluster_rows(
    cluster: Measurements, single: Measurements | None, nodes: int = 3
) -> list[ClusterRow]:
    """aioqueue with 1..``nodes`` workers, then raw with one worker (systems named by
    `bench.suite.cluster_key`); ratios to ``single``'s aioqueue medians when given."""
    base = {
        w: _median((single or {}).get(w, {}).get("aioqueue", []), "rate") for w in ("rpc", "fire")
    }
    out = []
    setups = [("aioqueue", n) for n in range(1, nodes + 1)] + [("raw", 1)]
    for system, n in setups:
        key = f"{system}-{n}"
        rpc = _median(cluster.get("rpc", {}).get(key, []), "rate")
        fire = _median(cluster.get("fire", {}).get(key, []), "rate")
        if rpc is None and fire is None:
            continue
        where = "worker k on node k" if n > 1 else "on node 1"
        label = f"{system}, {n} worker{'s' if n > 1 else ''} ({where})"
        out.append(
            ClusterRow(
                label, system, n, rpc, fire, _ratio(rpc, base["rpc"]), _ratio(fire, base["fire"])
            )
        )
    return out


def cluster_markdown(table: list[ClusterRow], sizes: Sizes, cpus: int | None) -> str:
    """The "Cluster (3 nodes, quorum queues)" table; ratio columns only with single-node
    figures to compare with."""
    ratios = any(r.rpc_vs_single is not None or r.fire_vs_single is not None for r in table)
    head = [
        "setup (producer on node 1)",
        f"rpc tasks/s ({sizes.rpc:,})",
        f"fire tasks/s ({sizes.fire:,})",
    ]
    if ratios:
        head += ["rpc vs single-node aioqueue", "fire vs single-node aioqueue"]
    lines = [
        "### Cluster (3 nodes, quorum queues)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for row in table:
        cells = [row.label, _number(row.rpc, 0), _number(row.fire, 0)]
        if ratios:
            cells += [
                "—" if r is None else f"{r:.2f}x" for r in (row.rpc_vs_single, row.fire_vs_single)
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if ratios:
        lines.append(
            "Ratios: cluster figure / single-node aioqueue figure (classic queue, one worker, "
            "same invocation); medians over the runs. raw declares its task queue as a quorum "
            "queue too (its reply queue is exclusive, hence classic)."
        )
    else:
        lines.append(
            "Medians over the runs. raw declares its task queue as a quorum queue too (its reply "
            "queue is exclusive, hence classic)."
        )
    lines.append(CLUSTER_NOTE.format(cpus=cpus or "?"))
    return "\n".join(lines)
