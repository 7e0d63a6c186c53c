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
from typing import TypeVar

from chainyard.cli_fail import Fail, _connecting, _safe_url, _unreachable
from chainyard.contracts import ChainTimeout, Config, ConfigError, RouterConfig, load_config
from chainyard.refusals import PermissionDenied

log = logging.getLogger("chainyard")
DEFAULT_NATS = "nats://127.0.0.1:4222"  # where `chainyard dev` puts NATS when the port is free
T = TypeVar("T")


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
        metrics_port=args.metrics_port,
    )
    with _connecting(args.nats or "", say=True):  # (only an external NATS can be down)
        started = await _unless_stopped(dev.__aenter__(), stop)
    if started is None:
        raise Fail("stopped while starting", 1)  # nothing to drain
    try:
        from chainyard import readiness

        assert dev.bus is not None and dev.services is not None and dev.observability
        dev.observability.probes.ready_when(readiness.checks(dev.bus, dev.config, dev.services))
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
    finally:
        await dev.__aexit__(None, None, None)
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from chainyard.demo import run_demo

    return await run_demo(nats_url=args.nats)


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
    from chainyard import chains_cli

    for verb, help in chains_cli.VERBS.items():
        chains_cli.configure(add(verb, chains_cli.run, help, nats="none"), add_nats, verb)
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
    if isinstance(e, PermissionDenied):
        return f"refused by NATS: {e} (the user's permissions: deploy/README.md)", 1
    if isinstance(e, nats.errors.NoServersError | ConnectionRefusedError):
        return str(_unreachable(args.nats or DEFAULT_NATS, str(e))), 4
    if isinstance(e, nats.errors.Error):
        return f"NATS at {_safe_url(args.nats or DEFAULT_NATS)}: {e or type(e).__name__}", 4
    return None


if __name__ == "__main__":
    sys.exit(main())
