"""`chainyard usage`: chains, steps, tokens and cost per tenant, model, pool, deployment or
metadata key, computed from the event log (stream CY_EVENTS): exact and replayable.

A chain is counted when it ends, from its terminal event (`chain.completed`, `chain.failed`,
`chain.cancelled`), which carries the chain's totals, its metadata and one summary per step
(pool, model, deployment, tokens, cost). So the report's totals are the sum of the chains'
terminal events in the window, whatever `--by`; a chain still running is counted once it ends.
The saving of the response cache comes from the `step.completed` events of cache hits
(`cached: true`, `saved_usd`), joined to their chain's end.

`UsageReport` is pure (events in, rows out); `scan()` feeds it from NATS; `run()` is the verb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from chainyard.contracts import ChainyardError, Topology, Usage

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

GROUPS = ("tenant", "model", "pool", "deployment")  # and metadata.<key>
STEP_GROUPS = ("model", "pool", "deployment")  # a chain's steps may fall in several rows
ENDS = ("chain.completed", "chain.failed", "chain.cancelled")
NONE = "-"  # the group of a step that was never routed, or a chain without the metadata key


# Just the fields the report reads: the events' outputs are never decoded.
class _StepSummary(msgspec.Struct, kw_only=True):
    step_id: str
    attempts: int = 0
    pool: str | None = None
    model: str | None = None
    deployment: str | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0


class _ChainEnd(msgspec.Struct, kw_only=True):
    chain_id: str
    usage: Usage = Usage()
    cost_usd: float = 0.0
    steps: list[_StepSummary] = []
    metadata: dict[str, str] = {}


class _StepDone(msgspec.Struct, kw_only=True):
    step_id: str
    cached: bool = False  # a response-cache hit (no provider call)
    saved_usd: float = 0.0  # what the call that stored the answer cost


_end_decoder = msgspec.json.Decoder(_ChainEnd)
_done_decoder = msgspec.json.Decoder(_StepDone)


class Refused(ChainyardError):
    """NATS refused the read of the event log (permissions), or is not there to answer."""


class UsageRow(msgspec.Struct, kw_only=True):
    key: str
    chains: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    steps: int = 0
    cached_steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0


COLUMNS = tuple(UsageRow.__struct_fields__)


class UsageReport:
    """Rows by `by` (one of GROUPS or `metadata.<key>`), fed event by event in stream order."""

    def __init__(self, by: str = "tenant") -> None:
        if by not in GROUPS and not (by.startswith("metadata.") and len(by) > len("metadata.")):
            raise ValueError(f"--by {by!r}: one of {', '.join(GROUPS)} or metadata.KEY")
        self.by = by
        self.rows: dict[str, UsageRow] = {}
        self.total = UsageRow(key="total")
        self._hits: dict[tuple[str, str, str], float] = {}  # cache hits awaiting their chain

    def add(self, subject: str, data: bytes, prefix: str = "cy") -> None:
        """One message of the event log (`<prefix>.events.<tenant>.<chain>.<type>`)."""
        parts = subject.split(".", 4)
        if len(parts) != 5 or parts[0] != prefix:
            return
        tenant, chain_id, kind = parts[2], parts[3], parts[4]
        if kind == "step.completed":
            done = _decode(_done_decoder, data)
            if done is not None and done.cached:
                self._hits[(tenant, chain_id, done.step_id)] = done.saved_usd
        elif kind in ENDS:
            end = _decode(_end_decoder, data)
            if end is not None and end.chain_id == chain_id:
                self.add_end(tenant, kind.removeprefix("chain."), end)

    def add_end(self, tenant: str, outcome: str, end: _ChainEnd) -> None:
        hits = {
            s.step_id: self._hits.pop((tenant, end.chain_id, s.step_id), None) for s in end.steps
        }
        cached = [saved for saved in hits.values() if saved is not None]
        ran = [s for s in end.steps if s.attempts or s.cost_usd or s.usage != Usage()]
        _count_chain(self.total, outcome)
        _count(self.total, len(ran), end.usage, end.cost_usd, len(cached), sum(cached))
        if self.by in STEP_GROUPS:
            seen: set[str] = set()
            for s in ran:
                key = getattr(s, self.by) or NONE
                row = self._row(key)
                if key not in seen:
                    seen.add(key)
                    _count_chain(row, outcome)
                saved = hits.get(s.step_id)
                _count(row, 1, s.usage, s.cost_usd, saved is not None, saved or 0.0)
            return
        if self.by == "tenant":
            key = tenant
        else:
            key = end.metadata.get(self.by.removeprefix("metadata."), NONE)
        row = self._row(key)
        _count_chain(row, outcome)
        _count(row, len(ran), end.usage, end.cost_usd, len(cached), sum(cached))

    def _row(self, key: str) -> UsageRow:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = UsageRow(key=key)
        return row

    def sorted_rows(self) -> list[UsageRow]:
        return sorted(self.rows.values(), key=lambda r: (-r.cost_usd, -r.chains, r.key))


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not ours to judge here: the ledger reports undecodable events


def _count_chain(row: UsageRow, outcome: str) -> None:
    row.chains += 1
    if outcome in ("completed", "failed", "cancelled"):
        setattr(row, outcome, getattr(row, outcome) + 1)


def _count(row: UsageRow, steps: int, usage: Usage, cost: float, cached: int, saved: float) -> None:
    row.steps += steps
    row.input_tokens += usage.input_tokens
    row.output_tokens += usage.output_tokens
    row.cost_usd += cost
    row.cached_steps += cached
    row.saved_usd += saved


def subject(topology: Topology, tenant: str | None) -> str:
    """The event log of one tenant or of every tenant (a tenant's NATS user may read only its
    own); `UsageReport.add` skips what is neither a step completion nor a chain's end."""
    if tenant:
        return f"{topology.subjects.prefix}.events.{tenant}.>"
    return topology.subjects.all_events


