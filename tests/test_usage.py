"""`chainyard usage` and the tenant-labelled metrics against a live stack: their totals are the
sum of the chains' terminal events; metadata travels to the events and groups the report; bad
metadata is refused with its path; the `tenant` label folds past its bound."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import Events, python_env, wait_for_event
from ops_stack import FAST, TENANTS, live_stack, provider, tools  # noqa: F401  (fixture)
from test_security import Secure, secure  # noqa: F401  (fixture)

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainRejected,
    Config,
    LlmStep,
    Message,
    StepCache,
    ToolStep,
    Usage,
    encode,
)
from chainyard.runtime.metrics import Metrics, metrics
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxServer
from chainyard.stack import build
from chainyard.usage import COLUMNS, UsageReport

CHAINS = 4  # per tenant


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=python_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def expected(ends: list[Any], key: Any) -> dict[str, dict[str, float]]:
    """Per group: chains, tokens and cost, summed from the terminal events themselves."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in ends:
        row = out[key(e)]
        row["chains"] += 1
        row["input_tokens"] += e.usage.input_tokens
        row["output_tokens"] += e.usage.output_tokens
        row["cost_usd"] += e.cost_usd
    return out


def same(rows: list[dict[str, Any]], want: dict[str, dict[str, float]]) -> None:
    got = {r["key"]: r for r in rows}
    assert set(got) == set(want), (got, want)
    for k, w in want.items():
        for col, v in w.items():
            assert got[k][col] == pytest.approx(v, rel=1e-9, abs=1e-12), (k, col, got[k], w)


