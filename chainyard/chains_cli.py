"""The verbs that act on chains: `chainyard submit|watch|cancel|signal|replay|status|trace`.

Each is a top-level verb (`chainyard submit FILE`), registered by `cli.parser()` as
`configure(add(verb, run, VERBS[verb], nats="none"), add_nats, verb)`; `run` picks the verb's
function by `args.command`. Failures are `Fail` (one line, the exit codes in its docstring)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chainyard.cli_fail import Fail, _connecting, _unreachable
from chainyard.contracts import (
    ChainCompleted,
    ChainRejected,
    ChainTimeout,
    ControlAccepted,
    ControlRejected,
    encode,
)

if TYPE_CHECKING:
    from chainyard.client import Client

WAIT_S = 300.0  # the default wait for a chain's end (submit, watch, replay --wait)
MISSING_AFTER_S = 5.0  # `watch`: a chain with no state and no event after this is unknown

VERBS = {  # verb: its help, in the order `chainyard --help` lists them
    "submit": "submit a chain (JSON file or - for stdin)",
    "watch": "print a chain's events as JSON lines until it ends",
    "cancel": "cancel a chain: in-flight steps are dropped, it ends cancelled",
    "signal": "send a signal that releases a chain's wait steps",
    "replay": "re-run an ended chain from a step, as a new chain",
    "status": "chains in flight: running steps, pools, cost so far",
    "trace": "draw a chain as a waterfall (event log; Jaeger with --jaeger)",
}


async def _client(args: argparse.Namespace) -> Client:
    """The client verbs' connection; an unreachable NATS is one line, not a traceback."""
    from nats.errors import NoServersError

    from chainyard.client import Client

    with _connecting(args.nats, say=False) as quiet:
        try:
            return await Client.connect(args.nats, args.tenant, creds=args.creds)
        except (NoServersError, OSError) as e:
            raise _unreachable(args.nats, quiet.last or str(e)) from None


async def cmd_submit(args: argparse.Namespace) -> int:
    # Read before the loop does anything else: a blocking read here costs nothing.
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()  # noqa: ASYNC240
    except OSError as e:
        raise Fail(f"cannot read {args.file}: {e.strerror or e}", 2) from None
    async with await _client(args) as client:
        if not args.wait:
            print(await client.submit(data))
            return 0
        try:
            ended = await client.run(data, timeout=args.timeout)
        except ChainTimeout as e:
            raise Fail(
                f"{e} (tenant {args.tenant!r}); it may still be running: "
                f"`chainyard watch ID --tenant {args.tenant}` or `chainyard status`",
                3,
            ) from None
    sys.stdout.write(encode(ended).decode() + "\n")
    if isinstance(ended, ChainRejected):
        for err in ended.errors:
            print(f"rejected: {err.path}: {err.message}", file=sys.stderr)
    return 0 if isinstance(ended, ChainCompleted) else 1


async def cmd_watch(args: argparse.Namespace) -> int:
    from chainyard.client import NoSuchChain

    where = f"chain {args.chain_id!r} (tenant {args.tenant!r})"
    async with await _client(args) as client:
        try:
            async with asyncio.timeout(args.timeout or None):
                async for ev in client.watch(
                    args.chain_id, deltas=args.deltas, missing_after=MISSING_AFTER_S
                ):
                    if isinstance(ev, tuple):
                        sys.stdout.write(ev[1])
                    else:
                        print(encode(ev).decode(), flush=True)
        except NoSuchChain as e:
            raise Fail(f"{e}; check the id and --tenant (or CHAINYARD_TENANT)", 1) from None
        except TimeoutError:
            raise Fail(
                f"{where} did not end within {args.timeout:g} s; it is still running "
                "(`chainyard status` shows its steps; --timeout 0 waits without limit)",
                3,
            ) from None
    return 0


def _answered(args: argparse.Namespace, answer: ControlAccepted | ControlRejected | None) -> int:
    """A control verb's last line: what the router did, or why it refused (exit 1)."""
    where = f"chain {args.chain_id!r} (tenant {args.tenant!r})"
    if isinstance(answer, ControlRejected):
        raise Fail(f"refused for {where}: {answer.message}", 1)
    assert isinstance(answer, ControlAccepted)
    print(f"{args.command} accepted for {where}: {answer.message}", flush=True)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        answer = await client.cancel(args.chain_id, args.reason, timeout=args.timeout)
    return _answered(args, answer)


