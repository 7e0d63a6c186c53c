"""The gateway's own NATS user (deploy/accounts.conf, `gateway`), on nats-server started with
deploy/nats-secure.conf.

Two `chainyard gateway` processes connected as `gateway` (keys from KV) serve every kind of
request for two tenants that reuse a chain id, beside two routers and two workers connected as
`services`, and the server refuses nothing they do (no permissions violation in any log). What
the gateway has no need for (the work queues, acks, timers, writes to chain state or keys,
deleting or purging streams, the services' replies) the server refuses to the gateway's user."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import openai
import pytest
from gateway_stack import POOLS, PROVIDER_KEY, _gateway_url, config_toml
from helpers import start_cli, start_routers, stop_all, stream_count, wait_until
from nats.js.kv import KeyValue
from test_security import Secure, secure  # noqa: F401 - `secure` is a fixture
from test_tenant_permissions import (  # noqa: F401 - `stack` is a fixture
    Refusals,
    Stack,
    consumer_request,
    durables,
    stack,
)

from chainyard.contracts import Topology
from chainyard.gateway.cli import INBOX_PREFIX
from chainyard.gateway.keys import checked_grant, create_key, open_keys_kv, revoke_key
from chainyard.runtime.nats import Bus, open_bus
from chainyard.sandbox import SandboxConfig, SandboxServer


@dataclass
class Deployed:
    bus: Bus  # the services user: what the operator's `chainyard keys` connects as
    keys: KeyValue  # cy_keys
    urls: list[str]  # the gateways' base URLs
    logs: Path
    sandbox: SandboxServer


@pytest.fixture
async def deployed(
    secure: Secure,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Deployed]:
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.dir / "ca.pem"))  # the processes trust it
    monkeypatch.setenv("GW_PROVIDER_KEY", PROVIDER_KEY)
    async with contextlib.AsyncExitStack() as cleanup:
        sb = await cleanup.enter_async_context(
            SandboxServer(SandboxConfig(api_key=PROVIDER_KEY, latency_ms=0.0))
        )
        cfg = tmp_path / "chainyard.toml"
        cfg.write_text(config_toml(dict.fromkeys(POOLS, sb.url)))
        services = secure.url("services")
        bus = await open_bus(services, name="operator")  # streams and buckets, as services make
        cleanup.push_async_callback(bus.close)
        procs = await start_routers(tmp_path, services, cfg)
        cleanup.push_async_callback(lambda: stop_all(procs))
        common = ("--config", str(cfg))
        for i in range(2):
            log = tmp_path / f"worker{i}.log"
            procs.append(await start_cli(log, "worker", "--nats", services, *common))
        urls = []
        for i in range(2):  # no --key, no --open: keys and limits in KV
            log = tmp_path / f"gateway{i}.log"
            as_gateway = ("--nats", secure.url("gateway"))
            procs.append(await start_cli(log, "gateway", *as_gateway, *common, "--port", "0"))
            urls.append(await _gateway_url(log, procs[-1]))
        yield Deployed(
            bus=bus, keys=await open_keys_kv(bus.js), urls=urls, logs=tmp_path, sandbox=sb
        )


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def new_key(d: Deployed, **grant: Any) -> tuple[str, str]:
    raw, record = await create_key(d.keys, checked_grant(**grant))
    return raw, record.key_id


async def answered_on_both(d: Deployed, http: httpx.AsyncClient, key: str, status: int) -> None:
    """Both gateways answer `status` to the key (a key made or revoked reaches them by their
    watch on cy_keys)."""

    async def both() -> bool:
        got = [(await http.get(f"{u}/v1/models", headers=auth(key))).status_code for u in d.urls]
        return got == [status, status]

    await wait_until(both, 5.0, f"both gateways to answer {status}")


def ask(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def waiting(chain_id: str) -> dict[str, Any]:
    return {"id": chain_id, "steps": [{"kind": "wait", "id": "ok", "signal": "go"}]}


def lines(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def state_of(http: httpx.AsyncClient, base: str, key: str, chain_id: str) -> dict[str, Any]:
    """The chain's state once the router has stored it (a chain submitted without waiting)."""

    async def stored() -> dict[str, Any] | None:
        r = await http.get(f"{base}/v1/chains/{chain_id}", headers=auth(key))
        return r.json() if r.status_code == 200 else None

    return await wait_until(stored, 10.0, f"the state of chain {chain_id}")