async def test_usage_totals_are_the_chain_events_and_metrics_agree(
    bus: Bus,
    nats_server: NatsServer,
    provider: SandboxServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    metrics.setup(prometheus=True, max_tenants=1)  # the routers below record here; one folds
    try:
        async with live_stack(bus, nats_server.url, provider.url, tmp_path) as stack:
            ends = await stack.run_chains(CHAINS)
            # a different chain under a used id: rejected (id_in_use), nothing counted twice
            rej = await wait_for_event(
                bus.nc, "cy.events.acme.c-0.>", lambda e: isinstance(e, ChainRejected), 10,
                lambda: bus.js.publish(bus.subjects.submit("acme"), encode(Chain(
                    id="c-0", steps=[{"kind": "tool", "id": "t", "tool": "search"}]))),  # type: ignore[list-item]
            )  # fmt: skip
            assert isinstance(rej, ChainRejected) and rej.id_in_use
            scraped = metrics.render().decode()
    finally:
        metrics.shutdown()
    assert len(ends) == CHAINS * len(TENANTS)
    assert all(type(e).__name__ == "ChainCompleted" for e in ends), ends
    assert all(e.metadata["feature"] in ("search", "summary") for e in ends)  # carried
    url = nats_server.url

    # --by tenant (JSON): exactly the sum of the terminal events, per tenant and in total
    rc, out, err = await cli("usage", "--nats", url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["by"] == "tenant" and doc["since"]
    same(doc["rows"], expected(ends, lambda e: e.tenant))
    total = doc["total"]
    assert total["chains"] == len(ends) and total["completed"] == len(ends)
    assert total["cost_usd"] == pytest.approx(sum(e.cost_usd for e in ends), rel=1e-12)
    assert total["cost_usd"] > 0
    tokens = sum((e.usage for e in ends), Usage())
    assert (total["input_tokens"], total["output_tokens"]) == (
        tokens.input_tokens,
        tokens.output_tokens,
    )
    ran = sum(1 for e in ends for s in e.steps if s.attempts)
    assert total["steps"] == ran == len(ends) * 4

    # --by metadata.feature; --tenant: only that tenant's chains (same ids as the other's)
    rc, out, err = await cli("usage", "--nats", url, "--json", "--by", "metadata.feature")
    assert rc == 0, err
    same(json.loads(out)["rows"], expected(ends, lambda e: e.metadata["feature"]))
    rc, out, err = await cli(
        "usage", "--nats", url, "--json", "--by", "metadata.user", "--tenant", "globex"
    )
    assert rc == 0, err
    globex = [e for e in ends if e.tenant == "globex"]
    same(json.loads(out)["rows"], expected(globex, lambda e: e.metadata["user"]))

    # --by pool: step rows; their sums are still the chains' totals
    rc, out, err = await cli("usage", "--nats", url, "--json", "--by", "pool")
    assert rc == 0, err
    doc = json.loads(out)
    rows = {r["key"]: r for r in doc["rows"]}
    assert set(rows) == {FAST, "big", "tool.search"}
    assert rows["tool.search"]["cost_usd"] == 0 and rows["tool.search"]["chains"] == len(ends)
    assert sum(r["cost_usd"] for r in rows.values()) == pytest.approx(total["cost_usd"])
    assert sum(r["input_tokens"] for r in rows.values()) == total["input_tokens"]
    assert sum(r["steps"] for r in rows.values()) == total["steps"]
    assert doc["total"]["chains"] == len(ends)

    # --csv: a header of the columns, one line per group, the total last
    rc, out, err = await cli("usage", "--nats", url, "--csv", "--by", "model")
    assert rc == 0, err
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["model", *COLUMNS[1:]]
    assert {r[0] for r in table[1:-1]} == {"m-fast", "m-big", "search"}
    assert table[-1][0] == "total" and int(table[-1][1]) == len(ends)
    assert float(table[-1][COLUMNS.index("cost_usd")]) == pytest.approx(total["cost_usd"], 1e-5)

    # the human table; a window that holds nothing; bad input
    rc, out, _ = await cli("usage", "--nats", url)
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["tenant", "chains", "ok"]
    assert out.splitlines()[-1].split()[:2] == ["total", str(len(ends))]
    rc, out, err = await cli("usage", "--nats", url, "--by", "colour")
    assert rc == 2 and "metadata.KEY" in err

    # the metrics: the same totals, one tenant by name and the other folded into `other`
    seen = prom(scraped, "chainyard_tenant_cost_usd_total")
    assert len(seen) == 2 and "other" in seen and set(seen) - {"other"} <= set(TENANTS)
    assert sum(seen.values()) == pytest.approx(total["cost_usd"], rel=1e-9)
    chains = prom(scraped, "chainyard_tenant_chains_ended_total")
    assert sum(chains.values()) == len(ends)
    named = (set(seen) - {"other"}).pop()
    assert chains[named] == CHAINS and seen[named] == pytest.approx(
        sum(e.cost_usd for e in ends if e.tenant == named), rel=1e-9
    )


def prom(text: str, name: str) -> dict[str, float]:
    """The samples of `name` summed per `tenant` label, from the Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels["tenant"]] += s.value
    return dict(out)


async def test_bad_metadata_is_refused_with_its_path(
    bus: Bus,
    nats_server: NatsServer,
    provider: SandboxServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with live_stack(bus, nats_server.url, provider.url, tmp_path):
        base = {"id": "m", "steps": [{"kind": "tool", "id": "t", "tool": "search"}]}
        cases = {
            "too-many": ({f"k{i}": "v" for i in range(17)}, "length <= 16"),
            "long-value": ({"k": "x" * 513}, "length <= 512"),
            "long-key": ({"k" * 65: "v"}, "length <= 64 (a key)"),
            "empty-key": ({"": "v"}, "length >= 1 (a key)"),
            "not-text": ({"k": 1}, "Expected `str`"),
        }
        async with Events(bus.nc, "cy.events.acme.*.chain.rejected") as ev:
            for cid, (md, why) in cases.items():
                data = json.dumps({**base, "id": cid, "metadata": md}).encode()
                ack = await bus.js.publish(bus.subjects.submit("acme"), data)
                # a chain that does not decode has no id to answer under: the sender matches
                # the rejection with its publish ack (docs/CONTRACTS.md)
                got = await ev.wait(
                    lambda e, seq=ack.seq: isinstance(e, ChainRejected) and e.intake_seq == seq
                )
                assert isinstance(got, ChainRejected)
                (err,) = got.errors
                assert err.path.startswith("$.metadata") and why in err.message, (cid, err)


def test_tenant_label_folds_past_its_bound() -> None:
    m = Metrics()
    m.setup(prometheus=True, max_tenants=2)  # a registry, no HTTP server
    try:
        for tenant, cost in (("a", 1.0), ("b", 2.0), ("c", 4.0), ("d", 8.0), ("a", 16.0)):
            m.chain_ended("completed", 0.1, cost, tenant, Usage(input_tokens=1, output_tokens=2))
        text = m.render().decode()
    finally:
        m.shutdown()
    assert prom(text, "chainyard_tenant_cost_usd_total") == {"a": 17.0, "b": 2.0, "other": 12.0}
    assert prom(text, "chainyard_tenant_chains_ended_total") == {"a": 2, "b": 1, "other": 2}
    assert prom(text, "chainyard_tenant_tokens_total") == {"a": 6, "b": 3, "other": 6}


def test_report_joins_cache_hits_to_their_chain_and_skips_what_is_not_an_end() -> None:
    """Pure: a cache hit's saving counts when its chain ends; foreign or broken events don't."""
    rep = UsageReport("deployment")
    hit = {"step_id": "a", "cached": True, "saved_usd": 0.25, "attempt": 1}
    rep.add("cy.events.t1.c.step.completed", json.dumps(hit).encode())
    rep.add("cy.events.t1.c.step.failed", b"{}")
    rep.add("cy.events.t1.x.chain.completed", b"not json")
    rep.add("other.events.t1.c.chain.completed", b"{}")
    steps = [
        {"step_id": "a", "attempts": 1, "deployment": "d1", "cost_usd": 0.0},
        {"step_id": "b", "attempts": 1, "deployment": "d2", "cost_usd": 0.5,
         "usage": {"input_tokens": 3, "output_tokens": 4}},
        {"step_id": "skipped", "attempts": 0},
    ]  # fmt: skip
    end = {"chain_id": "c", "cost_usd": 0.5, "steps": steps, "metadata": {"feature": "f"},
           "usage": {"input_tokens": 3, "output_tokens": 4}}  # fmt: skip
    rep.add("cy.events.t1.c.chain.completed", json.dumps(end).encode())
    rows = {r.key: r for r in rep.sorted_rows()}
    assert set(rows) == {"d1", "d2"}
    assert (rows["d1"].cached_steps, rows["d1"].saved_usd, rows["d1"].cost_usd) == (1, 0.25, 0)
    assert (rows["d2"].steps, rows["d2"].input_tokens, rows["d2"].cost_usd) == (1, 3, 0.5)
    t = rep.total
    assert (t.chains, t.completed, t.steps, t.cached_steps, t.saved_usd) == (1, 1, 2, 1, 0.25)
    with pytest.raises(ValueError, match=r"metadata\.KEY"):
        UsageReport("metadata.")


async def test_a_tenant_reads_its_own_usage_and_no_other(
    secure: Secure,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/accounts.conf: tenant A's user gets its report with `--tenant A`; B's events, or
    every tenant's, are refused by the server (exit 4), never shown."""
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.dir / "ca.pem"))  # trust the test CA
    bus = await open_bus(secure.url("services"), name="services")
    services = build(bus, Config(tools=["search"]), tools=tools)
    services.start()
    try:
        async with Events(bus.nc, "cy.events.*.*.chain.>") as ev:
            for tenant in ("A", "B", "B"):
                n = len(ev.received)
                await bus.js.publish(bus.subjects.submit(tenant), encode(Chain(
                    id=f"u{n}", metadata={"feature": "f"},
                    steps=[ToolStep(id="s", tool="search", args={"query": "q"})])))  # fmt: skip
                await ev.wait(lambda e, n=n: isinstance(e, ChainCompleted), count=n + 1)
        as_a = secure.url("tenant-A")
        rc, out, err = await cli("usage", "--nats", as_a, "--tenant", "A", "--json")
        assert rc == 0, err
        doc = json.loads(out)
        assert [r["key"] for r in doc["rows"]] == ["A"] and doc["total"]["chains"] == 1
        for refused in (["--tenant", "B"], []):
            rc, out, err = await cli("usage", "--nats", as_a, "--json", *refused)
            assert rc == 4 and not out and "NATS refused to read" in err, (refused, rc, err)
    finally:
        await services.shutdown()
        await bus.close()


