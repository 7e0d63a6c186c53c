"""Bad input against running services (two routers, three workers and a tool worker, as
processes): every bad message gets a chain.rejected to its sender and a dead letter, good chains
sent in between complete, and no service stops. Tenant `ta` sends the bad input under chain ids
that tenant `tb` uses at the same time for good chains: a rejection of one tenant's chain never
touches the other's. The ledger checks both sides: rejected ones rejected once, accepted ones
done once, with their own answers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from typing import Any

import nats.errors
import pytest
from chaosharness import (
    TENANT,
    Ledger,
    Stack,
    diamond,
    expected_output,
    llm_chain,
    pairs,
    scale,
    tool_diamond,
    wait_all_ended,
)

from chainyard.contracts import encode

Key = tuple[str, str]


def good_json(cid: str) -> dict[str, Any]:
    return json.loads(encode(llm_chain(cid)))


def mutated(cid: str, fn: Any) -> bytes:
    raw = good_json(cid)
    fn(raw)
    return json.dumps(raw).encode()


def _set(path: list[Any], value: Any) -> Any:
    def apply(raw: dict[str, Any]) -> None:
        node: Any = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return apply


# kind -> list of (chain id, payload) that must be rejected
CASES: dict[str, list[tuple[str, bytes]]] = {
    "malformed_json": [
        ("mj-0", b'{"id": "mj-0",, "steps": []}'),
        ("mj-1", b'{"id": "mj-1", "steps": ['),
        ("mj-2", b"not json at all"),
        ("mj-3", b""),
        ("mj-4", b"\xff\xfe\x00garbage"),
    ],
    "wrong_types": [
        ("wt-0", mutated("wt-0", _set(["priority"], "high"))),
        ("wt-1", mutated("wt-1", _set(["steps"], {"a": 1}))),
        ("wt-2", mutated("wt-2", _set(["budget_usd"], "a lot"))),
        ("wt-3", mutated("wt-3", _set(["steps", 0, "messages"], "hi"))),
        ("wt-4", b"[1, 2, 3]"),
    ],
    "unknown_fields": [
        ("uf-0", mutated("uf-0", _set(["budget_usb"], 1.0))),
        ("uf-1", mutated("uf-1", _set(["steps", 1, "colour"], "red"))),
        ("uf-2", mutated("uf-2", _set(["steps", 0, "params", "tempreature"], 1))),
    ],
    "unknown_pool_tool": [
        ("up-0", mutated("up-0", _set(["steps", 0, "model"], "gpt-none"))),
        (
            "up-1",
            json.dumps(
                {"id": "up-1", "steps": [{"kind": "tool", "id": "t", "tool": "teleport"}]}
            ).encode(),
        ),
        ("up-2", mutated("up-2", _set(["steps", 0, "kind"], "quantum"))),
    ],
    "cycles": [
        ("cy-0", mutated("cy-0", _set(["steps", 0, "after"], ["b"]))),
        ("cy-1", mutated("cy-1", _set(["steps", 0, "after"], ["a"]))),
        (
            "cy-2",
            mutated(
                "cy-2",
                _set(["steps", 0, "messages"], [{"role": "user", "content": "{{steps.b.output}}"}]),
            ),
        ),
        ("cy-3", mutated("cy-3", _set(["steps", 1, "id"], "a"))),  # duplicate ids
    ],
}


OTHER = "tb"  # the tenant that uses the same ids for good chains


async def _run_case(
    s: Stack, bad: list[tuple[str, bytes]], goods: int, prefix: str
) -> tuple[set[Key], set[Key]]:
    """Send bad chains (tenant ta) and good ones interleaved, among them tb's under the bad
    ones' ids; returns (accepted, expected rejected)."""
    js = s.bus.js
    rejected: set[Key] = set()
    for i, (cid, data) in enumerate(bad):
        # The message id names a rejection when the bytes hold no readable chain id.
        await js.publish(s.topology.subjects.submit(TENANT), data, headers={"Nats-Msg-Id": cid})
        rejected.add((TENANT, cid))
        await s.load.submit(diamond(OTHER, cid), OTHER)
        if i < goods:
            await s.load.run(pairs(f"{prefix}-good-{i}", 1))
    await s.load.run(pairs(f"{prefix}-tool", 1, tool_diamond))
    return s.load.accepted, rejected


async def _services(s: Stack) -> None:
    await s.deploy(tools=1)


