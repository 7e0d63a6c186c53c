"""Keys and limits through the real thing: two `chainyard gateway` processes reading keys from
KV (no --key, no --open), a router and a worker process, the OpenAI wire format over HTTP.

A key made with the library (as `chainyard keys create` does) works on both replicas; its model
grant gives 403; its rpm is shared by the replicas (429 with retry-after on both); its spend per
day, counted from the chain's cost on one replica, refuses on the other; a revoked key gets 401
on both within a second."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from gateway_stack import POOLS, PROVIDER_KEY, _gateway_url, config_toml
from helpers import start_cli, start_routers, stop_all, wait_until
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from chainyard.gateway.keys import checked_grant, create_key, open_keys_kv, revoke_key
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer


@dataclass
class Replicas:
    urls: list[str]  # the gateways' base URLs
    kv: object  # the cy_keys bucket (nats KeyValue)
    sandbox: SandboxServer
    limits: KeyValue  # the cy_limits bucket: what the replicas counted
    # another gateway process with these flags: its URL
    start_gateway: Callable[..., Awaitable[str]] = field(init=False)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    os.environ["GW_PROVIDER_KEY"] = PROVIDER_KEY
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer())
        sb = await stack.enter_async_context(
            SandboxServer(SandboxConfig(api_key=PROVIDER_KEY, latency_ms=0.0))
        )
        cfg = tmp_path / "chainyard.toml"
        cfg.write_text(config_toml(dict.fromkeys(POOLS, sb.url)))
        bus = await open_bus(nats.url, name="keys-http-test")
        stack.push_async_callback(bus.close)
        common = ("--nats", nats.url, "--config", str(cfg))
        procs = [  # two routers, as deployed; the two gateways below
            *await start_routers(tmp_path, nats.url, cfg),
            await start_cli(tmp_path / "worker.log", "worker", *common),
        ]

        stack.push_async_callback(lambda: stop_all(procs))
        urls = []
        limits = await bus.js.key_value("cy_limits")  # (the routers made it as they started)
        r = Replicas(urls=urls, kv=await open_keys_kv(bus.js), sandbox=sb, limits=limits)
        r.start_gateway = lambda *flags: _start_gateway(tmp_path, procs, *common, *flags)
        for _ in range(2):
            urls.append(await r.start_gateway())
        yield r


async def _start_gateway(tmp: Path, procs: list[asyncio.subprocess.Process], *args: str) -> str:
    log = tmp / f"gateway-{len(procs)}.log"
    procs.append(await start_cli(log, "gateway", *args, "--port", "0"))
    return await _gateway_url(log, procs[-1])


async def ask(
    http: httpx.AsyncClient, base: str, key: str, model: str = "gpt-4o-mini"
) -> httpx.Response:
    return await http.post(
        f"{base}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )


async def new_key(r: Replicas, **grant: object) -> tuple[str, str]:
    raw, record = await create_key(r.kv, checked_grant(**grant))  # type: ignore[arg-type]
    return raw, record.key_id


async def answered_on_both(r: Replicas, http: httpx.AsyncClient, key: str, status: int) -> None:
    """Every replica answers `status` for this key, within a second of the change."""

    async def both() -> bool:
        return all([(await ask(http, u, key)).status_code == status for u in r.urls])

    await wait_until(both, 1.0, f"both gateways to answer {status}")


def _outside_a_minute_boundary() -> float:
    """Seconds to wait so that the next ~10 s stay in one UTC minute (rpm windows)."""
    into = time.time() % 60
    return 0.0 if into < 45 else 60.5 - into


async def test_a_kv_key_works_on_every_replica_until_revoked(replicas: Replicas) -> None:
    r = replicas
    async with httpx.AsyncClient(timeout=60) as http:
        raw, key_id = await new_key(r, tenant="acme", models=("gpt-4o-mini",))
        await answered_on_both(r, http, raw, 200)
        refused = await ask(http, r.urls[1], raw, model="slow-model")  # not granted
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "model"
        for bad in ("cy-nope", "sk-not-chainyards", raw + "x"):
            got = await ask(http, r.urls[0], bad)
            assert got.status_code == 401, got.text
            assert raw not in got.text
        assert await revoke_key(r.kv, key_id) is not None  # type: ignore[arg-type]
        await answered_on_both(r, http, raw, 401)


async def test_rpm_is_shared_by_the_replicas(replicas: Replicas) -> None:
    r = replicas
    await asyncio.sleep(_outside_a_minute_boundary())  # a clock boundary, not a race
    raw, _ = await new_key(r, tenant="acme", rpm=4)
    async with httpx.AsyncClient(timeout=60) as http:
        statuses = [(await ask(http, r.urls[i % 2], raw)).status_code for i in range(8)]
        assert statuses == [200] * 4 + [429] * 4
        for base in r.urls:
            over = await ask(http, base, raw)
            assert over.status_code == 429
            assert over.json()["error"]["code"] == "rate_limit_exceeded"
            left = 60 - time.time() % 60
            assert 1 <= int(over.headers["retry-after"]) <= math.ceil(left) + 1


async def test_spend_per_day_counted_on_one_replica_refuses_on_the_other(
    replicas: Replicas,
) -> None:
    r = replicas
    raw, _ = await new_key(r, tenant="acme", spend_usd_per_day=1e-9)  # one call spends more
    async with httpx.AsyncClient(timeout=60) as http:
        first = await ask(http, r.urls[0], raw)
        assert first.status_code == 200, first.text

        async def refused_on_the_other() -> httpx.Response | None:
            got = await ask(http, r.urls[1], raw)
            return got if got.status_code == 429 else None

        over = await wait_until(refused_on_the_other, 1.0, "the other replica to refuse")
        to_midnight = (
            datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            + timedelta(days=1)
            - datetime.now(UTC)
        ).total_seconds()
        assert abs(int(over.headers["retry-after"]) - to_midnight) <= 2
        calls = r.sandbox.counts["openai.chat"]
        for base in r.urls * 2:  # refused on both, and a refused request runs nothing
            assert (await ask(http, base, raw)).status_code == 429
        assert r.sandbox.counts["openai.chat"] == calls


def llm_chain(*models: str) -> dict[str, object]:
    """A chain of one model step per model, steps `s0`, `s1`..."""
    message = {"role": "user", "content": "hi"}
    steps = [
        {"kind": "llm", "id": f"s{i}", "model": m, "messages": [message]}
        for i, m in enumerate(models)
    ]
    return {"steps": steps}


async def test_a_chain_over_http_names_only_the_keys_models(replicas: Replicas) -> None:
    """`POST /v1/chains` is held to the key's model grant as chat is: every model step of the
    chain, in every answer mode, and nothing runs for a refused chain."""
    r = replicas
    raw, _ = await new_key(r, tenant="acme", models=("backup-mini",))
    auth = {"authorization": f"Bearer {raw}"}
    async with httpx.AsyncClient(timeout=60) as http:
        await answered_on_both(r, http, raw, 403)  # (chat: gpt-4o-mini is not granted)
        calls = r.sandbox.counts["openai.chat"]
        for model in ("gpt-4o-mini", "small", "primary-mini"):  # a group holding backup-mini too
            chain = llm_chain("backup-mini", model)
            for base, query, accept in (
                (r.urls[0], "", "application/json"),
                (r.urls[1], "?wait=false", "application/json"),
                (r.urls[0], "", "text/event-stream"),
            ):
                got = await http.post(
                    f"{base}/v1/chains{query}", headers={**auth, "accept": accept}, json=chain
                )
                assert got.status_code == 403, got.text
                assert got.json()["error"]["param"] == "model" and model in got.text
        ok = await http.post(f"{r.urls[1]}/v1/chains", headers=auth, json=llm_chain("backup-mini"))
        assert ok.status_code == 200 and ok.json()["type"] == "chain.completed", ok.text
        assert r.sandbox.counts["openai.chat"] == calls + 1  # only the granted chain ran
        # a routing hint naming a deployment the key may not use reaches none
        prefer = {**auth, "x-chainyard-prefer": "primary-mini,primary"}
        chat = {"model": "backup-mini", "messages": [{"role": "user", "content": "hi"}]}
        hinted = await http.post(f"{r.urls[0]}/v1/chat/completions", headers=prefer, json=chat)
        assert hinted.status_code == 200, hinted.text
        events = await http.get(
            f"{r.urls[1]}/v1/chains/{hinted.headers['x-chainyard-chain-id']}/events", headers=auth
        )
        done = [json.loads(line) for line in events.text.splitlines()][-1]
        assert [s["deployment"] for s in done["steps"]] == ["backup-mini"], done
        bad_id = {**llm_chain("backup-mini"), "id": "a.>"}  # the router's to refuse, as before
        refused = await http.post(f"{r.urls[0]}/v1/chains", headers=auth, json=bad_id)
        assert refused.status_code == 400 and refused.json()["type"] == "chain.rejected"


async def counted(r: Replicas, key_id: str, limit: str = "usd") -> float:
    """What the replicas counted in `cy_limits` against the key's `usd` (today) or `tpm`."""
    try:
        entry = await r.limits.get(f"{key_id}.{limit}")
    except KeyNotFoundError:
        return 0.0
    return float(msgspec.json.decode(entry.value or b"{}").get("used", 0.0))


