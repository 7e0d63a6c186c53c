"""`chainyard trace CHAIN_ID`: a chain as a waterfall in the terminal.

Two sources: the chain's event log in CY_EVENTS (every step attempt with `dispatched_at_ms`,
`started_at_ms`, `latency_ms`: queued time `░`, run time `█`, a failed attempt `▒`), and, with
`--jaeger URL`, the chain's trace from Jaeger's `/api/v3/traces/{trace_id}` (the trace id is read
from the chain's state in KV `cy_chains`), drawn as the span tree.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import sys
from dataclasses import dataclass
from typing import Any

WIDTH = 48
LABEL = 46
MAX_INDENT = 12


@dataclass
class Row:
    label: str
    start_ms: float  # from the start of the waterfall
    queued_ms: float  # drawn light before the bar (dispatch -> start)
    run_ms: float
    note: str = ""
    failed: bool = False


def _bar(row: Row, span_ms: float, width: int) -> str:
    scale = width / span_ms if span_ms > 0 else 0.0
    a = round(row.start_ms * scale)
    q = round((row.start_ms + row.queued_ms) * scale)
    e = round((row.start_ms + row.queued_ms + row.run_ms) * scale)
    e = max(e, q + 1)  # every step is visible
    cells = [" "] * max(width, e)
    for i in range(a, q):
        cells[i] = "░"
    for i in range(q, e):
        cells[i] = "▒" if row.failed else "█"
    return "".join(cells[:width])


def render(rows: list[Row], title: str = "", width: int = WIDTH) -> str:
    if not rows:
        return f"{title}\n(nothing recorded)\n" if title else "(nothing recorded)\n"
    span_ms = max(r.start_ms + r.queued_ms + r.run_ms for r in rows) or 1.0
    label_w = min(max(len(r.label) for r in rows), LABEL)
    out = [title] if title else []
    scale = f"0 ms{'':{width - 4 - len(f'{span_ms:.0f} ms')}}{span_ms:.0f} ms"
    out.append(f"{'':{label_w}}  {scale}")
    for r in rows:
        label = r.label if len(r.label) <= label_w else r.label[: label_w - 1] + "…"
        dur = f"{r.run_ms:.0f} ms" if r.run_ms >= 1 else f"{r.run_ms:.2f} ms"
        out.append(f"{label:<{label_w}}  {_bar(r, span_ms, width)}  {dur:>9}  {r.note}".rstrip())
    return "\n".join(out) + "\n"


# -- from the event log ---------------------------------------------------------------------


def rows_from_events(events: list[Any]) -> tuple[list[Row], str]:
    """Step attempts (step.completed / step.failed) on one time axis; and a summary line."""
    steps = [e for e in events if type(e).__name__ in ("StepCompleted", "StepFailed")]
    ended = [e for e in events if type(e).__name__.startswith("Chain")]
    if not steps:
        return [], _summary(ended[-1]) if ended else ""
    t0 = min(e.dispatched_at_ms or e.started_at_ms for e in steps)
    rows = []
    for e in sorted(steps, key=lambda e: (e.dispatched_at_ms or e.started_at_ms, e.attempt)):
        dispatched = e.dispatched_at_ms or e.started_at_ms
        failed = type(e).__name__ == "StepFailed"
        where = e.target.deployment
        if failed:
            note = f"{where}: {e.error.cls}" + (f" {e.error.status}" if e.error.status else "")
        else:
            u = e.usage
            tokens = f" {u.input_tokens}/{u.output_tokens} tok" if u.input_tokens else ""
            note = f"{where}{tokens}" + (f" ${e.cost_usd:.6f}" if e.cost_usd else "")
        rows.append(
            Row(
                label=f"{e.step_id} #{e.attempt}",
                start_ms=dispatched - t0,
                queued_ms=max(e.started_at_ms - dispatched, 0) if e.started_at_ms else 0.0,
                run_ms=e.latency_ms,
                note=note,
                failed=failed,
            )
        )
    return rows, _summary(ended[-1]) if ended else "running"


def _summary(ev: Any) -> str:
    kind = ev.__struct_config__.tag
    parts = [kind]
    if hasattr(ev, "duration_ms"):
        parts.append(f"{ev.duration_ms:.0f} ms")
    if hasattr(ev, "usage"):
        parts.append(f"{ev.usage.input_tokens}+{ev.usage.output_tokens} tokens")
    if hasattr(ev, "cost_usd"):
        parts.append(f"${ev.cost_usd:.6f}")
    if getattr(ev, "reason", None):
        parts.append(ev.reason)
    return ", ".join(parts)


# -- from Jaeger (OTLP JSON) ------------------------------------------------------------------


def _hex_id(v: str | None) -> str:
    if not v:
        return ""
    if all(c in "0123456789abcdefABCDEF" for c in v) and len(v) in (16, 32):
        return v.lower()
    with contextlib.suppress(binascii.Error, ValueError):
        return base64.b64decode(v).hex()
    return v


def _attr(attrs: list[dict[str, Any]], key: str) -> Any:
    for kv in attrs or []:
        if kv.get("key") == key:
            val = kv.get("value", {})
            return next(iter(val.values()), None) if val else None
    return None


def spans_from_otlp_json(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten Jaeger's `/api/v3/traces/{id}` answer (OTLP JSON, maybe under `result`)."""
    body = doc.get("result", doc)
    out = []
    for rs in body.get("resourceSpans", []):
        service = _attr(rs.get("resource", {}).get("attributes", []), "service.name") or "?"
        for ss in rs.get("scopeSpans", rs.get("instrumentationLibrarySpans", [])):
            for s in ss.get("spans", []):
                out.append(
                    {
                        "service": service,
                        "name": s.get("name", ""),
                        "id": _hex_id(s.get("spanId")),
                        "parent": _hex_id(s.get("parentSpanId")),
                        "start": int(s.get("startTimeUnixNano", 0)),
                        "end": int(s.get("endTimeUnixNano", 0)),
                        "error": (s.get("status") or {}).get("code") in (2, "STATUS_CODE_ERROR"),
                        "attrs": s.get("attributes", []),
                    }
                )
    return out