@pytest.mark.parametrize("kind", list(CASES))
async def test_bad_input(stack: Stack, ledger: Ledger, kind: str) -> None:
    s = stack
    await _services(s)
    accepted, rejected = await _run_case(s, CASES[kind], 3, kind)
    await wait_all_ended(s.bus.js, accepted | rejected, 60, or_rejected=rejected)
    s.procs.assert_alive()
    await s.audit(ledger, expected_rejected=rejected, name=f"bad_input[{kind}]")


async def test_bad_input_oversized(stack: Stack, ledger: Ledger) -> None:
    """Past max_payload the client gets an error and keeps its connection; a chain just under
    it (which no assignment or state can carry) must still end with an answer to its sender."""
    s = stack
    await _services(s)
    js = s.bus.js
    limit = s.bus.nc.max_payload
    big = mutated("big-0", _set(["steps", 0, "messages", 0, "content"], "x" * (limit + 10)))
    with pytest.raises(nats.errors.MaxPayloadError):
        await js.publish(s.topology.subjects.submit(TENANT), big, headers={"Nats-Msg-Id": "big-0"})
    assert s.bus.nc.is_connected
    near = mutated("big-1", _set(["steps", 0, "messages", 0, "content"], "x" * (limit - 2000)))
    assert len(near) < limit
    await js.publish(s.topology.subjects.submit(TENANT), near, headers={"Nats-Msg-Id": "big-1"})
    await s.load.submit(diamond(OTHER, "big-1"), OTHER)
    await s.load.run(pairs("big-good", 3))
    missing = await wait_all_ended(
        s.bus.js,
        s.load.accepted | {(TENANT, "big-1")},
        30,
        or_rejected={(TENANT, "big-1")},
    )
    s.procs.assert_alive()
    # Rejected or failed, either is an answer; silence is a lost chain.
    accepted = set(s.load.accepted)
    expected_rejected = {(TENANT, "big-1")}
    if (TENANT, "big-1") not in missing:
        snap_events = await js.stream_info(
            s.topology.events.name, subjects_filter=f"cy.events.{TENANT}.big-1.chain.rejected"
        )
        if not snap_events.state.subjects:
            accepted.add((TENANT, "big-1"))
            expected_rejected = set()
    await ledger.audit(
        s.bus,
        accepted,
        expected_rejected=expected_rejected,
        expect=None,
        outputs=s.load.outputs,
        name="bad_input[oversized]",
    )