def auth_of(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def known_on_both(r: Replicas, http: httpx.AsyncClient, key: str) -> None:
    """Every replica knows the key (`GET /v1/models`, which no limit counts)."""

    async def both() -> bool:
        got = [(await http.get(f"{u}/v1/models", headers=auth_of(key))).status_code for u in r.urls]
        return got == [200, 200]

    await wait_until(both, 1.0, "both gateways to know the key")


async def test_chains_over_http_count_against_the_keys_limits(replicas: Replicas) -> None:
    """A chain posted to `/v1/chains` takes from the key's rpm and its cost counts against the
    spend per day, on every replica, whether the caller waits for it or not; a burst of chats
    and chains at once, split between the replicas, gets exactly the rpm through."""
    r = replicas
    await asyncio.sleep(_outside_a_minute_boundary())  # a clock boundary, not a race
    limited, _ = await new_key(r, tenant="acme", rpm=2)
    spender, _ = await new_key(r, tenant="acme", spend_usd_per_day=1e-9)  # one call spends more
    bursting, _ = await new_key(r, tenant="globex", rpm=6)
    chain = llm_chain("gpt-4o-mini")
    async with httpx.AsyncClient(timeout=60) as http:
        for key in (limited, spender, bursting):
            await known_on_both(r, http, key)
        burst = await asyncio.gather(
            *(ask(http, r.urls[i % 2], bursting) for i in range(0, 24, 2)),
            *(
                http.post(f"{r.urls[i % 2]}/v1/chains", headers=auth_of(bursting), json=chain)
                for i in range(1, 24, 2)
            ),
        )
        assert sorted(b.status_code for b in burst) == [200] * 6 + [429] * 18

        async def post(base: str, key: str, query: str = "") -> httpx.Response:
            return await http.post(f"{base}/v1/chains{query}", headers=auth_of(key), json=chain)

        statuses = [(await post(r.urls[i % 2], limited)).status_code for i in range(4)]
        assert statuses == [200, 200, 429, 429]
        over = await post(r.urls[0], limited, "?wait=false")
        assert over.status_code == 429 and "retry-after" in over.headers
        # spent by a chain nobody waits for, on one replica: refused on the other
        assert (await post(r.urls[0], spender, "?wait=false")).status_code == 202

        async def refused_on_the_other() -> bool:
            return (await post(r.urls[1], spender)).status_code == 429

        await wait_until(refused_on_the_other, 10.0, "the other replica to refuse the spender")


async def test_a_keyed_request_its_caller_gave_up_on_is_still_counted(replicas: Replicas) -> None:
    """A caller that goes away from a request with an Idempotency-Key leaves its chain running
    (docs/GATEWAY.md), and its retry is answered from that chain uncounted: the chain's spend
    is counted when it ends, or the retry would get a whole answer the limit never saw. A
    retry after that, over the limit, still gets the first answer: it spends nothing."""
    r = replicas
    spender, key_id = await new_key(r, tenant="acme", spend_usd_per_day=1e-9)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}]}
    headers = {"authorization": f"Bearer {spender}", "idempotency-key": "walk-away"}
    async with httpx.AsyncClient(timeout=60) as http:
        await known_on_both(r, http, spender)
        await r.sandbox.configure(latency_ms=1500.0)
        try:
            with pytest.raises(httpx.ReadTimeout):  # the caller goes away before the answer
                await http.post(
                    f"{r.urls[0]}/v1/chat/completions", headers=headers, json=body, timeout=0.5
                )
            retry = await http.post(f"{r.urls[1]}/v1/chat/completions", headers=headers, json=body)
        finally:
            await r.sandbox.configure(latency_ms=0.0)
        assert retry.status_code == 200, retry.text

        # (asking would spend)
        await wait_until(lambda: counted(r, key_id), 5.0, "the chain's spend to be counted")
        calls = r.sandbox.counts["openai.chat"]
        for base in r.urls:
            assert (await ask(http, base, spender)).status_code == 429
            # a retry runs and spends nothing: over the limit, it still gets the first answer
            again = await http.post(f"{base}/v1/chat/completions", headers=headers, json=body)
            assert again.status_code == 200, again.text
            assert again.json()["id"] == retry.json()["id"]
        assert r.sandbox.counts["openai.chat"] == calls


