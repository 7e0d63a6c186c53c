"""`chainyard top`: a live terminal view of pools, deployments, tenants and recent failures.

Reads only what the services already publish (top_feed.py), folds it into a `Snapshot`
(top_model.py) once a second, and draws it with Textual, which runs in any terminal that
speaks ANSI (over SSH, inside tmux). Keys: q quits; tab / shift+tab or left / right move
between panes; s sorts the pane by its next column, r reverses it. `--once` prints one screen
as plain text and exits (for scripts and logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from chainyard.contracts import now_ms
from chainyard.top_model import Feed, Snapshot

REFRESH_S = 1.0
FIRST_SCREEN_S = 120.0  # reading a long event log from midnight on, at most


# -- cells ---------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _usd(v: float) -> str:
    return f"${v:,.4f}"


def _clock(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%H:%M:%S")


@dataclass(frozen=True)
class Column:
    label: str
    cell: Callable[[Any], str]
    sort: Callable[[Any], Any]


def _col(label: str, attr: str, fmt: Callable[[Any], str] = str) -> Column:
    def value(r: Any) -> Any:
        return getattr(r, attr)

    def key(r: Any) -> Any:
        v = value(r)
        return (v is None, v if v is not None else 0)

    return Column(label, lambda r: fmt(value(r)), key)


@dataclass(frozen=True)
class Pane:
    id: str
    title: str
    columns: tuple[Column, ...]
    rows: Callable[[Snapshot], Sequence[Any]]


PANES = (
    Pane("pools", "pools", (
        _col("pool", "pool"),
        _col("workers", "workers"),
        Column("free slots", lambda r: f"{r.slots_free}/{r.slots_total}", lambda r: r.slots_free),
        _col("queued", "queued"),
        _col("in flight", "in_flight"),
        _col("p50", "p50_ms", _ms),
        _col("p95", "p95_ms", _ms),
        _col("errors", "error_rate", _pct),
        _col("breaker", "breaker"),
        _col("rate-limit headroom", "headroom"),
    ), lambda s: s.pools),
    Pane("deployments", "deployments (last minute)", (
        _col("deployment", "deployment"),
        _col("pool", "pool"),
        _col("calls/min", "calls_per_min"),
        _col("tokens/min", "tokens_per_min"),
        _col("USD/min", "cost_per_min", _usd),
        _col("breaker", "breaker"),
    ), lambda s: s.deployments),
    Pane("tenants", "tenants (today, UTC)", (
        _col("tenant", "tenant"),
        _col("running", "running"),
        _col("ended today", "chains_today"),
        _col("tokens today", "tokens_today"),
        _col("spend today", "spend_today", _usd),
    ), lambda s: s.tenants),
    Pane("failures", "last failures", (
        _col("time", "at_ms", _clock),
        _col("tenant", "tenant"),
        _col("chain", "chain_id"),
        _col("where", "where"),
        Column("reason", lambda r: r.reason[:160], lambda r: r.reason),
    ), lambda s: s.failures),
)  # fmt: skip


def table_rows(pane: Pane, snap: Snapshot, sort_col: int | None, reverse: bool) -> list[list[str]]:
    rows = list(pane.rows(snap))
    if sort_col is not None:
        rows.sort(key=pane.columns[sort_col].sort, reverse=reverse)
    return [[c.cell(r) for c in pane.columns] for r in rows]


def plain(snap: Snapshot) -> str:
    """One screen as text: each pane's title and an aligned table."""
    out: list[str] = []
    for pane in PANES:
        head = [c.label for c in pane.columns]
        body = table_rows(pane, snap, None, False)
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        out.append(f"{pane.title}:")
        for line in [head, *body]:
            cells = (x.ljust(w) for x, w in zip(line, widths, strict=True))
            out.append(("  " + "  ".join(cells)).rstrip())
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# -- the view ------------------------------------------------------------------------------


