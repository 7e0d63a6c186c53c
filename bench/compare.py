"""`python -m bench.compare --before A.json [B.json ...] --after C.json [D.json ...]`: a table.

Prints docs/BENCH.md's side-by-side table of the figures issue 16 names, from results files of
`python -m bench` (several runs a side give the median, and the range beside it). A figure
missing on a side (a benchmark that did not exist or did not run there) shows as "-".
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# (label, figure, where in its record, unit, what it is measured on)
ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("worker CPU per step, zero-latency provider", "worker_http_vs_bare_client_c256",
     "conditions.worker_cpu_us_per_step", "us",
     "one `chainyard worker`, 256 slots, full OpenAI sandbox, 20,000 steps, median of 3 rounds"),
    ("worker CPU per step, load sandbox", "worker_http_vs_bare_client_c256",
     "conditions.against_load_sandbox.worker_cpu_us_per_step", "us",
     "same, against chainyard.sandbox.load (~20 us a request)"),
    ("worker CPU per provider call, 1,000 calls/s at 200 ms",
     "worker_cpu_us_per_call_1000rps_200ms", "value", "us",
     "bench.provider_calls: one `chainyard worker`, ~200 calls in flight, load sandbox, work"
     " published as it goes, 20,000 calls"),
    ("  the sandbox's CPU per call in the same span", "worker_cpu_us_per_call_1000rps_200ms",
     "baseline_value", "us", "the yardstick: code no change here touches"),
    ("service CPU per chain, tracing off", "tracing_overhead_ratio",
     "conditions.cpu_us_per_chain_off", "us",
     "router + worker + driver in one process, NullProvider, 256 in flight"),
    ("service CPU per chain, tracing on (100%)", "tracing_overhead_ratio",
     "conditions.cpu_us_per_chain_on", "us", "same, every span exported over OTLP/HTTP"),
    ("tracing CPU per span in the service (100%)", "tracing_overhead_ratio",
     "conditions.tracing_cpu_us_per_span|conditions.tracing_cpu_us_per_exported_span", "us",
     "(on - off) per chain / spans per chain; before: the export is in a helper process"),
    ("  + export CPU per span in the helper process", "tracing_overhead_ratio",
     "conditions.export_cpu_us_per_span", "us", "before only (after: in the service's row)"),
    ("tracing CPU per span, all processes (100%)", "tracing_overhead_ratio",
     "conditions.tracing_cpu_us_per_span+conditions.export_cpu_us_per_span"
     "|conditions.tracing_cpu_us_per_exported_span", "us", "the two rows above added"),
    ("spans per chain (100%)", "tracing_overhead_ratio",
     "conditions.spans_per_chain|conditions.spans_exported_per_chain", "", "one-step chain"),
    ("`tracing_overhead_ratio`, 100% sampled", "tracing_overhead_ratio", "ratio", "",
     "chains/s traced / off, same run; goal >= 0.6"),
    ("`tracing_overhead_ratio_sampled`, parentbased_traceidratio 0.1",
     "tracing_overhead_ratio_sampled", "ratio", "",
     "OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG=0.1; goal >= 0.9"),
    ("  service CPU per chain, 0.1 sampled", "tracing_overhead_ratio_sampled",
     "conditions.cpu_us_per_chain_on", "us", "same process as the 100% rows"),
    ("  spans per chain (0.1)", "tracing_overhead_ratio_sampled",
     "conditions.spans_per_chain|conditions.spans_exported_per_chain", "",
     "about a tenth of the 100% row"),
    ("step transition p50", "step_transition_p50_ms", "value", "ms",
     "event published -> next assignment published, half of saturation, in one process"),
    ("step transition p99", "step_transition_p99_ms", "value", "ms", "same"),
    ("chain latency p50, one at a time", "chain_latency_p50_ms", "value", "ms",
     "one-step chain, NullProvider, router + worker in one process"),
    ("chain latency p99, one at a time", "chain_latency_p99_ms", "value", "ms", "same"),
    ("chain latency p50 at half of saturation", "added_latency_p50_ms",
     "conditions.chain_p50_ms", "ms", "5 processes, zero-latency load sandbox"),
    ("chain latency p99 at half of saturation", "added_latency_p99_ms",
     "conditions.chain_p99_ms", "ms", "same"),
    ("chain latency p50, one chain at a time, 5 processes", "added_latency_p50_ms",
     "conditions.one_at_a_time_p50_ms", "ms", "same processes, one chain in flight"),
    ("chains/s vs raw JetStream loop", "nats_path_vs_raw_jetstream", "ratio", "",
     "ratio in the same run"),
    ("RSS, 10,000 calls in flight", "inflight_10k_rss_mb", "value", "MB",
     "one worker, 10,000 slots, provider holds 30 s; goal <= 1024"),
    ("steps/s, 10,000 in flight at 1 s", "inflight_10k_steps_per_s", "value", "steps/s",
     "same worker, goal within 10% of 10,000"),
    ("worker steps/s vs bare client, c256", "worker_http_vs_bare_client_c256", "ratio", "",
     "ratio in the same run"),
    ("routing decision, 50 deployments", "routing_decision_us_50_deployments", "value", "us", ""),
    ("failover reroute", "failover_reroute_ms", "value", "ms", "provider goes dark under load"),
    ("Portkey: chainyard added p50, 1 in flight", "peer_added_p50_ms_c1", "value", "ms",
     "one-step chain over a direct 20 ms call; 3 processes + nats-server"),
    ("  Portkey added p50, 1 in flight", "peer_added_p50_ms_c1", "baseline_value", "ms",
     "same stand-in through Portkey, same run"),
    ("Portkey: chainyard added p99, 1 in flight", "peer_added_p99_ms_c1", "value", "ms", ""),
    ("  Portkey added p99, 1 in flight", "peer_added_p99_ms_c1", "baseline_value", "ms", ""),
    ("Portkey: chainyard added p50, 32 in flight", "peer_added_p50_ms_c32", "value", "ms", ""),
    ("  Portkey added p50, 32 in flight", "peer_added_p50_ms_c32", "baseline_value", "ms", ""),
    ("Portkey: chainyard added p99, 32 in flight", "peer_added_p99_ms_c32", "value", "ms", ""),
    ("  Portkey added p99, 32 in flight", "peer_added_p99_ms_c32", "baseline_value", "ms", ""),
    ("Portkey: chainyard CPU per request, 1 in flight", "peer_cpu_us_per_request_c1", "value",
     "us", "router + worker processes (nats-server apart)"),
    ("  Portkey CPU per request, 1 in flight", "peer_cpu_us_per_request_c1", "baseline_value",
     "us", "its node process"),
    ("Portkey: chainyard CPU per request, 32 in flight", "peer_cpu_us_per_request_c32", "value",
     "us", ""),
    ("  Portkey CPU per request, 32 in flight", "peer_cpu_us_per_request_c32", "baseline_value",
     "us", ""),
)  # fmt: skip


def _get(record: dict[str, Any], path: str) -> float | None:
    """The number at a dotted path; `a+b` adds two, `a|b` takes the first found."""
    for alt in path.split("|"):
        parts = [_one(record, p) for p in alt.split("+")]
        if all(x is not None for x in parts):
            return sum(x for x in parts if x is not None)
    return None


def _one(record: dict[str, Any], path: str) -> float | None:
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _load(args: list[str]) -> list[dict[str, dict[str, Any]]]:
    """One {figure: record} a file; `SUFFIX=PATH` appends SUFFIX to the figure names of PATH (a
    run with other settings, e.g. `_sampled=tracing-0.1.json`)."""
    runs = []
    for arg in args:
        suffix, _, path = arg.rpartition("=")
        runs.append({r["name"] + suffix: r for r in json.loads(Path(path).read_text())})
    return runs


def _cell(runs: list[dict[str, dict[str, Any]]], figure: str, path: str) -> tuple[str, float]:
    """Median over the runs of the first of `figure`'s names (`a|b`) each run has."""
    xs = []
    for run in runs:
        name = next((f for f in figure.split("|") if f in run), None)
        if name is not None and (x := _get(run[name], path)) is not None:
            xs.append(x)
    if not xs:
        return "-", float("nan")
    m = statistics.median(xs)
    digits = 3 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
    text = f"{m:,.{digits}f}"
    if len(xs) > 1:
        text += f" ({min(xs):,.{digits}f}-{max(xs):,.{digits}f})"
    return text, m


