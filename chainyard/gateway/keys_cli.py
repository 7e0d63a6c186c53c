"""`chainyard keys create|list|revoke`: the gateway's API keys (chainyard/gateway/keys.py).

`create` prints the new key alone on stdout (so `KEY=$(chainyard keys create ...)` works) and
its id on stderr; the key is shown this once and stored only as a hash. `list` shows ids, names,
tenants, grants and creation times, never a key. Exit codes as the other verbs (chainyard/cli.py
`Fail`): 0 done, 1 refused (no such key), 2 bad input, 4 NATS unreachable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from chainyard.gateway.keys import KeyRecord

# nats and the key store are imported where used: the CLI builds its parser on every start.


class _Refused(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The `keys` verbs under `sp`; `add_nats` adds --nats/--creds like the other verbs."""
    verbs = sp.add_subparsers(dest="keys_verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        add_nats(p)
        return p

    p = verb("create", "make a key for a tenant; prints the key once (stdout), its id (stderr)")
    p.add_argument("--tenant", required=True, help="the tenant whose chains the key runs")
    p.add_argument(
        "--models", help="comma-separated models or groups it may use (default: every one)"
    )
    p.add_argument("--rpm", type=int, help="requests per minute, across all gateway replicas")
    p.add_argument("--tpm", type=int, help="tokens per minute (prompt + completion)")
    p.add_argument("--spend-per-day", type=float, metavar="USD", help="spend per UTC day, in USD")
    p.add_argument("--name", default="", help="a label for people (who or what uses it)")
    p = verb("list", "the keys (never the keys themselves): id, name, tenant, limits, created")
    p.add_argument("--tenant", help="only this tenant's keys")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = verb("revoke", "delete a key; every gateway replica refuses it within a second")
    p.add_argument("key_id", help="the key's id (key_...), from `create` or `list`")


async def run(args: argparse.Namespace) -> int:
    import nats
    from nats.errors import Error as NatsError

    from chainyard.runtime.nats import _fmt_url

    async def quiet(e: Exception) -> None:
        pass  # a failed connect is reported once, below

    try:
        nc = await nats.connect(
            args.nats,
            name="chainyard-keys",
            user_credentials=args.creds,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=5,
            error_cb=quiet,
        )
    except (NatsError, OSError, TimeoutError) as e:
        _say(f"cannot reach NATS at {_fmt_url(args.nats)}: {e or type(e).__name__}")
        return 4
    try:
        js = nc.jetstream()
        if args.keys_verb == "create":
            return await _create(js, args)
        if args.keys_verb == "list":
            return await _list(js, args)
        return await _revoke(js, args)
    except _Refused as e:
        _say(str(e))
        return e.code
    except (NatsError, TimeoutError) as e:  # permissions, a lost server, an API error
        _say(f"NATS at {_fmt_url(args.nats)}: {e or type(e).__name__}")
        return 4
    finally:
        await nc.close()


def _say(message: str) -> None:
    print(f"chainyard keys: {message}", file=sys.stderr)


def _models(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    models = tuple(m.strip() for m in text.split(","))
    if not all(models):
        raise _Refused(f"--models {text!r}: an empty name; give names separated by commas", 2)
    return models


async def _create(js: JetStreamContext, args: argparse.Namespace) -> int:
    from chainyard.gateway.keys import InvalidGrant, checked_grant, create_key, open_keys_kv

    try:
        grant = checked_grant(
            tenant=args.tenant,
            models=_models(args.models),
            rpm=args.rpm,
            tpm=args.tpm,
            spend_usd_per_day=args.spend_per_day,
        )
    except InvalidGrant as e:
        raise _Refused(str(e), 2) from None
    raw, record = await create_key(await open_keys_kv(js), grant, name=args.name)
    print(raw, flush=True)
    print(
        f"created {record.key_id} for tenant {record.tenant} ({_limits(record)}); "
        "the key (on stdout) is shown only this once",
        file=sys.stderr,
    )
    return 0


def _limits(r: KeyRecord) -> str:
    return (
        f"models {','.join(r.models) or 'all'}, rpm {r.rpm or '-'}, tpm {r.tpm or '-'}, "
        f"spend/day {'-' if r.spend_usd_per_day is None else f'{r.spend_usd_per_day:g} USD'}"
    )


async def _records(js: JetStreamContext) -> list[KeyRecord]:
    from chainyard.gateway.keys import KeyStore

    store = await KeyStore.open(js)
    await store.stop()
    return sorted(store.records.values(), key=lambda r: (r.tenant, r.created, r.key_id))


async def _list(js: JetStreamContext, args: argparse.Namespace) -> int:
    rows = [r for r in await _records(js) if args.tenant in (None, r.tenant)]
    if args.json:
        import msgspec

        for r in rows:
            shown = msgspec.structs.asdict(r)
            del shown["key_sha256"]
            print(msgspec.json.encode(shown).decode())
        return 0
    if not rows:
        print("no keys" + (f" for tenant {args.tenant!r}" if args.tenant else ""))
        return 0
    head = ("id", "name", "tenant", "models", "rpm", "tpm", "usd/day", "created")
    table = [head] + [
        (
            r.key_id,
            r.name or "-",
            r.tenant,
            ",".join(r.models) or "all",
            str(r.rpm or "-"),
            str(r.tpm or "-"),
            "-" if r.spend_usd_per_day is None else f"{r.spend_usd_per_day:g}",
            r.created,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _revoke(js: JetStreamContext, args: argparse.Namespace) -> int:
    from chainyard.gateway.keys import open_keys_kv, revoke_key

    revoked = await revoke_key(await open_keys_kv(js), args.key_id)
    if revoked is None:
        raise _Refused(f"no key {args.key_id} (`chainyard keys list` shows the ids)", 1)
    print(f"revoked {args.key_id} (tenant {revoked[0]})")
    return 0
