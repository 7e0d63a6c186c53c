"""A call the NATS user may not make fails at once with `PermissionDenied` (the server's words),
instead of waiting out a JetStream timeout (a refused publish) or the chain's whole timeout (a
refused subscription to the chain's events, which nats-py leaves silent). Real nats-server with
users; `Refusals` itself against real asyncio tasks."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from helpers import python_env
from nats.errors import Error as NatsError

from chainyard import Chain, Client, LlmStep, Message, PermissionDenied
from chainyard.refusals import Refusals
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

USERS = """
authorization {
  users = [
    {user: services, password: services-pw}
    {user: nosub, password: pw,
     permissions: {publish: ">", subscribe: {allow: ">", deny: ["cy.events.acme.>"]}}}
    {user: nopub, password: pw,
     permissions: {publish: {allow: ">", deny: ["cy.submit.acme", "cy.control.acme.>"]},
                   subscribe: ">"}}
  ]
}
"""
# Far beyond how long a refusal takes, far below the waits it used to cost (a 300 s chain).
WAIT_S = 120.0


def denied(words: str) -> AbstractContextManager[pytest.ExceptionInfo[PermissionDenied]]:
    return pytest.raises(PermissionDenied, match=re.escape(words))


def _chain(chain_id: str) -> Chain:
    step = LlmStep(id="s", model="m", messages=[Message(role="user", content="hi")])
    return Chain(id=chain_id, steps=[step])


def _refusal(subject: str, kind: str = "Publish") -> NatsError:
    # What nats-py hands the error callback: the server's words, lowercased.
    return NatsError(f'nats: permissions violation for {kind.lower()} to "{subject}"')


async def test_a_client_refused_a_subscription_or_a_publish_is_told_at_once(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(USERS)
    async with NatsServer(config_file=conf) as nats:
        address = nats.url.removeprefix("nats://")
        bus = await open_bus(f"nats://services:services-pw@{address}", name="services")
        try:
            # No events of its own: `run` would wait its whole timeout for an end it can't see.
            async with await Client.connect(f"nats://nosub:pw@{address}", "acme") as client:
                with pytest.raises(
                    PermissionDenied, match=re.escape('subscription to "cy.events.acme.c1')
                ):
                    async with asyncio.timeout(WAIT_S):
                        await client.run(_chain("c1"), timeout=300)
                with denied("subscription to"):
                    async with asyncio.timeout(WAIT_S):
                        await client.answer(_chain("c2"), timeout=300)
                with denied('subscription to "cy.events.acme.c2'):
                    async with asyncio.timeout(WAIT_S):
                        async for _ in client.watch("c2", history=False):
                            pass
                # The connection goes on: a publish it may make still works.
                assert await client.submit(_chain("c3")) == "c3"
            async with await Client.connect(f"nats://nopub:pw@{address}", "acme") as client:
                with pytest.raises(
                    PermissionDenied, match=re.escape('publish to "cy.submit.acme"')
                ):
                    async with asyncio.timeout(WAIT_S):
                        await client.submit(_chain("c4"))
                with pytest.raises(
                    PermissionDenied, match=re.escape('publish to "cy.control.acme.c4')
                ):
                    async with asyncio.timeout(WAIT_S):
                        await client.cancel("c4", "no longer needed", timeout=300)
            # The allowed publish reached the intake, the refused one did not.
            intake = bus.topology.intake.name
            last = (await bus.js.stream_info(intake)).state.last_seq
            stored = [await bus.js.get_msg(intake, seq) for seq in range(1, last + 1)]
            ids = {json.loads(m.data)["id"] for m in stored}
            assert "c3" in ids and "c4" not in ids
        finally:
            await bus.close()


async def test_the_cli_says_a_refusal_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(USERS)
    chain = tmp_path / "chain.json"
    chain.write_bytes(b'{"id": "c1", "steps": [{"kind": "llm", "id": "s", "model": "m", '
                      b'"messages": [{"role": "user", "content": "hi"}]}]}')  # fmt: skip
    async with NatsServer(config_file=conf) as nats:
        address = nats.url.removeprefix("nats://")
        bus = await open_bus(f"nats://services:services-pw@{address}", name="services")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chainyard.cli", "submit", str(chain), "--wait",
                "--tenant", "acme", "--nats", f"nats://nosub:pw@{address}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=python_env(),
            )  # fmt: skip
            async with asyncio.timeout(WAIT_S):
                _, err = await proc.communicate()
            assert proc.returncode == 1, err
            said = err.decode().strip().splitlines()[-1]
            assert said.startswith("chainyard submit: refused by NATS:"), said
            assert 'subscription to "cy.events.acme.c1' in said
            assert "Traceback" not in err.decode()
        finally:
            await bus.close()


async def test_a_refusal_ends_only_the_waits_it_names() -> None:
    refusals = Refusals()

    inside = [asyncio.Event(), asyncio.Event()]

    async def waiting(subjects: tuple[str, ...], entered: asyncio.Event) -> None:
        with refusals.watching(subjects):
            entered.set()
            await asyncio.Event().wait()

    acme = asyncio.ensure_future(waiting(("cy.events.acme.X.>", "cy.submit.acme"), inside[0]))
    beta = asyncio.ensure_future(waiting(("cy.events.beta.x.>", "cy.submit.beta"), inside[1]))
    for entered in inside:
        await entered.wait()
    refusals.saw(NatsError("nats: stale connection"))  # not a refusal
    refusals.saw(_refusal("cy.events.acme.x.>", "Subscription"))  # (lowercased, as nats-py does)
    with denied("cy.events.acme.x") as refused:
        await acme
    assert refused.value.subject == "cy.events.acme.x.>"
    assert not beta.done()
    # Another cancellation (a caller going away) stays a cancellation.
    beta.cancel()
    with pytest.raises(asyncio.CancelledError):
        await beta
    assert refusals._waiting == {}  # every block left its subjects behind


async def test_nested_waits_give_one_permission_denied() -> None:
    refusals = Refusals()

    entered = asyncio.Event()

    async def nested() -> None:
        with refusals.watching(("cy.control.acme.c.replay",)):
            with refusals.watching(("cy.control.acme.c.replay", "cy.events.acme.c.>")):
                entered.set()
                await asyncio.Event().wait()

    task = asyncio.ensure_future(nested())
    await entered.wait()
    refusals.saw(_refusal("cy.control.acme.c.replay"))
    with pytest.raises(PermissionDenied):
        await task
    assert task.cancelling() == 0  # no cancellation left pending on the task


def test_recent_remembers_only_recent_refusals() -> None:
    now = [100.0]
    refusals = Refusals(clock=lambda: now[0])
    refusals.saw(NatsError("nats: stale connection"))
    assert refusals.recent() is None
    refusals.saw(_refusal("cy.submit.acme"))
    assert refusals.recent() is not None and "cy.submit.acme" in refusals.recent()
    now[0] += Refusals.RECENT_S + 1
    assert refusals.recent() is None