async def cmd_signal(args: argparse.Namespace) -> int:
    import msgspec

    try:
        data = msgspec.json.decode(args.data) if args.data is not None else None
    except msgspec.DecodeError as e:
        raise Fail(f"--data is not JSON ({e}): {args.data}", 2) from None
    async with await _client(args) as client:
        answer = await client.signal(args.chain_id, args.name, data, timeout=args.timeout)
    return _answered(args, answer)


async def cmd_replay(args: argparse.Namespace) -> int:
    from chainyard.contracts import StepOverride

    overrides = {}
    for item in args.model or []:
        step, eq, model = item.partition("=")
        if not eq or not step or not model:
            raise Fail(f"--model {item}: expected STEP=MODEL", 2)
        overrides[step] = StepOverride(model=model)
    async with await _client(args) as client:
        try:
            result = await client.replay(
                args.chain_id,
                args.from_step,
                overrides,
                new_id=args.new_id,
                wait=args.timeout if args.wait else None,
                timeout=args.answer_timeout,
            )
        except ChainTimeout as e:
            raise Fail(str(e), 3) from None
    if isinstance(result, ControlRejected):
        return _answered(args, result)
    if isinstance(result, str):
        print(result)
        return 0
    sys.stdout.write(encode(result).decode() + "\n")
    return 0 if isinstance(result, ChainCompleted) else 1


async def cmd_status(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        rows = await client.status()
    if not rows:
        print(f"no chains in flight for tenant {args.tenant!r}")
        return 0
    print(f"{'chain':<30} {'age':>7} {'done':>6} {'cost USD':>10}  running")
    for r in rows:
        running = ", ".join(f"{s}@{p}" for s, p in r.steps.items()) or "-"
        done = f"{r.done:>3}/{r.total:<2}"
        print(f"{r.chain_id:<30} {r.age_s:6.1f}s {done} {r.cost_usd:>10.6f}  {running}")
    return 0


async def cmd_trace(args: argparse.Namespace) -> int:
    from chainyard import trace_view

    return await trace_view.run(
        args.chain_id, nats_url=args.nats, tenant=args.tenant, creds=args.creds, jaeger=args.jaeger
    )


_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "submit": cmd_submit,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    "signal": cmd_signal,
    "replay": cmd_replay,
    "status": cmd_status,
    "trace": cmd_trace,
}


async def run(args: argparse.Namespace) -> int:
    return await _COMMANDS[args.command](args)


def _add_tenant(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--tenant", default=os.environ.get("CHAINYARD_TENANT", "default"))


def configure(
    sp: argparse.ArgumentParser,
    add_nats: Callable[[argparse.ArgumentParser], None],
    verb: str,
) -> None:
    """`verb`'s arguments on its parser `sp` (one of VERBS)."""
    add_nats(sp)
    if verb == "trace":
        sp.add_argument("chain_id")
        _add_tenant(sp)
        sp.add_argument("--jaeger", help="Jaeger query URL, e.g. http://localhost:16686")
        return
    _add_tenant(sp)
    if verb == "submit":
        sp.add_argument("file")
    elif verb != "status":
        sp.add_argument("chain_id")
    if verb in ("submit", "replay"):
        sp.add_argument(
            "--wait",
            action="store_true",
            help="wait; print the terminal event; exit 0 only if completed",
        )
        sp.add_argument(
            "--timeout",
            type=float,
            default=WAIT_S,
            help=f"with --wait: seconds to wait for the chain's end (default {WAIT_S:g})",
        )
    if verb in ("cancel", "signal"):
        sp.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            help="seconds to wait for the router's answer (default 30)",
        )
    if verb == "watch":
        sp.add_argument("--deltas", action="store_true", help="also print streamed tokens")
        sp.add_argument(
            "--timeout",
            type=float,
            default=WAIT_S,
            help=f"seconds to wait for the chain's end (default {WAIT_S:g}; 0: no limit)",
        )
    elif verb == "cancel":
        sp.add_argument("--reason", default="cancelled from the command line")
    elif verb == "signal":
        sp.add_argument("name", help="the signal's name (a wait step's `signal`)")
        sp.add_argument("--data", help="JSON payload: the wait step's output")
    elif verb == "replay":
        sp.add_argument("from_step", help="the first step to run again")
        sp.add_argument(
            "--model",
            action="append",
            metavar="STEP=MODEL",
            help="run STEP on another model or group",
        )
        sp.add_argument("--new-id", help="the new chain's id (default: a fresh one)")
        sp.add_argument(
            "--answer-timeout",
            type=float,
            default=30.0,
            help="seconds to wait for the router's answer (default 30)",
        )