async def test_a_chain_without_a_deadline_is_counted_however_long_it_runs(
    replicas: Replicas,
) -> None:
    """A chain posted without `deadline_ms` may run for as long as its steps take (a wait for a
    human's signal): its usage is counted when it ends, even long after the gateway's own
    request deadline."""
    r = replicas
    spender, key_id = await new_key(r, tenant="acme", spend_usd_per_day=1e-9)
    chain = llm_chain("gpt-4o-mini")
    chain["steps"] = [  # type: ignore[index]
        {"kind": "wait", "id": "approval", "signal": "go"},
        {**chain["steps"][0], "after": ["approval"]},  # type: ignore[index]
    ]
    short = await r.start_gateway("--deadline-ms", "1000")  # a request's, when it sets none
    async with httpx.AsyncClient(timeout=60) as http:
        await known_on_both(r, http, spender)
        headers = auth_of(spender)
        posted = await http.post(f"{short}/v1/chains?wait=false", headers=headers, json=chain)
        assert posted.status_code == 202, posted.text
        chain_id = posted.json()["id"]
        await asyncio.sleep(1 + 5 + 1)  # a duration, not a race: past that and 5 s beyond it
        go = await http.post(
            f"{r.urls[0]}/v1/chains/{chain_id}/signal/go", headers=auth_of(spender), json={}
        )
        assert go.status_code == 200, go.text
        await wait_until(lambda: counted(r, key_id), 5.0, "the chain's spend to be counted")