def make_app(feed: Feed, title: str, ready: asyncio.Future[Any] | None) -> Any:
    """The Textual app over `feed` (imported here: only `top` needs Textual)."""
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Horizontal
    from textual.widgets import DataTable, Footer, Static

    class Top(App[int]):
        CSS = """
        #status { height: 1; padding: 0 1; background: $boost; }
        DataTable { border: round $secondary; height: auto; max-height: 16; }
        DataTable:focus { border: round $accent; }
        #middle { height: auto; }
        #middle DataTable { width: 1fr; }
        #failures { height: 1fr; max-height: 100%; min-height: 5; }
        """
        BINDINGS: ClassVar[list[Any]] = [
            Binding("q", "quit_top", "quit"),
            Binding("right", "focus_next", "next pane", priority=True),
            Binding("left", "focus_previous", "previous pane", priority=True),
            Binding("s", "sort", "sort by next column"),
            Binding("r", "reverse", "reverse sort"),
        ]

        def __init__(self) -> None:
            super().__init__()
            self.sort: dict[str, int | None] = {p.id: None for p in PANES}
            self.reverse: dict[str, bool] = {p.id: False for p in PANES}
            self.snap: Snapshot | None = None

        def compose(self) -> ComposeResult:
            yield Static(f"{title}: reading ...", id="status")
            tables = {p.id: self._table(p, DataTable) for p in PANES}
            yield tables["pools"]
            with Horizontal(id="middle"):
                yield tables["deployments"]
                yield tables["tenants"]
            yield tables["failures"]
            yield Footer()

        @staticmethod
        def _table(pane: Pane, cls: Any) -> Any:
            t = cls(id=pane.id, cursor_type="row", zebra_stripes=True)
            t.border_title = pane.title
            for c in pane.columns:
                t.add_column(c.label)
            return t

        def on_mount(self) -> None:
            self.query_one("#pools").focus()
            self.set_interval(REFRESH_S, self.redraw)
            self.redraw()

        def redraw(self) -> None:
            if ready is not None and not ready.done():
                read = f"{feed.events:,} events"
                self.query_one("#status", Static).update(f"{title}: reading the log ... {read}")
                return
            self.snap = snap = feed.snapshot(now_ms())
            for pane in PANES:
                table = self.query_one(f"#{pane.id}", DataTable)
                table.clear()
                table.add_rows(table_rows(pane, snap, self.sort[pane.id], self.reverse[pane.id]))
            spend = sum(t.spend_today for t in snap.tenants)
            running = sum(t.running for t in snap.tenants)
            self.query_one("#status", Static).update(
                f"{title}  {_clock(snap.at_ms)} UTC  chains running {running}  "
                f"spend today {_usd(spend)}  events {snap.events:,}"
            )

        def _focused_pane(self) -> str | None:
            w = self.focused
            return w.id if w is not None and w.id in self.sort else None

        def action_sort(self) -> None:
            pane = self._focused_pane()
            if pane is not None:
                n = len(next(p for p in PANES if p.id == pane).columns)
                cur = self.sort[pane]
                self.sort[pane] = 0 if cur is None else (cur + 1) % n
                self.redraw()

        def action_reverse(self) -> None:
            pane = self._focused_pane()
            if pane is not None:
                self.reverse[pane] = not self.reverse[pane]
                self.redraw()

        def action_quit_top(self) -> None:
            self.exit(0)

    return Top()


# -- the verb ------------------------------------------------------------------------------


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    add_nats(sp)
    sp.add_argument("--once", action="store_true", help="print one screen as text and exit")


async def run(args: argparse.Namespace) -> int:
    from chainyard._command import Unreachable, connect_once
    from chainyard.runtime.nats import _fmt_url
    from chainyard.top_feed import Sources

    try:
        nc = await connect_once(args.nats, args.creds, "chainyard-top")
    except Unreachable as e:
        print(f"top: {e}", file=sys.stderr)
        return 4
    feed = Feed()
    sources = Sources(nc, feed)
    try:
        ready = await sources.start()
        if args.once:
            try:
                await asyncio.wait_for(asyncio.shield(ready), FIRST_SCREEN_S)
            except TimeoutError:
                print("top: the event log did not arrive in time", file=sys.stderr)
                return 3
            print(plain(feed.snapshot(now_ms())), end="")
            return 0
        app = make_app(feed, f"chainyard top  {_fmt_url(args.nats)}", ready)
        code = await app.run_async()
        return int(code or 0)
    finally:
        await sources.stop()
        with contextlib.suppress(Exception):
            await nc.close()
