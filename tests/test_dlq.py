"""`chainyard dlq` as an operator runs it (a separate process, `--nats URL`) against a real server:
dead letters made the real way (bad submissions rejected by a running router) or written to
`cy.dlq.work` as a worker writes a poison step; list, show, filters, redrive, purge, errors."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import python_env, running, stream_messages, stream_messages_eventually
from nats.aio.msg import Msg

from chainyard.contracts import (
    Assignment,
    Config,
    Deployment,
    LlmStep,
    Message,
    Target,
    encode,
)
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus
from chainyard.runtime.server import NatsServer

CONFIG = Config(deployments=[Deployment(name="null-a", pool="null", model="m", provider="null")])
# A well-formed chain for a model nobody deploys: the router rejects it, the DLQ keeps it.
HI = [{"role": "user", "content": "hi"}]
UNKNOWN_MODEL = json.dumps(
    {"id": "acme-bad", "steps": [{"kind": "llm", "id": "a", "model": "gpt-nope", "messages": HI}]}
).encode()
TRUNCATED = b'{"id": "gx-1", "steps": ['


async def dlq(url: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """`chainyard dlq ARGS --nats URL`: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "dlq", *args, "--nats", url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=python_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.fixture
async def router(bus: Bus) -> AsyncIterator[None]:
    async with running(Router(bus, CONFIG)):
        yield


async def intake_dead(bus: Bus, tenant: str, data: bytes, count: int) -> list[Msg]:
    """Submit `data` as `tenant` and wait for the router to dead-letter it (the count'th)."""
    await bus.js.publish(bus.subjects.submit(tenant), data)
    return await stream_messages_eventually(
        bus.js, bus.topology.dlq.name, bus.subjects.dlq_subject("intake"), count
    )


def assignment(tenant: str, chain: str) -> Assignment:
    return Assignment(
        chain_id=chain,
        step_id="a",
        attempt=5,
        tenant=tenant,
        step=LlmStep(id="a", model="m", messages=[Message(role="user", content="hi")]),
        target=Target(deployment="null-a", pool="null", provider="null", model="m"),
        dispatched_at_ms=1,
    )


async def work_dead(bus: Bus, tenant: str, chain: str) -> int:
    """A poison step's dead letter, as a worker writes it; returns its CY_DLQ sequence."""
    h = {
        "Cy-Reason": "max deliveries (5) reached: the worker died on it every time",
        "Cy-Subject": bus.subjects.work("null"),
        "Cy-Tenant": tenant,
        "Cy-Chain": chain,
        "Cy-Step": "a",
    }
    payload = encode(assignment(tenant, chain))
    ack = await bus.js.publish(bus.subjects.dlq_subject("work"), payload, headers=h)
    return ack.seq


def seqs(msgs: list[Msg]) -> list[int]:
    return [m.metadata.sequence.stream for m in msgs]


async def dlq_seqs(bus: Bus) -> list[int]:
    return seqs(await stream_messages(bus.js, bus.topology.dlq.name, bus.subjects.dlq))


