"""`chainyard`: the command line. Services run until SIGINT/SIGTERM, then drain and exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from chainyard.contracts import (
    ChainCompleted,
    ChainRejected,
    ChainTimeout,
    Config,
    ConfigError,
    ControlAccepted,
    ControlRejected,
    RouterConfig,
    encode,
    load_config,
)

if TYPE_CHECKING:
    from chainyard.client import Client

log = logging.getLogger("chainyard")
DEFAULT_NATS = "nats://127.0.0.1:4222"  # where `chainyard dev` puts NATS when the port is free
WAIT_S = 300.0  # the default wait for a chain's end (submit, watch, replay --wait)
MISSING_AFTER_S = 5.0  # `watch`: a chain with no state and no event after this is unknown
T = TypeVar("T")


class Fail(Exception):
    """An expected failure: printed as one line `chainyard <verb>: <message>`, exit `code`.

    Exit codes: 1 the answer is no (a chain failed, was cancelled or rejected; a control was
    refused; no such chain), 2 the command cannot be done as given (usage, config, tools,
    input file), 3 a wait timed out, 4 NATS unreachable or refused the request."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _ConnectLog(logging.Filter):
    """While connecting, the NATS client logs each failed attempt: keep the last error for our
    own message and log it once (`say`: a service says it keeps trying), not twice a second."""

    def __init__(self, url: str, say: bool) -> None:
        super().__init__()
        self.url, self.say, self.last = url, say, ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.last = record.getMessage().removeprefix("nats error: ")
        if not self.say:
            return False
        self.say = False
        record.msg = (
            "cannot reach NATS at %s (%s); retrying until it is up (SIGTERM or Ctrl-C stops)"
        )
        record.args = (_safe_url(self.url), self.last)
        return True


@contextlib.contextmanager
def _connecting(url: str, *, say: bool) -> Iterator[_ConnectLog]:
    quiet = _ConnectLog(url, say)
    nats_log = logging.getLogger("chainyard.nats")
    nats_log.addFilter(quiet)
    try:
        yield quiet
    finally:
        nats_log.removeFilter(quiet)


def _unreachable(url: str, why: str) -> Fail:
    return Fail(
        f"cannot reach NATS at {_safe_url(url)}{f' ({why})' if why else ''}: start it with "
        "`chainyard dev` (it prints the URL to use), or point --nats or CHAINYARD_NATS at yours",
        4,
    )