def table(before: list[str], after: list[str], labels: tuple[str, str]) -> str:
    b, a = _load(before), _load(after)
    out = [
        f"| figure | {labels[0]} | {labels[1]} | after / before | conditions |",
        "|---|---|---|---|---|",
    ]
    for label, figure, path, unit, cond in ROWS:
        bt, bv = _cell(b, figure, path)
        at, av = _cell(a, figure, path)
        change = f"{av / bv:.2f}" if bv and bv == bv and av == av else "-"
        unit_s = f" {unit}" if unit and bt != "-" else ""
        unit_a = f" {unit}" if unit and at != "-" else ""
        out.append(f"| {label} | {bt}{unit_s} | {at}{unit_a} | {change} | {cond} |")
    return "\n".join(out)


PEER_ROWS = (
    ("added p50, 1 in flight", "peer_added_p50_ms_c1", "ms"),
    ("added p99, 1 in flight", "peer_added_p99_ms_c1", "ms"),
    ("added p50, 32 in flight", "peer_added_p50_ms_c32", "ms"),
    ("added p99, 32 in flight", "peer_added_p99_ms_c32", "ms"),
    ("CPU per request, 1 in flight", "peer_cpu_us_per_request_c1", "us"),
    ("CPU per request, 32 in flight", "peer_cpu_us_per_request_c32", "us"),
)


def peer_table(before: list[str], after: list[str], labels: tuple[str, str]) -> str:
    """chainyard beside Portkey (each figure's value and its same-run baseline), both sides."""
    b, a = _load(before), _load(after)
    out = [
        f"| | {labels[0]}: chainyard | Portkey | {labels[1]}: chainyard | Portkey |",
        "|---|---|---|---|---|",
    ]
    for label, figure, unit in PEER_ROWS:
        cells = [
            _cell(side, figure, path)[0] for side in (b, a) for path in ("value", "baseline_value")
        ]
        out.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    ap.add_argument("--before", nargs="+", required=True, metavar="[SUFFIX=]PATH")
    ap.add_argument("--after", nargs="+", required=True, metavar="[SUFFIX=]PATH")
    ap.add_argument("--labels", nargs=2, default=("before", "after"))
    ap.add_argument("--peers", action="store_true", help="the Portkey row's table instead")
    args = ap.parse_args()
    make = peer_table if args.peers else table
    print(make(args.before, args.after, tuple(args.labels)))


if __name__ == "__main__":
    main()