async def test_cache_hits_are_counted_as_savings(
    bus: Bus,
    nats_server: NatsServer,
    provider: SandboxServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The second of two identical cached requests is a hit: usage counts it under its
    deployment as a cached step, saving what the first call cost, and charges nothing."""

    def cached(cid: str) -> Chain:
        ask = LlmStep(id="ask", model="m-fast", cache=StepCache(ttl_s=600),
                      messages=[Message(role="user", content="the same question")])  # fmt: skip
        return Chain(id=cid, steps=[ask], metadata={"feature": "faq"})

    async with live_stack(bus, nats_server.url, provider.url, tmp_path) as stack:
        ends = []
        async with Events(bus.nc, "cy.events.acme.*.chain.>") as ev:
            for n, cid in enumerate(("first", "second")):
                await stack.submit("acme", cached(cid))
                ends.append(await ev.wait(lambda e: isinstance(e, ChainCompleted), count=n + 1))
    first, second = ends
    assert isinstance(first, ChainCompleted) and isinstance(second, ChainCompleted)
    assert first.cost_usd > 0 and second.cost_usd == 0
    rc, out, err = await cli("usage", "--nats", nats_server.url, "--json", "--by", "deployment")
    assert rc == 0, err
    doc = json.loads(out)
    (row,) = doc["rows"]
    assert (row["key"], row["chains"], row["steps"], row["cached_steps"]) == ("fast-d", 2, 2, 1)
    assert row["saved_usd"] == pytest.approx(first.cost_usd, rel=1e-9)
    assert row["cost_usd"] == pytest.approx(first.cost_usd, rel=1e-9)
    assert doc["total"]["saved_usd"] == pytest.approx(first.cost_usd, rel=1e-9)


async def test_usage_before_any_service_ran_is_an_empty_report(nats_server: NatsServer) -> None:
    rc, out, err = await cli("usage", "--nats", nats_server.url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["rows"] == [] and doc["total"]["chains"] == 0