async def _client(args: argparse.Namespace) -> Client:
    """The client verbs' connection; an unreachable NATS is one line, not a traceback."""
    from nats.errors import NoServersError

    from chainyard.client import Client

    with _connecting(args.nats, say=False) as quiet:
        try:
            return await Client.connect(args.nats, args.tenant, creds=args.creds)
        except (NoServersError, OSError) as e:
            raise _unreachable(args.nats, quiet.last or str(e)) from None


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`, or None as soon as `stop` is set (a signal while NATS cannot be reached)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def _config(args: argparse.Namespace) -> Config:
    if args.config:
        return _with_region(load_config(args.config), getattr(args, "region", None))
    if args.command == "worker" and args.tools:
        if all(p.startswith("tool.") for p in args.pool or ()):
            return Config()  # tools only: nothing to configure
    if args.command in ("router", "worker"):
        needs = "the deployments to route to" if args.command == "router" else "the pools to serve"
        raise Fail(
            f"--config FILE is required: it names {needs} and their providers (README, "
            "'Configuration'); `chainyard dev` runs a whole stack with stand-in providers",
            2,
        )
    from chainyard.demo import demo_config

    return demo_config()


def _with_region(config: Config, region: str | None) -> Config:
    """A router's `--region` (or env CHAINYARD_REGION) over the config's `[router] region`."""
    if not region:
        return config
    import msgspec

    try:
        router = msgspec.convert(
            {**msgspec.to_builtins(config.router), "region": region}, RouterConfig
        )
    except msgspec.ValidationError as e:
        raise Fail(f"--region {region!r}: {e}", 2) from None
    return msgspec.structs.replace(config, router=router)


def _tools(spec: str):  # -> Tools
    """`--tools pkg.module:attr`, imported from the current directory too (as `python -m`)."""
    from chainyard.stack import load_tools

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_tools(spec)
    except (ImportError, AttributeError, TypeError) as e:
        raise Fail(
            f"--tools {spec}: {e} (imported from {os.getcwd()} and the installed packages)", 2
        ) from None


async def _serve(args: argparse.Namespace, *, router: bool, pools: list[str] | None) -> int:
    from chainyard import readiness
    from chainyard.runtime.gc_tuning import THRESHOLDS, WORKER_THRESHOLDS, tune_gc
    from chainyard.runtime.metrics import start_service
    from chainyard.runtime.nats import open_bus
    from chainyard.runtime.probes import Probes
    from chainyard.stack import build

    config = _config(args)
    tools = _tools(args.tools) if getattr(args, "tools", None) else None
    stop = asyncio.Event()
    _stop_on_signals(stop)
    # The service port answers from the start: alive, and not ready until NATS is reached.
    probes = Probes()
    if args.metrics_port is not None:
        try:
            await probes.start(args.metrics_port)
        except OSError as e:
            raise Fail(f"--metrics-port {args.metrics_port}: {e.strerror or e}", 2) from None
    probes.waiting = f"connecting to NATS at {_safe_url(args.nats)}"
    try:
        with _connecting(args.nats, say=True):
            bus = await _unless_stopped(
                open_bus(
                    args.nats,
                    name=f"chainyard-{args.command}",
                    topology=config.topology,
                    creds=args.creds,
                ),
                stop,
            )
    except BaseException:
        await probes.stop()
        raise
    if bus is None:
        await probes.stop()
        raise Fail(f"stopped before NATS at {_safe_url(args.nats)} could be reached", 4)
    services = build(bus, config, router=router, pools=pools, tools=tools)
    services.stop = stop
    obs = await start_service(args.command, bus, config, services.runners, probes=probes)
    tune_gc(THRESHOLDS if router else WORKER_THRESHOLDS)  # after start-up: what it made is frozen
    services.start()
    probes.ready_when(readiness.checks(bus, config, services))
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

    dev = DevStack(
        _config(args),
        nats_url=args.nats,
        local_model=not args.no_local,
        tools=tools,
        port=args.port,
        gateway_port=args.gateway_port,
    )
    with _connecting(args.nats or "", say=True):  # (only an external NATS can be down)
        started = await _unless_stopped(dev.__aenter__(), stop)
    if started is None:
        raise Fail("stopped while starting", 1)  # nothing to drain
    try:
        from chainyard import readiness
        from chainyard.runtime.metrics import start_service

        assert dev.bus is not None and dev.services is not None
        obs = await start_service(
            "dev", dev.bus, dev.config, dev.services.runners, args.metrics_port
        )
        obs.probes.ready_when(readiness.checks(dev.bus, dev.config, dev.services))
        tune_gc()
        url = dev.nats_url
        if dev.port_taken:
            print(
                f"chainyard dev: port {args.port} is in use (another NATS server or dev stack?), "
                "so NATS listens on a free port instead",
                flush=True,
            )
        print(f"chainyard dev: NATS at {url}", flush=True)
        if url == DEFAULT_NATS:
            print("clients reach it without --nats: chainyard submit FILE --wait", flush=True)
        else:
            print(f"point clients at it: export CHAINYARD_NATS={url}", flush=True)
        print(
            f"chainyard dev: HTTP gateway at {dev.gateway_url}/v1 (OpenAI/Anthropic base URL; "
            "no keys: every request is tenant 'default')",
            flush=True,
        )
        if args.metrics_port:
            print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
        await stop.wait()
        await obs.stop()
    finally:
        await dev.__aexit__(None, None, None)
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from chainyard.demo import run_demo

    return await run_demo(nats_url=args.nats)


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
    from chainyard.contracts import ChainCompleted as Completed
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
    return 0 if isinstance(result, Completed) else 1


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


async def cmd_schema(args: argparse.Namespace) -> int:
    from chainyard.contracts import asyncapi_export, schema_export

    out = Path(args.out) if args.out else schema_export.SCHEMA_DIR
    for path in schema_export.write(out):
        print(path)
    # With --out, everything goes into that folder; by default the document sits beside schema/.
    print(asyncapi_export.write(out, out / "asyncapi.yaml" if args.out else None))
    return 0


def add_nats(sp: argparse.ArgumentParser, nats: str = "required") -> None:
    if nats == "optional":  # dev, demo: their own NATS unless told (CHAINYARD_NATS is not read:
        # it is where clients find a dev stack, not where a new one should connect)
        sp.add_argument(
            "--nats",
            help="use this NATS (credentials may ride in the URL) instead of an embedded one",
        )
    else:
        sp.add_argument(
            "--nats",
            default=os.environ.get("CHAINYARD_NATS") or DEFAULT_NATS,
            help="NATS URL, credentials may ride in it (nats://user:pass@host:4222); "
            f"default: env CHAINYARD_NATS, else {DEFAULT_NATS}",
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
    sp.add_argument(
        "--port",
        type=int,
        default=4222,
        help="the embedded NATS's port when it is free, else any free port (default 4222; "
        "0: any free port)",
    )
    sp.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port"
    )
    sp.add_argument(
        "--gateway-port",
        type=int,
        default=8080,
        help="the HTTP gateway's port when it is free, else any free port (default 8080)",
    )
    sp = add("router", cmd_router, "run the router")
    sp.add_argument("--config", help="TOML config (required)")
    sp.add_argument(
        "--region",
        default=os.environ.get("CHAINYARD_REGION"),
        help="this router's region: it prefers pools there (docs/SCALING.md); "
        "default: env CHAINYARD_REGION, else the config's [router] region",
    )
    sp.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port"
    )
    sp = add("worker", cmd_worker, "run workers for pools and/or tools")
    sp.add_argument("--config", help="TOML config (required, except for --tools alone)")
    sp.add_argument(
        "--pool",
        action="append",
        help="pool to serve (repeat; default: all in config); tool.NAME: that tool of --tools only",
    )
    sp.add_argument("--tools", help="module:attribute of a chainyard Tools registry to serve")
    sp.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port"
    )
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
            sp.add_argument(
                "--timeout",
                type=float,
                default=WAIT_S,
                help=f"with --wait: seconds to wait for the chain's end (default {WAIT_S:g})",
            )
        if name in ("cancel", "signal"):
            sp.add_argument(
                "--timeout",
                type=float,
                default=30.0,
                help="seconds to wait for the router's answer (default 30)",
            )
        if name == "watch":
            sp.add_argument("--deltas", action="store_true", help="also print streamed tokens")
            sp.add_argument(
                "--timeout",
                type=float,
                default=WAIT_S,
                help=f"seconds to wait for the chain's end (default {WAIT_S:g}; 0: no limit)",
            )
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
            sp.add_argument("--new-id", help="the new chain's id (default: a fresh one)")
            sp.add_argument(
                "--answer-timeout",
                type=float,
                default=30.0,
                help="seconds to wait for the router's answer (default 30)",
            )
    sp = add("trace", cmd_trace, "draw a chain as a waterfall (event log; Jaeger with --jaeger)")
    sp.add_argument("chain_id")
    sp.add_argument("--tenant", default=os.environ.get("CHAINYARD_TENANT", "default"))
    sp.add_argument("--jaeger", help="Jaeger query URL, e.g. http://localhost:16686")
    from chainyard import dlq

    dlq.configure(
        add("dlq", dlq.run, "dead letters: list, show, redrive, purge", nats="none"), add_nats
    )
    from chainyard.gateway import cli as gateway

    gateway.configure(add("gateway", gateway.run, "the HTTP gateway", nats="none"), add_nats)
    from chainyard.gateway import keys_cli

    keys_cli.configure(
        add("keys", keys_cli.run, "gateway API keys: create, list, revoke", nats="none"), add_nats
    )
    from chainyard.k8s import cli as deploy

    deploy.configure(add("deploy", deploy.run, "render manifests", nats="none"), add_nats)
    from chainyard import top, usage

    top.configure(
        add("top", top.run, "a live view of pools, deployments, tenants, failures", nats="none"),
        add_nats,
    )

    usage.configure(
        add("usage", usage.run, "chains, tokens and cost by tenant, model, ...", nats="none"),
        add_nats,
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
    except Exception as e:
        said = _expected(e, args)
        if said is None:
            raise
        message, code = said
        print(f"chainyard {args.command}: {message}", file=sys.stderr)
        return code


def _expected(e: Exception, args: argparse.Namespace) -> tuple[str, int] | None:
    """An expected failure's one line and exit code (Fail's docstring); None: a bug, whose
    traceback is wanted."""
    import nats.errors

    if isinstance(e, Fail):
        return str(e), e.code
    if isinstance(e, ConfigError):
        return str(e), 2
    if isinstance(e, ChainTimeout):
        return str(e), 3
    if isinstance(e, nats.errors.NoServersError | ConnectionRefusedError):
        return str(_unreachable(args.nats or DEFAULT_NATS, str(e))), 4
    if isinstance(e, nats.errors.Error):
        return f"NATS at {_safe_url(args.nats or DEFAULT_NATS)}: {e or type(e).__name__}", 4
    return None


if __name__ == "__main__":
    sys.exit(main())
