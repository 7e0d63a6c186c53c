"""deploy/grafana/chainyard.json and deploy/prometheus/alerts.yml against a real Prometheus.

A live stack (2 routers, a worker for a healthy pool and one for a failing pool, every process
with --metrics-port on a free port) runs chains through the sandbox: cached and uncached steps
of two tenants, calls that fail until a breaker opens, a malformed chain that is dead-lettered.
Debian's `prometheus` (installed by .ci/run) scrapes it every second with the alert rules
loaded; then every panel's every query must return a non-empty result and every rule must
evaluate, through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from helpers import free_port, free_ports, start_cli, stop_all, wait_until

from chainyard.client import Client
from chainyard.contracts import Chain, LlmStep, Message, Params, StepCache
from chainyard.runtime.metrics import Metrics
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "chainyard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Grafana's own variables, as Grafana would expand them for a 1 s scrape interval.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Metrics another branch adds (`top`: tenant labels). Until its metrics.py is merged, a panel
# or rule over one of these may be empty; once metrics.py registers it, it is checked as well.
PENDING = {"chainyard_tenant_cost_usd_total"}
METRIC = re.compile(r"\b(chainyard_[a-z_]+)\b")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables expanded."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for t in panel["targets"]:
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def exported_names() -> set[str]:
    """Every series name metrics.py registers (counters with `_total`, histograms' parts)."""
    m = Metrics()
    m.setup(prometheus=True)  # the registry, no server
    names = set()
    for family in m.registry.collect():
        kind = family.type
        base = family.name
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
        else:
            names.add(base)
    m.shutdown()
    return names


def test_every_query_names_metrics_the_services_export() -> None:
    exported = exported_names()
    used = {n for _, q in dashboard_queries() for n in METRIC.findall(q)}
    used |= {n for r in alert_rules() for n in METRIC.findall(r["expr"])}
    assert used, "no chainyard metric used"
    assert used - exported <= PENDING, sorted(used - exported - PENDING)
    titles = [t for t, _ in dashboard_queries()]
    for wanted in ("pool", "Error rate", "breaker", "Queue lag", "In flight", "p50", "tenant"):
        assert any(wanted.lower() in t.lower() for t in titles), wanted
    assert any("Cache hit ratio" in t for t in titles) and any("Dead letters" in t for t in titles)


def test_promtool_checks_the_rules() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    r = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def stack_toml(good_url: str, bad_url: str) -> str:
    return f"""
capacity_wait_s = 2
breaker_failures = 3

[[deployments]]
name = "d-good"
pool = "good"
model = "m"
price = {{ input_per_mtok = 1000.0, output_per_mtok = 2000.0 }}

[[deployments]]
name = "d-bad"
pool = "bad"
model = "m-bad"
price = {{ input_per_mtok = 1000.0, output_per_mtok = 2000.0 }}

[[pools]]
name = "good"
base_url = "{good_url}/v1"
timeout_s = 30

[[pools]]
name = "bad"
base_url = "{bad_url}/v1"
timeout_s = 30
"""


def ask(cid: str, model: str, text: str, cache: bool = False) -> Chain:
    step = LlmStep(
        id="ask",
        model=model,
        messages=[Message(role="user", content=text)],
        params=Params(max_tokens=16),
        cache=StepCache(ttl_s=3600) if cache else None,
    )
    return Chain(id=cid, steps=[step])


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    """A Prometheus of its own: free port, own config and storage, the alert rules loaded."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "chainyard", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def query(http: aiohttp.ClientSession, base: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as r:
        body = await r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@contextlib.asynccontextmanager
async def services(url: str, config: Path, tmp: Path) -> AsyncIterator[list[str]]:
    """2 routers and a worker per pool as processes; yields their metrics addresses."""
    ports = free_ports(4)
    commands = [
        ["router", "--metrics-port", str(ports[0])],
        ["router", "--metrics-port", str(ports[1])],
        ["worker", "--pool", "good", "--metrics-port", str(ports[2])],
        ["worker", "--pool", "bad", "--metrics-port", str(ports[3])],
    ]
    procs = [
        await start_cli(tmp / f"svc{i}.log", *c, "--nats", url, "--config", str(config))
        for i, c in enumerate(commands)
    ]
    try:
        yield [f"127.0.0.1:{p}" for p in ports]
    finally:
        await stop_all(procs)


async def test_every_panel_and_rule_against_a_live_stack(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (.ci/run installs Debian's prometheus)")
    good = SandboxServer(SandboxConfig(latency_ms=20, capture=0))
    bad = SandboxServer(SandboxConfig(error_rate=1.0, error_status=500, capture=0))
    async with good, bad:
        path = tmp_path / "chainyard.toml"
        path.write_text(stack_toml(good.url, bad.url))
        await (await open_bus(nats_server.url, name="t")).close()  # the streams, before intake
        async with services(nats_server.url, path, tmp_path) as targets:
            with prometheus(tmp_path, targets) as prom:
                async with aiohttp.ClientSession() as http:
                    # Every target scraped once before the traffic: counters start from a
                    # sample taken before their increases.
                    async def prometheus_ready() -> bool:
                        # 503 while it loads its storage and rules; refused before it listens
                        try:
                            async with http.get(f"{prom}/-/ready") as r:
                                return r.status == 200
                        except aiohttp.ClientConnectionError:
                            return False

                    async def all_up() -> bool:
                        return len(await query(http, prom, "up == 1")) == len(targets)

                    await wait_until(prometheus_ready, 60, "Prometheus ready", 0.2)
                    await wait_until(all_up, 60, "Prometheus scraping every service", 0.2)
                    await run_traffic(nats_server.url)
                    await check_everything(http, prom)


async def run_traffic(url: str) -> None:
    async with (
        await Client.connect(url, "acme") as acme,
        await Client.connect(url, "globex") as globex,
    ):
        runs = [
            c.run(ask(f"{c.tenant}-{i}", "m", f"question {i % 3}", cache=True), timeout=60)
            for c in (acme, globex)
            for i in range(6)
        ]
        runs += [acme.run(ask(f"plain-{i}", "m", f"uncached {i}"), timeout=60) for i in range(4)]
        runs += [acme.run(ask(f"bad-{i}", "m-bad", "fails"), timeout=60) for i in range(4)]
        ends = await asyncio.gather(*runs)
        kinds = {type(e).__name__ for e in ends}
        assert kinds == {"ChainCompleted", "ChainFailed"}, kinds
        # The same cached requests again: hits now (and savings).
        again = [
            c.run(ask(f"{c.tenant}-again", "m", "question 0", cache=True)) for c in (acme, globex)
        ]
        assert all(type(e).__name__ == "ChainCompleted" for e in await asyncio.gather(*again))
        bus = await open_bus(url, name="t")
        try:  # not JSON: rejected and dead-lettered by the router
            await bus.js.publish("cy.submit.acme", b"{not json")
        finally:
            await bus.close()


async def check_everything(http: aiohttp.ClientSession, prom: str) -> None:
    exported = exported_names()
    for title, expr in dashboard_queries():
        pending = {n for n in METRIC.findall(expr) if n in PENDING and n not in exported}
        if pending:  # another branch's metric, not merged here yet
            continue

        async def answered(expr: str = expr) -> list[dict[str, Any]]:
            result = await query(http, prom, expr)
            # A value, not only a series: a ratio of two idle rates is NaN.
            return result if any(s["value"][1] != "NaN" for s in result) else []

        result = await wait_until(answered, 90, f"panel {title!r}: {expr}", interval=0.5)
        print(f"{title}: {expr}")  # docs/OPERATIONS.md shows a run's (pytest -s)
        for series in result:
            print(f"  {series['metric']} {series['value'][1]}")

    rules = alert_rules()
    for r in rules:
        await query(http, prom, r["expr"])  # parses and evaluates

    async def evaluated() -> list[dict[str, Any]] | None:
        async with http.get(f"{prom}/api/v1/rules") as resp:
            groups = (await resp.json())["data"]["groups"]
        loaded = [rule for g in groups for rule in g["rules"]]
        if len(loaded) != len(rules) or any(x["health"] != "ok" for x in loaded):
            return None
        return loaded

    loaded = await wait_until(evaluated, 30, "every rule evaluated by Prometheus", interval=0.5)
    assert {x["name"] for x in loaded} == {r.get("alert") or r["record"] for r in rules}

    async def alerting() -> dict[str, str] | None:
        async with http.get(f"{prom}/api/v1/alerts") as resp:
            alerts = (await resp.json())["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        want = ("ChainyardDeadLetters", "ChainyardProviderErrorRate")
        return states if all(w in states for w in want) else None

    try:
        states = await wait_until(
            alerting, 60, "the dead-letter and error-rate alerts", interval=0.5
        )
    except TimeoutError:
        async with http.get(f"{prom}/api/v1/alerts") as resp:
            got = (await resp.json())["data"]["alerts"]
        detail = {r["alert"]: await query(http, prom, r["expr"]) for r in rules if "alert" in r}
        raise AssertionError(f"alerts {got}; expressions {detail}") from None
    assert states["ChainyardDeadLetters"] == "firing"  # no `for`: at once
    assert states["ChainyardProviderErrorRate"] == "pending"  # `for: 5m`
