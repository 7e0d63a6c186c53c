"""`chainyard`: the command line. Services run until SIGINT/SIGTERM, then drain and exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from chainyard.contracts import (
    ChainCompleted,
    ChainRejected,
    Config,
    encode,
    load_config,
)

log = logging.getLogger("chainyard")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def _config(args: argparse.Namespace) -> Config:
    if args.config:
        return load_config(args.config)
    from chainyard.demo import demo_config

    return demo_config()


async def _serve(args: argparse.Namespace, *, router: bool, pools: list[str] | None) -> int:
    from chainyard.runtime.gc_tuning import THRESHOLDS, WORKER_THRESHOLDS, tune_gc
    from chainyard.runtime.nats import open_bus
    from chainyard.stack import build, load_tools

    config = _config(args)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    bus = await open_bus(
        args.nats, name=f"chainyard-{args.command}", topology=config.topology, creds=args.creds
    )
    tools = load_tools(args.tools) if getattr(args, "tools", None) else None
    services = build(bus, config, router=router, pools=pools, tools=tools)
    services.stop = stop
    from chainyard.runtime.metrics import start_service

    obs = start_service(args.command, bus, config, services.runners, args.metrics_port)  # OTEL_*
    tune_gc(THRESHOLDS if router else WORKER_THRESHOLDS)  # after start-up: what it made is frozen
    services.start()
    log.info("%s serving on %s", args.command, _safe_url(args.nats))
    try:
        await services.wait()
    finally:
        await obs.stop()
        await bus.close()
    return 0


def _safe_url(url: str) -> str:
    from chainyard.runtime.nats import _fmt_url

    return _fmt_url(url)


async def cmd_router(args: argparse.Namespace) -> int:
    return await _serve(args, router=True, pools=[])


async def cmd_worker(args: argparse.Namespace) -> int:
    return await _serve(args, router=False, pools=args.pool or ([] if args.tools else None))


async def cmd_dev(args: argparse.Namespace) -> int:
    from chainyard.devstack import DevStack
    from chainyard.runtime.gc_tuning import tune_gc

    stop = asyncio.Event()
    _stop_on_signals(stop)
    from chainyard.demo import tools

    async with DevStack(
        _config(args), nats_url=args.nats, local_model=not args.no_local, tools=tools
    ) as dev:
        tune_gc()
        print(f"chainyard dev: NATS at {dev.nats_url}", flush=True)
        print("submit with: chainyard submit FILE --wait --nats " + dev.nats_url, flush=True)
        await stop.wait()
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from chainyard.demo import run_demo

    return await run_demo(nats_url=args.nats)


async def cmd_submit(args: argparse.Namespace) -> int:
    from chainyard.client import ChainTimeout, Client

    # Read before the loop does anything else: a blocking read here costs nothing.
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()  # noqa: ASYNC240
    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
        if not args.wait:
            print(await client.submit(data))
            return 0
        try:
            ended = await client.run(data, timeout=args.timeout)
        except ChainTimeout as e:
            print(str(e), file=sys.stderr)
            return 3
    sys.stdout.write(encode(ended).decode() + "\n")
    if isinstance(ended, ChainRejected):
        for err in ended.errors:
            print(f"rejected: {err.path}: {err.message}", file=sys.stderr)
    return 0 if isinstance(ended, ChainCompleted) else 1


async def cmd_watch(args: argparse.Namespace) -> int:
    from chainyard.client import Client

    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
        async for ev in client.watch(args.chain_id, deltas=args.deltas):
            if isinstance(ev, tuple):
                sys.stdout.write(ev[1])
            else:
                print(encode(ev).decode(), flush=True)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    from chainyard.client import Client

    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
        await client.cancel(args.chain_id, args.reason)
    print(f"cancel sent for {args.chain_id}; `chainyard watch {args.chain_id}` shows the end")
    return 0


async def cmd_signal(args: argparse.Namespace) -> int:
    import msgspec

    from chainyard.client import Client

    data = msgspec.json.decode(args.data) if args.data is not None else None
    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
        await client.signal(args.chain_id, args.name, data)
    print(f"signal {args.name!r} sent to {args.chain_id}")
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    from chainyard.client import Client
    from chainyard.contracts import ChainCompleted as Completed
    from chainyard.contracts import StepOverride

    overrides = {}
    for item in args.model or []:
        step, _, model = item.partition("=")
        overrides[step] = StepOverride(model=model)
    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
        result = await client.replay(
            args.chain_id, args.from_step, overrides, wait=args.timeout if args.wait else None
        )
    if isinstance(result, str):
        print(result)
        return 0
    sys.stdout.write(encode(result).decode() + "\n")
    return 0 if isinstance(result, Completed) else 1


async def cmd_status(args: argparse.Namespace) -> int:
    from chainyard.client import Client

    async with await Client.connect(args.nats, args.tenant, creds=args.creds) as client:
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


async def cmd_schema(args: argparse.Namespace) -> int:
    from chainyard.contracts import asyncapi_export, schema_export

    out = Path(args.out) if args.out else schema_export.SCHEMA_DIR
    for path in schema_export.write(out):
        print(path)
    # With --out, everything goes into that folder; by default the document sits beside schema/.
    print(asyncapi_export.write(out, out / "asyncapi.yaml" if args.out else None))
    return 0


def add_nats(sp: argparse.ArgumentParser, nats: str = "required") -> None:
    sp.add_argument(
        "--nats",
        default=os.environ.get("CHAINYARD_NATS"),
        required=nats == "required" and not os.environ.get("CHAINYARD_NATS"),
        help="NATS URL, credentials may ride in it (nats://user:pass@host:4222); "
        + (
            "without it an embedded server is started"
            if nats == "optional"
            else "env CHAINYARD_NATS"
        ),
    )
    sp.add_argument("--creds", help="NATS credentials file")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chainyard", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], Awaitable[int]],
        help: str,
        *,
        nats: str = "required",
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if nats != "none":
            add_nats(sp, nats)
        return sp

    add(
        "demo",
        cmd_demo,
        "run the demo chain on an embedded NATS with the local model",
        nats="optional",
    )
    sp = add(
        "dev",
        cmd_dev,
        "embedded NATS + router + workers from a config; runs until stopped",
        nats="optional",
    )
    sp.add_argument("--config", help="TOML config (default: the demo's)")
    sp.add_argument("--no-local", action="store_true", help="do not start the local model")
    sp = add("router", cmd_router, "run the router")
    sp.add_argument("--config", help="TOML config")
    sp.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    sp = add("worker", cmd_worker, "run workers for pools and/or tools")
    sp.add_argument("--config", help="TOML config")
    sp.add_argument(
        "--pool", action="append", help="pool to serve (repeat; default: all in config)"
    )
    sp.add_argument("--tools", help="module:attribute of a chainyard Tools registry to serve")
    sp.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    for name, fn, help in (
        ("submit", cmd_submit, "submit a chain (JSON file or - for stdin)"),
        ("watch", cmd_watch, "print a chain's events as JSON lines until it ends"),
        ("cancel", cmd_cancel, "cancel a chain: in-flight steps are dropped, it ends cancelled"),
        ("signal", cmd_signal, "send a signal that releases a chain's wait steps"),
        ("replay", cmd_replay, "re-run an ended chain from a step, as a new chain"),
        ("status", cmd_status, "chains in flight: running steps, pools, cost so far"),
    ):
        sp = add(name, fn, help)
        sp.add_argument("--tenant", default=os.environ.get("CHAINYARD_TENANT", "default"))
        if name == "submit":
            sp.add_argument("file")
        elif name != "status":
            sp.add_argument("chain_id")
        if name in ("submit", "replay"):
            sp.add_argument(
                "--wait",
                action="store_true",
                help="wait; print the terminal event; exit 0 only if completed",
            )
            sp.add_argument("--timeout", type=float, default=300.0)
        if name == "watch":
            sp.add_argument("--deltas", action="store_true", help="also print streamed tokens")
        elif name == "cancel":
            sp.add_argument("--reason", default="cancelled from the command line")
        elif name == "signal":
            sp.add_argument("name", help="the signal's name (a wait step's `signal`)")
            sp.add_argument("--data", help="JSON payload: the wait step's output")
        elif name == "replay":
            sp.add_argument("from_step", help="the first step to run again")
            sp.add_argument(
                "--model",
                action="append",
                metavar="STEP=MODEL",
                help="run STEP on another model or group",
            )
    sp = add("trace", cmd_trace, "draw a chain as a waterfall (event log; Jaeger with --jaeger)")
    sp.add_argument("chain_id")
    sp.add_argument("--tenant", default=os.environ.get("CHAINYARD_TENANT", "default"))
    sp.add_argument("--jaeger", help="Jaeger query URL, e.g. http://localhost:16686")
    from chainyard import dlq

    dlq.configure(
        add("dlq", dlq.run, "dead letters: list, show, redrive, purge", nats="none"), add_nats
    )
    sp = add("schema", cmd_schema, "write the JSON Schema files of the contracts", nats="none")
    sp.add_argument("--out", help="directory (default: the package's contracts/schema)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per provider call is noise
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        return run(args.fn(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