async def test_one_idempotency_key_at_once_on_both_replicas_counts_once(
    replicas: Replicas,
) -> None:
    """Two first requests with one Idempotency-Key, one to each replica at the same moment,
    both find no chain yet; the chain they share runs once and its tokens count once."""
    r = replicas
    key, key_id = await new_key(r, tenant="acme", tpm=100_000)

    def chat(text: str) -> dict[str, object]:
        return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}

    async with httpx.AsyncClient(timeout=60) as http:
        await known_on_both(r, http, key)
        keyed = {**auth_of(key), "idempotency-key": "at-once"}
        both = await asyncio.gather(
            *(http.post(f"{u}/v1/chat/completions", headers=keyed, json=chat("x")) for u in r.urls)
        )
        assert [b.status_code for b in both] == [200, 200], [b.text for b in both]
        shared = both[0].json()["usage"]["total_tokens"]
        # then one more request a replica: each replica settles in order, so once these are
        # counted, whatever the pair made each replica count is too
        later = [
            await http.post(f"{u}/v1/chat/completions", headers=auth_of(key), json=chat(text))
            for u, text in zip(r.urls, ("one two three", "four five six seven"), strict=True)
        ]
        expected = shared + sum(x.json()["usage"]["total_tokens"] for x in later)

        async def all_counted() -> bool:
            return await counted(r, key_id, "tpm") >= expected

        await wait_until(all_counted, 5.0, "every request to be counted")
        assert await counted(r, key_id, "tpm") == expected  # (not the shared chain twice)