async def _raw_publish(port: int, subject: str, headers: bytes, payload: bytes) -> None:
    """HPUB over a raw socket, so header bytes can be anything (not valid UTF-8)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        await r.readline()  # INFO
        w.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        hdr = b"NATS/1.0\r\n" + headers + b"\r\n"
        w.write(b"HPUB %s %d %d\r\n" % (subject.encode(), len(hdr), len(hdr) + len(payload)))
        w.write(hdr + payload + b"\r\nPING\r\n")
        await w.drain()
        while True:
            line = await asyncio.wait_for(r.readline(), 10)
            assert not line.startswith(b"-ERR"), line
            if line.startswith(b"PONG"):
                return
    finally:
        w.close()


async def test_bad_input_invalid_utf8_headers(stack: Stack, ledger: Ledger) -> None:
    s = stack
    await _services(s)
    subject = s.topology.subjects.submit(TENANT)
    port = s.server.port
    # a good chain with a junk header: accepted and run
    good = diamond(TENANT, "u8-good")
    await _raw_publish(
        port, subject, b"Nats-Msg-Id: u8-good\r\nX-Junk: \xff\xfe\xc3\x28\r\n", encode(good)
    )
    # bad JSON with a junk header: rejected under its message id
    await _raw_publish(port, subject, b"Nats-Msg-Id: u8-bad\r\nX-Junk: \xc3\x28\r\n", b"{nope")
    # a message id that is not UTF-8: rejected under a fresh id
    await _raw_publish(port, subject, b"Nats-Msg-Id: \xff\xfe\r\n", b"{nope")
    accepted = {(TENANT, "u8-good")}
    outputs = {(TENANT, "u8-good"): expected_output(good) or ""}
    await s.load.run([(OTHER, diamond(OTHER, cid)) for cid in ("u8-good", "u8-bad")])
    await s.load.run(pairs("u8-after", 3))
    accepted |= s.load.accepted
    outputs |= s.load.outputs
    await wait_all_ended(
        s.bus.js, accepted | {(TENANT, "u8-bad")}, 60, or_rejected={(TENANT, "u8-bad")}
    )
    s.procs.assert_alive()
    info = await s.bus.js.stream_info(
        s.topology.events.name, subjects_filter=f"cy.events.{TENANT}.*.chain.rejected"
    )
    names = {k.split(".")[3] for k in (info.state.subjects or {})}
    fresh = {n for n in names if n.startswith("rejected-")}
    assert "u8-bad" in names
    expected = {(TENANT, "u8-bad")} | {(TENANT, n) for n in fresh}
    await ledger.audit(
        s.bus,
        accepted,
        expected_rejected=expected,
        outputs=outputs,
        name="bad_input[invalid_utf8_headers]",
        notes={"fresh_id_rejections": len(fresh)},
    )


def fuzz_case(r: random.Random, i: int) -> bytes:
    """One generated input: a good chain with a few random mutations (never its id)."""
    raw = good_json(f"fz-{i}")
    values: list[Any] = [
        None,
        True,
        -1,
        0,
        2**70,
        1e308,
        "",
        "x" * r.randint(1, 300),
        "ü∂\u202e\x00",
        [],
        {},
        [1, "a"],
        {"k": [None]},
        "{{steps.zz.output}}",
        "{{steps.a.output}}",
    ]
    fields = [
        "steps",
        "output",
        "budget_usd",
        "deadline_ms",
        "priority",
        "metadata",
        "v",
        "kind",
        "model",
        "messages",
        "params",
        "route",
        "after",
        "when",
        "tool",
        "args",
        "role",
        "content",
        "max_tokens",
        "temperature",
        "loop",
        "zzz",
    ]
    for _ in range(r.randint(1, 4)):
        node: Any = raw
        # walk a random path into the chain
        for _ in range(r.randint(0, 4)):
            if isinstance(node, dict) and node:
                k = r.choice(sorted(node))
                if k == "id" or not isinstance(node[k], dict | list):
                    break
                node = node[k]
            elif isinstance(node, list) and node:
                nxt = r.choice(node)
                if not isinstance(nxt, dict | list):
                    break
                node = nxt
        op = r.random()
        if isinstance(node, dict):
            keys = [k for k in node if k != "id"]
            if op < 0.4 and keys:
                node[r.choice(keys)] = copy.deepcopy(r.choice(values))
            elif op < 0.7 and keys:
                del node[r.choice(keys)]
            else:
                node[r.choice(fields)] = copy.deepcopy(r.choice(values))
        elif isinstance(node, list):
            if op < 0.5 and node:
                node.pop(r.randrange(len(node)))
            else:
                node.append(copy.deepcopy(r.choice(values)))
    data = json.dumps(raw).encode()
    if r.random() < 0.1:  # byte-level damage
        b = bytearray(data)
        for _ in range(r.randint(1, 5)):
            b[r.randrange(len(b))] = r.randrange(256)
        data = bytes(b)
    return data


async def test_bad_input_fuzz(stack: Stack, ledger: Ledger) -> None:
    """Seeded generated inputs: each gets exactly one answer (rejected, or run to an end), the
    services stay up, and good chains keep completing."""
    s = stack
    await _services(s)
    r = random.Random(7)
    n = scale(300, 120)
    sent: set[Key] = set()
    for i in range(n):
        await s.bus.js.publish(
            s.topology.subjects.submit(TENANT), fuzz_case(r, i), headers={"Nats-Msg-Id": f"fz-{i}"}
        )
        sent.add((TENANT, f"fz-{i}"))
    # tb uses the first fuzzed ids for good chains, and both tenants send a few more
    await s.load.run([(OTHER, diamond(OTHER, f"fz-{i}")) for i in range(scale(20, 10))])
    await s.load.run(pairs("fz-good", 5))
    await wait_all_ended(s.bus.js, sent | s.load.accepted, 120, or_rejected=sent)
    s.procs.assert_alive()
    # which were accepted: those with state; the others must have been rejected
    from chainyard.ledger import collect

    snap = await collect(s.bus.js, s.topology)
    accepted = {k for k in sent if k in snap.states} | s.load.accepted
    rejected = sent - accepted
    await ledger.audit(
        s.bus,
        accepted,
        expected_rejected=rejected,
        expect=None,
        outputs=s.load.outputs,
        name="bad_input[fuzz]",
        notes={
            "inputs": n,
            "accepted": len(accepted) - len(s.load.accepted),
            "rejected": len(rejected),
        },
    )
