"""The load sandbox (chainyard.sandbox.load): errors, latency, and answers in request order."""

from __future__ import annotations

import asyncio
import time

import msgspec

from chainyard.sandbox.load import LoadSandbox


async def _raw(port: int, payload: bytes, answers: int) -> list[bytes]:
    """Write `payload` (possibly several pipelined requests) and read `answers` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        writer.write(payload)
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            out.append(head.split(b" ", 2)[1] + b" " + await reader.readexactly(length))
    finally:
        writer.close()
    return out


def _post(path: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (path, len(body), body)


async def test_errors_in_openai_shape_and_pipelined_order() -> None:
    async with LoadSandbox() as s:
        answers = await _raw(
            s.port,
            _post(b"/v1/chat/completions", b'{"model":"m-a","messages":[]}')
            + _post(b"/v1/embeddings", b"{}")
            + _post(b"/v1/chat/completions", b"not json")
            + _post(b"/v1/chat/completions", b'{"model":"m-b"}'),
            4,
        )
    statuses = [a.split(b" ", 1)[0] for a in answers]
    assert statuses == [b"200", b"404", b"400", b"200"]
    bodies = [msgspec.json.decode(a.split(b" ", 1)[1]) for a in answers]
    assert [bodies[0]["model"], bodies[3]["model"]] == ["m-a", "m-b"]
    assert bodies[0]["id"] != bodies[3]["id"]
    assert bodies[1]["error"]["type"] == bodies[2]["error"]["type"] == "invalid_request_error"
    assert "model" in bodies[2]["error"]["message"]


async def test_latency_is_applied_and_order_kept() -> None:
    async with LoadSandbox(latency_ms=150) as s:
        t0 = time.perf_counter()
        answers = await _raw(s.port, _post(b"/v1/chat/completions", b'{"model":"a"}') * 3, 3)
        elapsed = time.perf_counter() - t0
    assert elapsed >= 0.15
    assert [a.split(b" ", 1)[0] for a in answers] == [b"200"] * 3
    ids = [msgspec.json.decode(a.split(b" ", 1)[1])["id"] for a in answers]
    assert ids == sorted(ids)  # answered in the order asked
