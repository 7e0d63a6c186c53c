"""LocalModel: a real llama.cpp server on SmolLM2-135M answers an OpenAI chat completion."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

from chainyard.sandbox import local_model
from chainyard.sandbox.local_model import LocalModel

pytestmark = [
    pytest.mark.localmodel,
    pytest.mark.skipif(
        not local_model.available(), reason=f"local model: {local_model.unavailable_reason()}"
    ),
]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _chat(lm: LocalModel, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=lm.base_url, timeout=120) as client:
        r = await client.post(
            "/chat/completions",
            json={
                "model": lm.model,
                "messages": [{"role": "user", "content": "Name three colours."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
    r.raise_for_status()
    return r.json()


async def test_chat_completion_and_clean_exit() -> None:
    async with LocalModel() as lm:
        assert lm.base_url.startswith("http://127.0.0.1:") and lm.base_url.endswith("/v1")
        assert lm.model == "smollm2"
        pid = lm.pid
        assert pid is not None
        t0 = time.perf_counter()
        answer = await _chat(lm, 16)
        took = time.perf_counter() - t0
        print(f"startup {lm.startup_s:.2f}s, 16-token answer {took:.2f}s")
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["usage"]["prompt_tokens"] > 0
    assert _gone(pid)


async def test_cancelled_caller_leaves_no_process() -> None:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def hold() -> None:
        async with LocalModel() as lm:
            assert lm.pid is not None
            started.set_result(lm.pid)
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await asyncio.wait({started, task}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what made the start fail
    pid = started.result()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pid)


async def test_missing_model_file_fails_fast(tmp_path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"not a gguf")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="exited"):
        async with LocalModel(bad, startup_timeout_s=60):
            pass
    assert time.perf_counter() - t0 < 60
