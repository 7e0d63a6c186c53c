"""A gateway whose NATS user lacks a permission a request needs (here: submitting for tenant
acme) answers that request 500 `gateway_misconfigured`, not 503 "cannot reach NATS" (retrying
would not help), logs the server's refusal for the operator, and serves everything else."""

from __future__ import annotations

from pathlib import Path

import httpx
from gateway_stack import POOLS, _gateway_url, config_toml
from helpers import start_cli, stop_all
from nats.errors import Error as NatsError

from chainyard.gateway.core import Denials
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

USERS = """
authorization {
  users = [
    {user: services, password: services-pw}
    {user: gateway, password: gateway-pw,
     permissions: {publish: {allow: ">", deny: ["cy.submit.acme"]}, subscribe: ">"}}
  ]
}
"""


async def test_a_refused_submit_is_a_misconfigured_gateway(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(USERS)
    cfg = tmp_path / "chainyard.toml"
    cfg.write_text(config_toml(dict.fromkeys(POOLS, "http://127.0.0.1:9")))
    async with NatsServer(config_file=conf) as nats:
        address = nats.url.removeprefix("nats://")
        bus = await open_bus(f"nats://services:services-pw@{address}", name="services")
        log = tmp_path / "gateway.log"
        gateway = await start_cli(
            log, "gateway", "--nats", f"nats://gateway:gateway-pw@{address}",
            "--config", str(cfg), "--port", "0", "--key", "sk-acme=acme", "--key", "sk-beta=beta",
        )  # fmt: skip
        try:
            url = await _gateway_url(log, gateway)
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                asked = await http.post(
                    "/v1/chat/completions",
                    headers={"authorization": "Bearer sk-acme"},
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert asked.status_code == 500, asked.text
                error = asked.json()["error"]
                assert error["code"] == "gateway_misconfigured"
                assert "misconfigured" in error["message"] and "NATS user" in error["message"]
                assert "cy.submit" not in error["message"]  # the subject is for the operator
                # Still serving: another tenant's models, its health.
                models = await http.get("/v1/models", headers={"authorization": "Bearer sk-beta"})
                assert models.status_code == 200
                assert (await http.get("/healthz")).status_code == 200
            assert gateway.returncode is None
            text = log.read_text().lower()
            assert 'permissions violation for publish to "cy.submit.acme"' in text
        finally:
            await stop_all([gateway])
            await bus.close()


def test_denials_remember_only_recent_permission_violations() -> None:
    now = [100.0]
    denials = Denials(clock=lambda: now[0])
    denials.saw(NatsError("nats: stale connection"))
    assert denials.recent() is None
    denials.saw(NatsError("nats: 'Permissions Violation for Publish to \"cy.submit.acme\"'"))
    assert denials.recent() is not None and "cy.submit.acme" in denials.recent()
    now[0] += Denials.RECENT_S + 1
    assert denials.recent() is None
