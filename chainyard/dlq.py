"""`chainyard dlq list|show|redrive|purge`: the dead letters in stream CY_DLQ, for operators.

A dead letter is a message a service could not process, stored on `cy.dlq.<source>` (intake,
events, control, timers, work) with `Cy-Reason`, `Cy-Subject` (the original subject), and when
known `Cy-Tenant`, `Cy-Chain`, `Cy-Step`. Redrive publishes the original payload to the original
subject with no headers (so the target stream never drops it as a duplicate of a stale
`Nats-Msg-Id`), waits for the stream's ack, then deletes the dead letter. What redrive means per
source is in docs/RELIABILITY.md, `## Dead letters`.

Expected failures (unreachable NATS, an unknown sequence, nothing matching) end in one line on
stderr and exit 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from chainyard.contracts import DLQ_SOURCES, ChainyardError, Topology

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

# nats is imported where it is used: the CLI builds its parser (configure) on every start.

SOURCES = DLQ_SOURCES
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DlqError(ChainyardError):
    """An expected failure: printed as one line, exit 1."""


def duration(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`, `2w`."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 24h or 7d")
    return timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])


def _human(td: timedelta) -> str:
    s = td.total_seconds()
    for unit in "dhm":
        if s >= _UNIT_S[unit] and s % _UNIT_S[unit] == 0:
            return f"{s / _UNIT_S[unit]:g}{unit}"
    return f"{s:g}s"


def safe_text(text: str, *, newlines: bool = True) -> str:
    """Text that cannot drive a terminal: control characters (ANSI escapes, C1 codes) shown
    escaped; newlines and tabs kept when asked."""
    keep = "\n\t" if newlines else ""
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    time: datetime
    source: str
    subject: str | None  # the original subject (Cy-Subject); None when the writer did not say
    tenant: str | None
    chain: str | None
    step: str | None
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""

    def summary(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": _iso(self.time),
            "source": self.source,
            "subject": self.subject,
            "tenant": self.tenant,
            "chain": self.chain,
            "step": self.step,
            "reason": self.reason,
            "size": len(self.data),
        }


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _payload_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # also UnicodeDecodeError
        return None


def parse(
    seq: int, time: datetime, dlq_subject: str, headers: dict[str, str] | None, data: bytes
) -> DeadLetter:
    """A stored dead letter, with tenant and chain from its headers, else its original subject
    (`<prefix>.<kind>.<tenant>.<chain>...`), else its payload (a chain's `id`, an assignment's
    or event's `tenant`/`chain_id`)."""
    h = dict(headers or {})
    subject = h.get("Cy-Subject") or None
    tenant, chain = h.get("Cy-Tenant") or None, h.get("Cy-Chain") or None
    parts = subject.split(".") if subject else []
    if len(parts) >= 3 and parts[1] in ("submit", "control", "events", "timer"):
        tenant = tenant or parts[2]
        if len(parts) >= 4 and parts[1] != "submit":
            chain = chain or parts[3]
    if tenant is None or chain is None:
        body = _payload_json(data)
        if isinstance(body, dict):
            tenant = tenant or _str(body.get("tenant"))
            chain = chain or _str(body.get("chain_id")) or _str(body.get("id"))
    return DeadLetter(
        seq=seq,
        time=time,
        source=dlq_subject.rsplit(".", 1)[-1],
        subject=subject,
        tenant=tenant,
        chain=chain,
        step=h.get("Cy-Step") or None,
        reason=h.get("Cy-Reason", ""),
        headers=h,
        data=data,
    )


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


@dataclass
class Selection:
    tenant: str | None = None
    source: str | None = None
    since: timedelta | None = None
    older_than: timedelta | None = None

    def matches(self, d: DeadLetter, now: datetime) -> bool:
        return (
            (self.tenant is None or d.tenant == self.tenant)
            and (self.older_than is None or d.time <= now - self.older_than)
            and (self.since is None or d.time >= now - self.since)
        )

    def describe(self) -> str:
        said = [
            f"{k.replace('_', '-')} {_human(v) if isinstance(v, timedelta) else v}"
            for k, v in vars(self).items()
            if v is not None
        ]
        return ", ".join(said) or "all"


class Dlq:
    """CY_DLQ on one connection: read, redrive, delete."""

    def __init__(self, nc: NatsClient, topology: Topology | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10.0)
        self.topology = topology or Topology()
        self.stream = self.topology.dlq.name

    async def _last_seq(self) -> int:
        """The stream's last sequence; a missing stream is an error an operator can act on."""
        from nats.js.errors import NotFoundError

        try:
            return (await self.js.stream_info(self.stream)).state.last_seq
        except NotFoundError:
            raise DlqError(
                f"no stream {self.stream} on this server: no router has run here "
                "(or it is the wrong server)"
            ) from None

    async def scan(
        self, sel: Selection, *, newest: int | None = None
    ) -> tuple[list[DeadLetter], int]:
        """The dead letters matching `sel` (only the `newest` N when given), oldest first, and
        how many matched. An ephemeral pull consumer (no acks, deleted at the end) reads from
        `--since` on, filtered by source on the server. It stops at the stream's last message
        when the scan began: a redriven message dead-lettered again is not picked up again."""
        from nats.errors import Error as NatsError
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        end = await self._last_seq()
        now = datetime.now(UTC)
        subject = (
            self.topology.subjects.dlq_subject(sel.source)
            if sel.source
            else self.topology.subjects.dlq
        )
        name = f"chainyard-dlq-{uuid.uuid4().hex[:12]}"
        cfg = ConsumerConfig(
            name=name,
            filter_subject=subject,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,  # if we die mid-read, the server removes it
            mem_storage=True,
        )
        if sel.since is not None:
            cfg.deliver_policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = now - sel.since
        await self.js.add_consumer(self.stream, cfg)
        out: deque[DeadLetter] = deque(maxlen=newest)
        matched = 0
        try:
            psub = await self.js.pull_subscribe_bind(consumer=name, stream=self.stream)
            left = (await psub.consumer_info()).num_pending
            while left > 0:
                for m in await psub.fetch(min(left, 500), timeout=10.0):
                    md = m.metadata
                    d = parse(md.sequence.stream, md.timestamp, m.subject, m.headers, m.data)
                    left = 0 if d.seq >= end else md.num_pending
                    if d.seq <= end and sel.matches(d, now):
                        out.append(d)
                        matched += 1
        finally:
            with contextlib.suppress(NatsError):
                await self.js.delete_consumer(self.stream, name)
        return list(out), matched

    async def get(self, seqs: Sequence[int]) -> list[DeadLetter]:
        """The named dead letters; all of them exist, or nothing is returned and it says which
        do not (so a typo never redrives or purges a partial set)."""
        from nats.js.errors import NotFoundError

        await self._last_seq()
        found, missing = [], []
        for seq in dict.fromkeys(seqs):  # each once, in the order given
            try:
                m = await self.js.get_msg(self.stream, seq)
            except NotFoundError:
                missing.append(seq)
                continue
            found.append(
                parse(seq, m.time or datetime.now(UTC), m.subject or "", m.headers, m.data or b"")
            )
        if missing:
            which = ", ".join(map(str, missing))
            raise DlqError(f"no dead letter with seq {which} in {self.stream}")
        return found

    async def redrive(self, d: DeadLetter) -> str:
        """Publish the original payload to the original subject, wait for the stream's ack, then
        delete the dead letter. Returns where it went."""
        from nats.errors import Error as NatsError
        from nats.js.errors import NoStreamResponseError

        if not d.subject:
            raise DlqError(f"seq {d.seq}: no Cy-Subject (the original subject) recorded")
        if d.subject.startswith(self.topology.subjects.dlq[:-1]):
            raise DlqError(f"seq {d.seq}: Cy-Subject {d.subject} is the DLQ itself")
        try:
            ack = await self.js.publish(d.subject, d.data)  # no headers: see the module doc
        except NoStreamResponseError:
            raise DlqError(f"seq {d.seq}: no stream takes {d.subject}; kept") from None
        except (NatsError, TimeoutError) as e:
            raise DlqError(
                f"seq {d.seq}: publishing to {d.subject} failed ({e or type(e).__name__}); "
                "kept (on a timeout it may have been stored all the same)"
            ) from None
        await self.delete(d.seq)
        return f"{d.subject} ({ack.stream} seq {ack.seq})"

    async def delete(self, seq: int) -> None:
        from nats.errors import Error as NatsError
        from nats.js.errors import NotFoundError

        try:
            await self.js.delete_msg(self.stream, seq)
        except NotFoundError:  # another operator got there first
            raise DlqError(f"seq {seq}: already gone from {self.stream}") from None
        except (NatsError, TimeoutError) as e:
            raise DlqError(f"seq {seq}: not deleted ({e or type(e).__name__})") from None


# -- the command line --------------------------------------------------------------------------


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The `dlq` verbs under `sp`; `add_nats` adds --nats/--creds like the other verbs."""
    verbs = sp.add_subparsers(dest="dlq_verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        add_nats(p)
        return p

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tenant", help="only this tenant's dead letters")
        p.add_argument("--source", choices=SOURCES, help="only those from this stream")

    p = verb("list", "one line per dead letter, newest last")
    filters(p)
    p.add_argument("--since", type=duration, help="only newer than this, e.g. 24h")
    p.add_argument("--limit", type=int, default=50, help="the newest N (default 50; 0: all)")
    p.add_argument("--json", action="store_true", help="JSON lines, untruncated")
    p = verb("show", "one dead letter: headers, original subject, payload")
    p.add_argument("seq", type=int)
    p.add_argument("--json", action="store_true")
    for name, help in (
        ("redrive", "publish dead letters again to their original subjects, then delete them"),
        ("purge", "delete dead letters"),
    ):
        p = verb(name, help)
        p.add_argument("seqs", type=int, nargs="*", metavar="SEQ")
        filters(p)
        if name == "purge":
            p.add_argument("--older-than", type=duration, help="only older than this, e.g. 7d")
        p.add_argument("--all", action="store_true", help="every dead letter (with no filter)")
        p.add_argument("--yes", action="store_true", help="do not ask before a bulk change")


async def run(args: argparse.Namespace) -> int:
    from nats.errors import Error as NatsError

    from chainyard._command import Unreachable, connect_once

    try:
        nc = await connect_once(args.nats, args.creds, "chainyard-dlq")
    except Unreachable as e:
        print(f"dlq: {e}", file=sys.stderr)
        return 1
    try:
        dlq = Dlq(nc)
        verb: Callable[[Dlq, argparse.Namespace], Any] = _VERBS[args.dlq_verb]
        return await verb(dlq, args)
    except DlqError as e:
        print(f"dlq: {e}", file=sys.stderr)
        return 1
    except (NatsError, TimeoutError) as e:  # permissions, a lost server, an API error
        print(f"dlq: NATS: {e or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


def _short(text: str | None, width: int) -> str:
    text = safe_text(text or "-", newlines=False)
    return text if len(text) <= width else text[: width - 1] + "…"


async def _list(dlq: Dlq, args: argparse.Namespace) -> int:
    sel = Selection(tenant=args.tenant, source=args.source, since=args.since)
    shown, matched = await dlq.scan(sel, newest=args.limit if args.limit > 0 else None)
    if not shown:
        print(f"no dead letters ({sel.describe()})", file=sys.stderr)
        return 0  # an empty DLQ is the healthy state, not an error
    if args.json:
        for d in shown:
            print(json.dumps(d.summary()))
    else:
        print(
            f"{'seq':>7}  {'time (UTC)':<20}  {'source':<7}  {'tenant':<12}  {'chain':<24}  reason"
        )
        for d in shown:
            print(
                f"{d.seq:>7}  {_iso(d.time):<20}  {d.source:<7}  {_short(d.tenant, 12):<12}  "
                f"{_short(d.chain, 24):<24}  {_short(d.reason, 70)}"
            )
    if len(shown) < matched:
        print(f"(the newest {len(shown)} of {matched}; --limit N for more)", file=sys.stderr)
    return 0


def _payload_view(data: bytes) -> tuple[str, dict[str, Any]]:
    """The payload for a human (pretty JSON, else escaped text) and for --json."""
    body = _payload_json(data)
    if body is not None or data.strip() == b"null":
        text = json.dumps(body, indent=2, ensure_ascii=False)
        return f"JSON, {len(data)} bytes\n{safe_text(text)}", {"payload": body}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        shown = safe_text(data.decode("utf-8", "backslashreplace"))
        return f"not UTF-8, {len(data)} bytes, escaped\n{shown}", {"payload_hex": data.hex()}
    return f"text, {len(data)} bytes\n{safe_text(text)}", {"payload_text": text}


async def _show(dlq: Dlq, args: argparse.Namespace) -> int:
    (d,) = await dlq.get([args.seq])
    human, machine = _payload_view(d.data)
    if args.json:
        print(json.dumps({**d.summary(), "headers": d.headers, **machine}))
        return 0
    for k, v in d.summary().items():
        if k not in ("reason", "size"):
            print(f"{k + ':':<9} {safe_text(str(v if v is not None else '-'), newlines=False)}")
    print(f"reason:   {safe_text(d.reason)}")
    print("headers:")
    for k, v in d.headers.items():
        print(f"  {safe_text(k, newlines=False)}: {safe_text(v, newlines=False)}")
    print(f"payload:  {human}")
    return 0


async def _select(dlq: Dlq, args: argparse.Namespace, what: str) -> list[DeadLetter]:
    """The dead letters a redrive or purge names: sequences, or filters (asked for unless
    --yes). Nothing to act on is an error: the operator asked for something that is not there."""
    sel = Selection(
        tenant=args.tenant, source=args.source, older_than=getattr(args, "older_than", None)
    )
    filtered = any(v is not None for v in vars(sel).values())
    if args.seqs:
        if filtered or args.all:
            raise DlqError("give sequences or filters (--tenant/--source/...), not both")
        return await dlq.get(args.seqs)
    if not filtered and not args.all:
        raise DlqError(f"name what to {what}: SEQ..., --tenant/--source filters, or --all")
    rows, _ = await dlq.scan(sel)
    if not rows:
        raise DlqError(f"no dead letters match ({sel.describe()})")
    if not args.yes:
        answer = await _ask(f"{what} {len(rows)} dead letters ({sel.describe()})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise DlqError("not confirmed: nothing done (--yes skips the question)")
    return rows


async def _ask(question: str) -> str:
    """A line from stdin ("" at its end), the loop still serving the connection meanwhile."""
    print(question, end="", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        line = sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is gone: Ctrl-C ended the command
            loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(line))

    # A daemon thread, not the loop's executor, which Ctrl-C would wait on until a line came.
    threading.Thread(target=read, daemon=True).start()
    return await answer


async def _redrive(dlq: Dlq, args: argparse.Namespace) -> int:
    failed = 0
    for d in await _select(dlq, args, "redrive"):
        try:
            print(f"seq {d.seq}: redriven to {await dlq.redrive(d)}")
        except DlqError as e:
            print(f"dlq: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


async def _purge(dlq: Dlq, args: argparse.Namespace) -> int:
    rows, failed = await _select(dlq, args, "purge"), 0
    for d in rows:
        try:
            await dlq.delete(d.seq)
        except DlqError as e:
            print(f"dlq: {e}", file=sys.stderr)
            failed += 1
    print(f"purged {len(rows) - failed} dead letters")
    return 1 if failed else 0


_VERBS = {"list": _list, "show": _show, "redrive": _redrive, "purge": _purge}
