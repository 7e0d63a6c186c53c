"""`chainyard gateway`: the HTTP gateway as a service (any number of replicas).

Keys: with `--key KEY=TENANT[:MODEL,...]` (repeatable) only those keys are let in; with
`--open` every request is tenant `default` with every model (what `chainyard dev` runs); with
neither, keys come from NATS KV (`chainyard keys`, chainyard/gateway/keys.py) and per-key
limits are enforced across replicas (limits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("chainyard.gateway")

# Replies (PubAcks, API answers, its consumers' deliveries) come to an inbox prefix of the
# gateway's own, which its NATS user may read (deploy/accounts.conf): not the services' `_INBOX.`
INBOX_PREFIX = "_INBOX_gateway"


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    add_nats(sp)
    sp.add_argument("--config", required=True, help="TOML config: its models and groups")
    sp.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8080, help="listen port (default 8080; 0: any)")
    sp.add_argument(
        "--key",
        action="append",
        metavar="KEY=TENANT[:MODEL,...]",
        help="a static API key for a tenant, optionally limited to models or groups (repeat)",
    )
    sp.add_argument(
        "--open", action="store_true", help="no keys: every request is tenant 'default'"
    )
    sp.add_argument(
        "--max-body-kb", type=int, default=4096, help="larger request bodies get 413 (4096)"
    )
    sp.add_argument(
        "--deadline-ms",
        type=int,
        default=300_000,
        help="a request's deadline unless x-chainyard-deadline-ms says (default 300000)",
    )


def static_keys(specs: list[str]) -> Any:
    """`KEY=TENANT[:MODEL,...]` items as StaticKeys; a malformed one raises ValueError."""
    from .core import StaticGrant, StaticKeys
    from .keys import InvalidGrant, checked_grant

    keys = {}
    for i, spec in enumerate(specs):
        key, eq, rest = spec.partition("=")
        tenant, _, models = rest.partition(":")
        if not eq or not key or not tenant:
            raise ValueError(f"--key {spec!r}: expected KEY=TENANT[:MODEL,...]")
        names = tuple(m.strip() for m in models.split(",") if m.strip())
        try:  # the tenant is a token of the subjects its chains go to: `a.b` or `*` is not one
            grant = checked_grant(tenant=tenant, models=names)
        except InvalidGrant as e:
            raise ValueError(f"--key for tenant {tenant!r}: {e}") from None
        keys[key] = StaticGrant(key_id=f"static-{i}", tenant=grant.tenant, models=grant.models)
    return StaticKeys(keys)


NO_BUCKETS = (
    "cannot open the KV buckets of API keys and limits (cy_keys, cy_limits): the services "
    "create them as they start (start a router), and the gateway's own NATS user may use them "
    "but not create them (deploy/accounts.conf)"
)


async def _kv_keys(js: Any) -> tuple[Any, Any]:
    from .keys import KeyStore
    from .limits import Limits

    return await KeyStore.open(js), await Limits.open(js)


async def run(args: argparse.Namespace) -> int:
    from nats.errors import Error as NatsError

    from chainyard.contracts import ConfigError, load_config
    from chainyard.refusals import Refusals
    from chainyard.runtime import tracing
    from chainyard.runtime.kv_view import KvView
    from chainyard.runtime.nats import connect

    from .app import HttpServer
    from .core import Gateway, Settings, StaticKeys

    try:
        config = load_config(args.config)
        keys: Any = static_keys(args.key) if args.key else None
    except (ConfigError, ValueError) as e:
        print(f"chainyard gateway: {e}", file=sys.stderr)
        return 2
    # (not `Fail`: run as `python -m chainyard.cli`, that module is `__main__`, another class)
    from chainyard.cli import _connecting, _safe_url, _stop_on_signals, _unless_stopped

    stop = asyncio.Event()
    _stop_on_signals(stop)
    refusals = Refusals()
    # like `router` and `worker`: NATS down at start is said once, and retried until it is up
    with _connecting(args.nats, say=True):
        connecting = connect(
            args.nats,
            name="chainyard-gateway",
            creds=args.creds,
            inbox_prefix=INBOX_PREFIX,
            on_error=refusals.saw,
        )
        nc = await _unless_stopped(connecting, stop)
    if nc is None:
        say = f"stopped before NATS at {_safe_url(args.nats)} could be reached"
        print(f"chainyard gateway: {say}", file=sys.stderr)
        return 4
    limits = None
    if keys is None and args.open:
        keys = StaticKeys()
    elif keys is None:
        try:  # (retried for a minute: the services create the buckets as they start)
            keys, limits = await _kv_keys(nc.jetstream())
        except NatsError as e:
            print(f"chainyard gateway: {NO_BUCKETS} ({e or type(e).__name__})", file=sys.stderr)
            await nc.close()
            return 4
    tracing.setup("chainyard-gateway")  # OTEL_* like every other entry point
    settings = Settings(max_body_bytes=args.max_body_kb * 1024, deadline_ms=args.deadline_ms)
    gw = Gateway(nc, config, keys=keys, limits=limits, settings=settings, refusals=refusals)
    try:
        async with HttpServer(gw, args.host, args.port) as server:
            print(f"chainyard gateway: listening on {server.url}", flush=True)
            await stop.wait()
    except OSError as e:  # the port is taken, the address is not ours
        print(f"chainyard gateway: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    finally:
        for view in (keys, limits):  # the KV views' watches (static keys have none)
            if isinstance(view, KvView):
                with contextlib.suppress(Exception):
                    await view.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        tracing.shutdown()
    return 0