async def test_list_show_and_filters(nats_server: NatsServer, bus: Bus, router: None) -> None:
    url = nats_server.url
    (acme_intake,) = seqs(await intake_dead(bus, "acme", UNKNOWN_MODEL, 1))
    gx_intake = seqs(await intake_dead(bus, "globex", TRUNCATED, 2))[1]
    acme_work = await work_dead(bus, "acme", "acme-run")

    rc, out, err = await dlq(url, "list")
    assert rc == 0, err
    head, *rows = out.splitlines()
    assert head.split() == ["seq", "time", "(UTC)", "source", "tenant", "chain", "reason"]
    cells = [r.split(None, 5) for r in rows]
    assert [(int(c[0]), c[2], c[3], c[4]) for c in cells] == [
        (acme_intake, "intake", "acme", "acme-bad"),  # chain from the payload's id
        (gx_intake, "intake", "globex", "-"),  # unparseable: no chain to name
        (acme_work, "work", "acme", "acme-run"),  # chain from Cy-Chain
    ]
    assert "gpt-nope" in cells[0][5] and "truncated" in cells[1][5]

    rc, out, _ = await dlq(url, "list", "--tenant", "acme")
    assert [int(r.split()[0]) for r in out.splitlines()[1:]] == [acme_intake, acme_work]
    rc, out, _ = await dlq(url, "list", "--tenant", "acme", "--source", "intake", "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert (row["seq"], row["subject"], row["chain"]) == (acme_intake, "cy.submit.acme", "acme-bad")
    assert "gpt-nope" in row["reason"] and row["size"] == len(UNKNOWN_MODEL)
    rc, out, err = await dlq(url, "list", "--limit", "1")
    assert [int(r.split()[0]) for r in out.splitlines()[1:]] == [acme_work]  # the newest
    assert "the newest 1 of 3" in err
    rc, out, err = await dlq(url, "list", "--tenant", "initech")
    assert rc == 0 and out == "" and "no dead letters (tenant initech)" in err

    rc, out, err = await dlq(url, "show", str(acme_intake))
    assert rc == 0, err
    assert "subject:  cy.submit.acme" in out and "tenant:   acme" in out
    assert "Cy-Subject: cy.submit.acme" in out and "Cy-Reason:" in out
    assert "payload:  JSON, " in out and '\n  "id": "acme-bad",\n' in out  # pretty-printed

    rc, out, err = await dlq(url, "show", str(acme_work), "--json")
    shown: dict[str, Any] = json.loads(out)
    assert shown["headers"]["Cy-Step"] == "a" and shown["step"] == "a"
    assert shown["payload"]["chain_id"] == "acme-run" and shown["source"] == "work"


async def test_show_never_lets_bytes_drive_the_terminal(nats_server: NatsServer, bus: Bus) -> None:
    nasty = b"\x1b[2J\x1b]0;owned\x07text\xff\x00"
    ack = await bus.js.publish(
        bus.subjects.dlq_subject("events"), nasty, headers={"Cy-Reason": "bad\x1b[31m event"}
    )
    rc, out, err = await dlq(nats_server.url, "show", str(ack.seq))
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\x00" not in out
    assert f"not UTF-8, {len(nasty)} bytes, escaped" in out and "\\x1b[2J" in out and "\\xff" in out
    rc, out, _ = await dlq(nats_server.url, "show", str(ack.seq), "--json")
    assert bytes.fromhex(json.loads(out)["payload_hex"]) == nasty
    rc, out, _ = await dlq(nats_server.url, "list")
    assert "\x1b" not in out and "bad\\x1b[31m event" in out


async def test_redrive_puts_the_original_back_and_deletes_the_dead_letter(
    nats_server: NatsServer, bus: Bus, router: None
) -> None:
    url = nats_server.url
    (intake,) = seqs(await intake_dead(bus, "acme", UNKNOWN_MODEL, 1))
    work = await work_dead(bus, "acme", "acme-run")
    seen: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_submit(m: Msg) -> None:
        await seen.put(m)

    sub = await bus.nc.subscribe(bus.subjects.submit("acme"), cb=on_submit)
    rc, out, err = await dlq(url, "redrive", str(intake), str(work))
    await sub.unsubscribe()
    assert rc == 0, err
    assert f"seq {intake}: redriven to cy.submit.acme (CY_INTAKE seq" in out
    assert f"seq {work}: redriven to cy.work.null (CY_WORK seq" in out

    again = await asyncio.wait_for(seen.get(), 10)
    assert again.data == UNKNOWN_MODEL
    assert not again.headers  # no Cy-* headers, no stale Nats-Msg-Id
    # No worker serves the pool here, so the redriven step waits in CY_WORK as it was.
    queued = await bus.js.get_last_msg(bus.topology.work.name, bus.subjects.work("null"))
    assert queued.data == encode(assignment("acme", "acme-run")) and not queued.headers

    # Both are gone from the DLQ; the intake one was a fresh submission, rejected again by the
    # router as a new dead letter of its own.
    for s in (intake, work):
        rc, _, err = await dlq(url, "show", str(s))
        one_line_error(rc, err, f"no dead letter with seq {s}")
    (fresh,) = await stream_messages_eventually(
        bus.js, bus.topology.dlq.name, bus.subjects.dlq_subject("intake"), 1
    )
    assert fresh.metadata.sequence.stream > work and fresh.data == UNKNOWN_MODEL


async def test_bulk_redrive_and_purge_ask_first(
    nats_server: NatsServer, bus: Bus, router: None
) -> None:
    url = nats_server.url
    await intake_dead(bus, "acme", UNKNOWN_MODEL, 1)
    await intake_dead(bus, "acme", TRUNCATED, 2)
    gx = seqs(await intake_dead(bus, "globex", TRUNCATED, 3))[2]
    acme_work = await work_dead(bus, "acme", "acme-run")
    before = await dlq_seqs(bus)

    rc, _, err = await dlq(url, "purge", "--tenant", "acme", "--source", "intake", stdin=b"n\n")
    assert rc == 1 and "purge 2 dead letters (tenant acme, source intake)? [y/N]" in err
    assert "not confirmed: nothing done" in err
    assert await dlq_seqs(bus) == before
    rc, out, err = await dlq(url, "purge", "--tenant", "acme", "--source", "intake", stdin=b"y\n")
    assert rc == 0 and "purged 2 dead letters" in out, err
    assert await dlq_seqs(bus) == [gx, acme_work]

    rc, _, err = await dlq(url, "purge", "--tenant", "acme", "--source", "intake", "--yes")
    one_line_error(rc, err, "no dead letters match (tenant acme, source intake)")
    rc, _, err = await dlq(url, "purge", "--older-than", "7d", "--yes")
    one_line_error(rc, err, "no dead letters match (older-than 7d)")
    rc, _, err = await dlq(url, "redrive", "--all")  # EOF on stdin: not a yes
    assert rc == 1 and "not confirmed" in err

    rc, out, err = await dlq(url, "redrive", "--tenant", "globex", "--yes")
    assert rc == 0 and f"seq {gx}: redriven to cy.submit.globex" in out, err
    assert out.count("redriven") == 1  # globex's only: acme's work dead letter stays
    assert acme_work in await dlq_seqs(bus) and gx not in await dlq_seqs(bus)
    rc, out, err = await dlq(url, "purge", str(acme_work))  # explicit: no question
    assert rc == 0 and "purged 1 dead letters" in out, err
    # What is left is only the redriven globex chain, rejected again by the router.
    (left,) = await stream_messages_eventually(bus.js, bus.topology.dlq.name, bus.subjects.dlq, 1)
    assert left.headers is not None and left.headers["Cy-Tenant"] == "globex"
    assert left.metadata.sequence.stream > acme_work


async def test_unknown_sequences_and_bad_requests_are_one_line(
    nats_server: NatsServer, bus: Bus
) -> None:
    url = nats_server.url
    rc, out, err = await dlq(url, "list")
    assert rc == 0 and out == "" and "no dead letters (all)" in err
    for args in (("show", "42"), ("redrive", "42"), ("purge", "42")):
        rc, _, err = await dlq(url, *args)
        one_line_error(rc, err, "no dead letter with seq 42 in CY_DLQ")
    rc, _, err = await dlq(url, "redrive", "--tenant", "acme", "--yes")
    one_line_error(rc, err, "no dead letters match (tenant acme)")
    rc, _, err = await dlq(url, "purge")
    one_line_error(rc, err, "name what to purge")

    # One unknown among known sequences: nothing is done to the known ones either.
    known = await work_dead(bus, "acme", "acme-run")
    rc, _, err = await dlq(url, "purge", str(known), "999")
    one_line_error(rc, err, "no dead letter with seq 999")
    assert await dlq_seqs(bus) == [known]
    rc, _, err = await dlq(url, "purge", str(known), "--tenant", "acme")
    one_line_error(rc, err, "not both")

    # Without an original subject (a writer that did not record one) it stays where it is.
    ack = await bus.js.publish(
        bus.subjects.dlq_subject("work"), b"{}", headers={"Cy-Reason": "malformed"}
    )
    rc, _, err = await dlq(url, "redrive", str(ack.seq))
    one_line_error(rc, err, "no Cy-Subject")
    assert await dlq_seqs(bus) == [known, ack.seq]
    rc, _, err = await dlq(url, "list", "--since", "soon")
    assert rc == 2 and "not a duration" in err  # a usage error, argparse's exit code


async def test_a_server_without_the_dlq_or_no_server(nats_server: NatsServer) -> None:
    rc, _, err = await dlq(nats_server.url, "list")
    one_line_error(rc, err, "no stream CY_DLQ")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, err = await dlq(f"nats://operator:s3cret-pw@127.0.0.1:{port}", "list")
    one_line_error(rc, err, f"cannot reach NATS at nats://***@127.0.0.1:{port}")
    assert "s3cret-pw" not in out + err
