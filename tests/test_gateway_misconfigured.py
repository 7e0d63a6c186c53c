"""A gateway whose NATS user lacks a permission a request needs (submitting for tenant acme, or
reading acme's events) answers that request 500 `gateway_misconfigured` at once, not 503
"cannot reach NATS" after a timeout (retrying would not help) nor 504 after the chain's whole
deadline, logs the server's refusal for the operator, and serves everything else."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest
from gateway_stack import POOLS, _gateway_url, config_toml
from helpers import start_cli, stop_all

from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

USERS = """
authorization {
  users = [
    {user: services, password: services-pw}
    {user: gateway, password: gateway-pw, permissions: %s}
  ]
}
"""
REFUSED = {  # the gateway user's permissions -> what the server refuses
    "submit": ('{publish: {allow: ">", deny: ["cy.submit.acme"]}, subscribe: ">"}',
               'publish to "cy.submit.acme"'),
    # nats-py leaves a refused subscription silent: the request used to wait out the chain's
    # whole deadline (300 s here) for events it could not see, then answer 504.
    "events": ('{publish: ">", subscribe: {allow: ">", deny: ["cy.events.acme.>"]}}',
               'subscription to "cy.events.acme.'),
    # a streamed request reads the step's token deltas too
    "deltas": ('{publish: ">", subscribe: {allow: ">", deny: ["cy.delta.acme.>"]}}',
               'subscription to "cy.delta.acme.'),
}  # fmt: skip


@pytest.mark.parametrize("refused", REFUSED)
async def test_a_refused_request_is_a_misconfigured_gateway(tmp_path: Path, refused: str) -> None:
    permissions, words = REFUSED[refused]
    conf = tmp_path / "nats.conf"
    conf.write_text(USERS % permissions)
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
            cancels = await bus.nc.subscribe("cy.control.acme.*.cancel")
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                asked = await http.post(
                    "/v1/chat/completions",
                    headers={"authorization": "Bearer sk-acme"},
                    json={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": refused == "deltas",
                    },
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
            said = [line for line in log.read_text().lower().splitlines() if "post /v1/" in line]
            assert len(said) == 1 and f"permissions violation for {words}" in said[0], said
            assert "timeout" not in said[0]  # told by the refusal, not guessed after a timeout
            if refused != "submit":  # a chain that runs with nobody to answer is cancelled
                cancel = msgspec.json.decode((await cancels.next_msg(timeout=30)).data)
                assert "may not read its answer" in cancel["reason"], cancel
            await cancels.unsubscribe()  # (a message left in it would hold up the drain)
            await stop_all([gateway])  # (it sends what it sends in the background first)
            intake = await bus.js.stream_info(bus.topology.intake.name, subjects_filter=">")
            sent = sorted((intake.state.subjects or {}).keys())
            if refused == "submit":  # nothing was submitted, so there is nothing to cancel
                assert sent == [], sent
            else:
                assert sent[0].startswith("cy.control.acme.") and sent[0].endswith(".cancel")
                assert sent[1:] == ["cy.submit.acme"], sent
        finally:
            await stop_all([gateway])
            await bus.close()
