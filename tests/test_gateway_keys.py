"""API keys in KV (chainyard/gateway/keys.py): stored hashed, seen by every gateway replica
within a second, and the `chainyard keys` commands with their exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from chainyard.gateway.keys import (
    Grant,
    InvalidGrant,
    KeyStore,
    checked_grant,
    create_key,
    open_keys_kv,
    revoke_key,
)
from chainyard.runtime.nats import connect
from chainyard.runtime.server import NatsServer


@pytest.fixture
async def replicas(nats_server: NatsServer) -> AsyncIterator[list[NatsClient]]:
    """Two connections, as two gateway replicas have."""
    ncs = [await nats.connect(nats_server.url) for _ in range(2)]
    yield ncs
    for nc in ncs:
        await nc.close()


async def test_a_key_is_stored_hashed_and_authenticates_to_its_grant(
    replicas: list[NatsClient],
) -> None:
    js = replicas[0].jetstream()
    kv = await open_keys_kv(js)
    grant = checked_grant(tenant="acme", models=("gpt-4o-mini", "fast"), rpm=60, tpm=1000)
    raw, record = await create_key(kv, grant, name="ci")
    assert raw.startswith("cy-") and len(raw) >= 40
    stored = (await kv.get(record.key_id)).value
    assert raw.encode() not in stored and raw[3:].encode() not in stored
    assert json.loads(stored)["key_sha256"] == hashlib.sha256(raw.encode()).hexdigest()

    store = await KeyStore.open(js)  # opened after the create: loads what exists
    try:
        got = store.authenticate(raw)
        assert got == Grant(
            key_id=record.key_id,
            tenant="acme",
            models=("gpt-4o-mini", "fast"),
            rpm=60,
            tpm=1000,
        )
        assert got.allows("fast") and not got.allows("gpt-4o")
        assert store.authenticate(raw + "x") is None
        assert store.authenticate(raw[3:]) is None  # the secret without its prefix
        assert store.authenticate(record.key_sha256) is None  # the stored hash is no key
        assert store.authenticate("") is None
    finally:
        await store.stop()


async def test_every_replica_sees_a_create_and_a_revoke_within_a_second(
    replicas: list[NatsClient],
) -> None:
    one, two = [await KeyStore.open(nc.jetstream()) for nc in replicas]
    try:
        raw, record = await create_key(one.kv, checked_grant(tenant="t1"))
        # the other replica learns of it from its watch, not from a restart
        await asyncio.wait_for(two.until(lambda s: s.authenticate(raw) is not None), 1.0)
        assert two.authenticate(raw) == record.grant()
        revoked = await revoke_key(one.kv, record.key_id)
        assert revoked is not None and revoked[0] == "t1"
        revision = revoked[1]
        await asyncio.wait_for(two.until(lambda s: s.revision >= revision), 1.0)
        assert two.authenticate(raw) is None
        await asyncio.wait_for(one.until(lambda s: s.revision >= revision), 1.0)
        assert one.authenticate(raw) is None and record.key_id not in one.records
        # revoking again, or a key that never was, answers None
        assert await revoke_key(one.kv, record.key_id) is None
        assert await revoke_key(one.kv, "key_000000000000") is None
        assert await revoke_key(one.kv, "not an id") is None
    finally:
        await one.stop()
        await two.stop()


async def test_a_corrupt_entry_is_refused_and_the_others_still_serve(
    replicas: list[NatsClient],
) -> None:
    store = await KeyStore.open(replicas[0].jetstream())
    try:
        raw, record = await create_key(store.kv, checked_grant(tenant="t1"))
        await store.kv.put("key_badbadbadbad", b"{not json")
        revision = (await store.kv.status()).stream_info.state.last_seq
        await asyncio.wait_for(store.until(lambda s: s.revision >= revision), 1.0)
        assert "key_badbadbadbad" not in store.records
        assert store.authenticate(raw) == record.grant()
    finally:
        await store.stop()


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"tenant": "a.b"}, "tenant 'a.b'"),
        ({"tenant": ""}, "tenant ''"),
        ({"tenant": "t", "models": ("a b",)}, "model 'a b'"),
        ({"tenant": "t", "rpm": 0}, "rpm 0"),
        ({"tenant": "t", "tpm": -5}, "tpm -5"),
        ({"tenant": "t", "spend_usd_per_day": 0.0}, "spend per day 0.0"),
    ],
)
def test_a_grant_that_cannot_be_is_refused_with_the_reason(
    kwargs: dict[str, object], says: str
) -> None:
    with pytest.raises(InvalidGrant, match=says.replace(".", r"\.")):
        checked_grant(**kwargs)  # type: ignore[arg-type]


# -- the command line --------------------------------------------------------------------------


async def cli(*args: str, nats_url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "keys", *args, "--nats", nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_create_list_revoke_from_the_command_line(nats_server: NatsServer) -> None:
    url = nats_server.url
    code, raw, err = await cli(
        "create", "--tenant", "acme", "--models", "gpt-4o-mini,fast", "--rpm", "60",
        "--tpm", "10000", "--spend-per-day", "2.5", "--name", "billing", nats_url=url,
    )  # fmt: skip
    assert code == 0, err
    raw = raw.strip()
    assert raw.startswith("cy-") and "\n" not in raw  # stdout: the key alone, for $(...)
    key_id = err.split()[1]
    assert key_id.startswith("key_") and "shown only this once" in err and raw not in err
    code, _, _ = await cli("create", "--tenant", "other", nats_url=url)
    assert code == 0

    code, listing, err = await cli("list", nats_url=url)
    assert code == 0, err
    assert raw not in listing and raw[3:] not in listing
    line = next(x for x in listing.splitlines() if key_id in x)
    for shown in ("billing", "acme", "gpt-4o-mini,fast", "60", "10000", "2.5"):
        assert shown in line, line
    assert "other" in listing
    code, only, _ = await cli("list", "--tenant", "acme", "--json", nats_url=url)
    rows = [json.loads(x) for x in only.splitlines()]
    assert [r["key_id"] for r in rows] == [key_id]
    assert "key_sha256" not in rows[0] and rows[0]["spend_usd_per_day"] == 2.5

    code, out, err = await cli("revoke", key_id, nats_url=url)
    assert (code, out.strip()) == (0, f"revoked {key_id} (tenant acme)"), err
    code, listing, _ = await cli("list", "--tenant", "acme", nats_url=url)
    assert code == 0 and key_id not in listing and "no keys" in listing
    code, _, err = await cli("revoke", key_id, nats_url=url)
    assert code == 1 and f"no key {key_id}" in err


async def test_keys_bad_input_and_unreachable_nats_exit_codes(nats_server: NatsServer) -> None:
    url = nats_server.url
    for args, says in (
        (("create", "--tenant", "a.b"), "tenant 'a.b'"),
        (("create", "--tenant", "t", "--rpm", "0"), "rpm 0"),
        (("create", "--tenant", "t", "--models", "a,,b"), "--models"),
        (("create", "--tenant", "t", "--spend-per-day", "-1"), "spend per day"),
    ):
        code, out, err = await cli(*args, nats_url=url)
        assert (code, out) == (2, ""), (args, err)
        assert err.startswith("chainyard keys: ") and says in err, err
    code, _, err = await cli("create", "--tenant", "t", "--rpm", "many", nats_url=url)
    assert code == 2 and "invalid int value" in err  # argparse's own words
    code, _, err = await cli("list", nats_url="nats://127.0.0.1:1")
    assert code == 4 and "cannot reach NATS at nats://127.0.0.1:1" in err, err


async def test_replicas_keep_following_the_keys_after_nats_restarts() -> None:
    """A restart of nats-server (same store) loses no key and stops no replica's watch."""
    async with NatsServer() as server:
        ncs = [await connect(server.url, name=f"gateway-{i}") for i in range(2)]
        stores = [await KeyStore.open(nc.jetstream()) for nc in ncs]
        try:
            before, _ = await create_key(stores[0].kv, checked_grant(tenant="t1"))
            for s in stores:
                await asyncio.wait_for(s.until(lambda v: v.authenticate(before) is not None), 1)
            await server.restart()
            for _ in range(100):  # until the connection is back and JetStream answers
                try:
                    after, _ = await create_key(stores[0].kv, checked_grant(tenant="t2"))
                    break
                except (NatsError, OSError):
                    continue
            for s in stores:  # the watch goes on past the restart (nats-py's ordered consumer)
                await asyncio.wait_for(s.until(lambda v: v.authenticate(after) is not None), 15)
                assert s.authenticate(before) is not None
        finally:
            for s in stores:
                await s.stop()
            for nc in ncs:
                await nc.close()