async def report(
    nc: NatsClient,
    *,
    by: str = "tenant",
    tenant: str | None = None,
    since: datetime | None = None,
    topology: Topology | None = None,
    limit_s: float = 600.0,
) -> UsageReport:
    """The report of the event log from `since` (every tenant's, or `tenant`'s alone)."""
    from nats.errors import Error as NatsError
    from nats.js.errors import NotFoundError

    from chainyard.ordered import follow

    topology = topology or Topology()
    rep = UsageReport(by)
    prefix = topology.subjects.prefix
    where = subject(topology, tenant)
    try:
        reader, done = await follow(
            nc,
            nc.jetstream(),
            topology.events.name,
            where,
            lambda m: rep.add(m.subject, m.data, prefix),
            since=since,
            flow_control=tenant is None,  # a tenant's user may not answer flow control
        )
    except NotFoundError:
        return rep  # no event log yet (no service has run): nothing to count
    except (NatsError, TimeoutError) as e:  # a denied request is never answered: a timeout
        raise Refused(
            f"NATS refused to read {where} ({e or type(e).__name__}); a tenant's user may "
            "read only its own events: --tenant <its name>"
        ) from e
    try:
        await asyncio.wait_for(done, limit_s)
    finally:
        await reader.stop()
    return rep


# -- output --------------------------------------------------------------------------------


def as_dict(row: UsageRow) -> dict[str, Any]:
    """A row for JSON; money rounded to 1e-12 USD (a sum of floats is not exact below that)."""
    d = msgspec.structs.asdict(row)
    d["cost_usd"], d["saved_usd"] = round(row.cost_usd, 12), round(row.saved_usd, 12)
    return d


def to_json(rep: UsageReport, since: datetime | None) -> str:
    return json.dumps(
        {
            "by": rep.by,
            "since": since.isoformat() if since else None,
            "rows": [as_dict(r) for r in rep.sorted_rows()],
            "total": as_dict(rep.total),
        },
        indent=2,
    )


def to_csv(rep: UsageReport) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow((rep.by, *COLUMNS[1:]))
    for r in [*rep.sorted_rows(), rep.total]:
        w.writerow(_cells(r))
    return out.getvalue()


def _cells(r: UsageRow) -> list[str]:
    money = "{:.6f}"
    return [
        r.key,
        str(r.chains),
        str(r.completed),
        str(r.failed),
        str(r.cancelled),
        str(r.steps),
        str(r.cached_steps),
        str(r.input_tokens),
        str(r.output_tokens),
        money.format(r.cost_usd),
        money.format(r.saved_usd),
    ]


def to_table(rep: UsageReport) -> str:
    head = [rep.by, "chains", "ok", "failed", "cancelled", "steps", "cached", "tokens in",
            "tokens out", "cost USD", "saved USD"]  # fmt: skip
    body = [_cells(r) for r in rep.sorted_rows()]
    lines = [head, *body, _cells(rep.total)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(fmt(head))
    return "\n".join([fmt(head), *map(fmt, body), rule, fmt(lines[-1])])


# -- the verb ------------------------------------------------------------------------------


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    from chainyard.dlq import duration

    add_nats(sp)
    sp.add_argument("--tenant", help="only this tenant's chains (a tenant's user: its own)")
    sp.add_argument(
        "--since", type=duration, default=timedelta(hours=24),
        help="chains that ended within this long, e.g. 30m, 24h, 7d (default 24h)",
    )  # fmt: skip
    sp.add_argument(
        "--by", default="tenant", metavar="GROUP",
        help="one row per tenant (default), model, pool, deployment, or metadata.KEY",
    )  # fmt: skip
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document: rows and total")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row; last row: total")


async def run(args: argparse.Namespace) -> int:
    from nats.errors import Error as NatsError

    from chainyard._command import Unreachable, connect_once

    try:
        UsageReport(args.by)
    except ValueError as e:
        print(f"usage: {e}", file=sys.stderr)
        return 2
    since = datetime.now(UTC) - args.since
    try:
        inbox = f"_INBOX_{args.tenant}" if args.tenant else "_INBOX"
        nc = await connect_once(args.nats, args.creds, "chainyard-usage", inbox)
    except Unreachable as e:
        print(f"usage: {e}", file=sys.stderr)
        return 4
    try:
        rep = await report(nc, by=args.by, tenant=args.tenant, since=since)
    except Refused as e:
        print(f"usage: {e}", file=sys.stderr)
        return 4
    except TimeoutError:
        print("usage: the event log did not arrive in time", file=sys.stderr)
        return 3
    except NatsError as e:  # a lost server
        print(f"usage: NATS: {e or type(e).__name__}", file=sys.stderr)
        return 4
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if args.json:
        print(to_json(rep, since))
    elif args.csv:
        print(to_csv(rep), end="")
    else:
        print(to_table(rep))
    return 0