async def counter(kv: KeyValue, key: str) -> float:
    entry = await kv.get(key)
    return float(msgspec.json.decode(entry.value or b"{}").get("used", 0))


async def test_the_gateway_serves_everything_as_its_own_user(deployed: Deployed) -> None:
    d = deployed
    g0, g1 = d.urls
    acme, acme_id = await new_key(d, tenant="acme", rpm=1000, tpm=1_000_000)
    globex, globex_id = await new_key(d, tenant="globex")
    spender, _ = await new_key(d, tenant="globex", spend_usd_per_day=1e-9)  # one call spends more
    async with httpx.AsyncClient(timeout=60) as http:
        for key in (acme, globex, spender):  # made after the gateways started: the watch
            await answered_on_both(d, http, key, 200)

        # a chat completion, and a streamed one, with the OpenAI SDK; a message, Anthropic's
        plain = openai.AsyncOpenAI(base_url=f"{g0}/v1", api_key=acme, max_retries=0)
        done = await plain.chat.completions.create(**ask("plain over the gateway user"))
        assert "plain over the gateway user" in (done.choices[0].message.content or "")
        streaming = openai.AsyncOpenAI(base_url=f"{g1}/v1", api_key=acme, max_retries=0)
        chunks = await streaming.chat.completions.create(
            **ask("streamed over the gateway user"),
            stream=True,
            stream_options={"include_usage": True},
        )
        text, tokens = "", 0
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            elif chunk.usage:
                tokens = chunk.usage.completion_tokens
        assert "streamed over the gateway user" in text and tokens > 0
        claude = anthropic.AsyncAnthropic(base_url=g1, api_key=globex, max_retries=0)
        msg = await claude.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            messages=[{"role": "user", "content": "anthropic over the gateway user"}],
        )
        assert "anthropic over the gateway user" in msg.content[0].text  # type: ignore[union-attr]

        # a keyed request retried on the other replica: the first answer, run once
        calls = d.sandbox.counts["openai.chat"]
        keyed = {**auth(acme), "idempotency-key": "order-7"}
        first, again = [
            await http.post(f"{u}/v1/chat/completions", headers=keyed, json=ask("charge once"))
            for u in (g0, g1)
        ]
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json() == again.json()
        chain_id = first.headers["x-chainyard-chain-id"]
        subject = f"cy.events.acme.{chain_id}.step.completed"
        assert await stream_count(d.bus.js, "CY_EVENTS", subject) == 1
        assert d.sandbox.counts["openai.chat"] == calls + 1

        # chains over HTTP: two tenants, one chain id
        r = await http.post(f"{g0}/v1/chains?wait=false", headers=auth(acme), json=waiting("same"))
        assert r.status_code == 202, r.text
        other = {
            "id": "same",
            "steps": [{"kind": "llm", "id": "a", "model": "small", "messages": [
                {"role": "user", "content": "globex's chain"}]}],
        }  # fmt: skip
        r = await http.post(f"{g1}/v1/chains", headers=auth(globex), json=other)
        assert r.status_code == 200, r.text
        assert r.json()["type"] == "chain.completed" and r.json()["tenant"] == "globex"
        state = await state_of(http, g1, acme, "same")
        assert state["status"] == "running" and state["chain"]["steps"][0]["kind"] == "wait"
        state = await state_of(http, g0, globex, "same")
        assert state["status"] == "completed"
        r = await http.post(f"{g1}/v1/chains/same/signal/go", headers=auth(acme), json={"ok": 1})
        assert (r.status_code, r.json()["type"]) == (200, "control.accepted"), r.text
        events = lines(await http.get(f"{g0}/v1/chains/same/events", headers=auth(acme)))
        assert events[-1]["type"] == "chain.completed" and events[-1]["output"]["data"] == {"ok": 1}
        events = lines(await http.get(f"{g0}/v1/chains/same/events", headers=auth(globex)))
        assert "globex's chain" in events[-1]["output"]["text"]
        async with http.stream(
            "POST",
            f"{g1}/v1/chains",
            headers={**auth(globex), "accept": "text/event-stream"},
            json={**other, "id": "sse"},
        ) as sse:
            kinds = [line[7:] async for line in sse.aiter_lines() if line.startswith("event: ")]
        assert kinds[-1] == "chain.completed", kinds

        # a cancel
        r = await http.post(f"{g1}/v1/chains?wait=false", headers=auth(acme), json=waiting("c1"))
        assert r.status_code == 202, r.text
        await state_of(http, g0, acme, "c1")
        r = await http.post(
            f"{g0}/v1/chains/c1/cancel", headers=auth(acme), json={"reason": "changed my mind"}
        )
        assert (r.status_code, r.json()["type"]) == (200, "control.accepted"), r.text
        events = lines(await http.get(f"{g1}/v1/chains/c1/events", headers=auth(acme)))
        assert events[-1]["type"] == "chain.cancelled"
        assert events[-1]["reason"] == "changed my mind"
        # another tenant's chain of that id does not exist (looked for in state and events)
        r = await http.get(f"{g0}/v1/chains/c1/events", headers=auth(globex))
        assert r.status_code == 404, r.text

        # limits counted in cy_limits by the gateways: acme's requests and tokens; a spend
        # counted on one replica refuses on the other
        limits = await d.bus.js.key_value("cy_limits")
        assert await counter(limits, f"{acme_id}.rpm") >= 1

        async def tokens_counted() -> bool:  # settled after the answer
            return await counter(limits, f"{acme_id}.tpm") > 0

        await wait_until(tokens_counted, 5.0, "acme's tokens to be counted")
        r = await http.post(f"{g0}/v1/chat/completions", headers=auth(spender), json=ask("spend"))
        assert r.status_code == 200, r.text

        async def refused_on_the_other() -> bool:
            got = await http.post(f"{g1}/v1/chat/completions", headers=auth(spender), json=ask("x"))
            return got.status_code == 429 and int(got.headers["retry-after"]) >= 1

        await wait_until(refused_on_the_other, 5.0, "the other replica to refuse the spender")

        # a revoked key is refused by both
        assert await revoke_key(d.keys, globex_id) is not None
        await answered_on_both(d, http, globex, 401)

    logs = {p.name: p.read_text(errors="replace") for p in d.logs.glob("*.log")}
    assert {"gateway0.log", "gateway1.log", "router0.log", "worker0.log"} <= set(logs)
    refused = [f"{n}: {line}" for n, t in logs.items() for line in t.splitlines()
               if "violation" in line.lower()]  # fmt: skip
    assert refused == []