def rows_from_spans(spans: list[dict[str, Any]]) -> list[Row]:
    """The span tree, depth first by start time, names indented by depth."""
    if not spans:
        return []
    ids = {s["id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
    t0 = min(s["start"] for s in spans)
    rows: list[Row] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start"]):
            note = s["service"]
            for key in (
                "chainyard.route.choice",
                "chainyard.deployment",
                "gen_ai.usage.output_tokens",
                "error.type",
            ):
                v = _attr(s["attrs"], key)
                if v is not None:
                    note += f" {key.rsplit('.', 1)[-1]}={v}"
            rows.append(
                Row(
                    label=(" " * min(depth, MAX_INDENT)) + s["name"],
                    start_ms=(s["start"] - t0) / 1e6,
                    queued_ms=0.0,
                    run_ms=max(s["end"] - s["start"], 0) / 1e6,
                    note=note,
                    failed=s["error"],
                )
            )
            walk(s["id"], depth + 1)

    walk("", 0)
    return rows


# -- the command ------------------------------------------------------------------------------


async def read_events(js: Any, subject: str, timeout_s: float = 2.0) -> list[Any]:
    """Every event on `subject` in the stream, oldest first (an ordered consumer, then stop)."""
    from nats.js.api import DeliverPolicy

    from chainyard.contracts import event_decoder

    got: list[Any] = []
    done = asyncio.Event()

    async def on(msg: Any) -> None:
        with contextlib.suppress(Exception):
            got.append(event_decoder.decode(msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subject, cb=on, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return got


async def fetch_jaeger(base: str, trace_id: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=10.0) as http:
        r = await http.get(f"{base.rstrip('/')}/api/v3/traces/{trace_id}")
        r.raise_for_status()
        return r.json()


async def run(
    chain_id: str,
    *,
    nats_url: str,
    tenant: str,
    creds: str | None = None,
    jaeger: str | None = None,
    prefix: str = "cy",
    out: Any = None,
) -> int:
    from chainyard.contracts import Subjects, Topology, state_decoder
    from chainyard.runtime.chain_trace import trace_id_of
    from chainyard.runtime.nats import connect

    out = out or sys.stdout
    topo = Topology(subjects=Subjects(prefix=prefix))
    nc = await connect(nats_url, name="chainyard-trace", creds=creds, max_reconnect_attempts=2)
    try:
        js = nc.jetstream()
        events = await read_events(js, topo.subjects.chain_events(tenant, chain_id))
        rows, summary = rows_from_events(events)
        out.write(render(rows, f"chain {chain_id} ({tenant}): {summary or 'no events'}"))
        trace_id = None
        with contextlib.suppress(Exception):
            kv = await js.key_value(topo.chains_kv.bucket)
            entry = await kv.get(f"{tenant}.{chain_id}")
            trace_id = trace_id_of(state_decoder.decode(entry.value))
        if trace_id:
            out.write(f"trace {trace_id}\n")
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
    if not events:
        return 1
    if jaeger:
        if not trace_id:
            out.write("no trace id in the chain's state (tracing was off at intake)\n")
            return 1
        doc = await fetch_jaeger(jaeger, trace_id)
        out.write("\n" + render(rows_from_spans(spans_from_otlp_json(doc)), f"jaeger {jaeger}"))
        out.write(f"open: {jaeger.rstrip('/')}/trace/{trace_id}\n")
    return 0