async def test_what_the_gateway_user_may_not_do_is_refused(stack: Stack) -> None:  # noqa: F811
    """The services (a router, a tool worker) run as `services`; a raw connection as `gateway`
    tries what the gateway never needs, and each is refused by the server."""
    js = stack.bus.js
    streams = ("CY_INTAKE", "CY_WORK", "CY_EVENTS", "CY_TIMERS", "KV_cy_chains")
    buckets = ("KV_cy_keys", "KV_cy_limits")

    topology = Topology()
    router = {
        c.durable
        for c in (topology.intake_consumer, topology.control_consumer, topology.engine_consumer,
                  topology.timers_consumer, topology.deadlines_consumer)
    }  # fmt: skip
    worker = topology.pool_consumer("tool.weather").durable

    async def bound() -> bool:  # the services have made all their durables
        have = {name for s in streams for name in await durables(js, s)}
        return router | {worker} <= have

    await wait_until(bound, 10.0, "the router's and the worker's durable consumers")
    before = {name: await durables(js, name) for name in (*streams, *buckets)}
    # The gateway's watches on cy_keys and cy_limits create consumers unscoped (nats-py's KV
    # watch names no filter in the subject), so no service may keep a durable there.
    assert before["KV_cy_keys"] == before["KV_cy_limits"] == {}
    gw = Refusals()
    nc = await gw.connect(stack.secure, "gateway", INBOX_PREFIX)
    try:
        # the work: take it, ack it, look at it, make it
        for name in before["CY_WORK"]:
            await gw.publish(f"$JS.API.CONSUMER.MSG.NEXT.CY_WORK.{name}", b'{"batch": 1}')
            await gw.publish(f"$JS.API.CONSUMER.INFO.CY_WORK.{name}")
            await gw.publish(f"$JS.API.CONSUMER.DELETE.CY_WORK.{name}")
            await gw.publish(f"$JS.ACK.CY_WORK.{name}.1.1.1.1.0", b"+ACK")
        await gw.publish(
            "$JS.API.CONSUMER.CREATE.CY_WORK.x.cy.work.>", consumer_request("CY_WORK", "cy.work.>")
        )
        await gw.publish("$JS.API.CONSUMER.CREATE.CY_WORK", consumer_request("CY_WORK", ""))
        await gw.publish("$JS.API.CONSUMER.DURABLE.CREATE.CY_WORK.x")
        for subject in (
            "cy.work.tool.weather",
            "cy.cancel.acme.c1",
            "cy.timer.acme.c1.s",
            "cy.deadline.acme.c1",
            "cy.schedule.deadline.acme.c1.1765152000000",
            "cy.dlq.acme",
            "cy.events.acme.c1.chain.completed",  # events are the services' to write
            "cy.control.acme.c1.replay",  # the gateway cancels and signals, never replays
        ):
            await gw.publish(subject)
        # buckets: chain state and keys are read only, the services' own ones closed
        await gw.publish("$KV.cy_chains.acme.c1", b"{}")
        await gw.publish("$KV.cy_keys.key_000000000000", b'{"tenant": "acme"}')
        await gw.publish("$KV.cy_capacity.x", b"{}")
        await gw.publish("$KV.cy_breakers.x", b"{}")
        for bucket in ("cy_capacity", "cy_breakers", "cy_keys"):  # (keys: the watch alone)
            await gw.publish(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", b'{"last_by_subj": ">"}')
            await gw.publish(f"$JS.API.DIRECT.GET.KV_{bucket}", b'{"last_by_subj": ">"}')
        # no stream or consumer made, changed, emptied or removed; no looking around
        for name in (*streams, *buckets):
            for verb in ("DELETE", "PURGE", "UPDATE", "CREATE", "MSG.DELETE"):
                await gw.publish(f"$JS.API.STREAM.{verb}.{name}")
        for subject in (
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.INFO.CY_WORK",
            "$JS.API.STREAM.MSG.GET.CY_INTAKE",
            "$JS.API.CONSUMER.NAMES.CY_EVENTS",
            "$JS.API.CONSUMER.INFO.CY_EVENTS.router-engine",
            "$JS.API.CONSUMER.MSG.NEXT.CY_EVENTS.router-engine",
            "$JS.API.CONSUMER.DELETE.CY_EVENTS.router-engine",
            "$JS.ACK.CY_EVENTS.router-engine.1.1.1.1.0",
        ):
            await gw.publish(subject)
        # the deny line: no service's durable can be pointed at a filter of the gateway's
        for stream, filter_subject in (
            ("CY_EVENTS", "cy.events.acme.>"),
            ("KV_cy_chains", "$KV.cy_chains.acme.>"),
        ):
            for name in {*before["CY_EVENTS"], *before["KV_cy_chains"]}:
                await gw.publish(
                    f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
                    consumer_request(stream, filter_subject, name),
                )
        # the services' replies, the work, the intake, the state: nothing to read there
        for subject in (
            "_INBOX.>",
            "_INBOX_acme.>",
            "cy.work.>",
            "cy.submit.>",
            "cy.control.>",
            "cy.cancel.>",
            "cy.timer.>",
            "$KV.>",
            "$JS.>",
            ">",
        ):
            await gw.subscribe(subject)
        # nothing of that changed the services' consumers
        for name, had in before.items():
            assert await durables(js, name) == had, name
    finally:
        await nc.close()


async def test_a_gateway_started_before_the_services_waits_for_their_buckets(
    secure: Secure,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its user may not create the key and limit buckets (the services do, as they start): a
    gateway that comes up first, as it may on Kubernetes, waits for them, then serves."""
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.dir / "ca.pem"))
    cfg = tmp_path / "chainyard.toml"
    cfg.write_text(config_toml(dict.fromkeys(POOLS, "http://127.0.0.1:9")))
    log = tmp_path / "gateway.log"
    as_gateway = ("--nats", secure.url("gateway"), "--config", str(cfg), "--port", "0")
    procs = [await start_cli(log, "gateway", *as_gateway)]
    try:
        refused = 'permissions violation for publish to "$js.api.stream.create.kv_cy_keys"'
        await wait_until(lambda: refused in log.read_text().lower(), 30, "a refused create")
        bus = await open_bus(secure.url("services"), name="router-like")  # makes every bucket
        try:
            url = await _gateway_url(log, procs[0])
            raw, _ = await create_key(await open_keys_kv(bus.js), checked_grant(tenant="acme"))
            async with httpx.AsyncClient(timeout=30) as http:

                async def served() -> bool:  # once its watch on cy_keys has the new key
                    r = await http.get(f"{url}/v1/models", headers=auth(raw))
                    return r.status_code == 200

                await wait_until(served, 5.0, "the gateway to accept the key")
        finally:
            await bus.close()
    finally:
        await stop_all(procs)
