"""A worker process SIGKILLed mid-step: the step is redelivered to another worker process and
completed exactly once; the chain completes; no process is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from helpers import (
    Events,
    alive,
    chain_log,
    children_of,
    kill_all,
    running,
    wait_until,
)
from worker_support import start_worker_process, toml

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    LlmStep,
    Message,
    StepCompleted,
    encode,
    load_config,
    state_decoder,
)
from chainyard.router.engine import Router
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

TENANT = "acme"
POOL = "slow"
ACK_WAIT_S = 2.0  # a dead worker's step comes back after this long


def write_config(path: Path, sandbox_url: str) -> Path:
    one_pool = toml(sandbox_url, slots=4, ack_wait_s=ACK_WAIT_S, pool=POOL, deployment="d-slow")
    path.write_text("max_attempts = 1\n" + one_pool)
    return path


async def start_worker(url: str, config: Path, log: Path) -> asyncio.subprocess.Process:
    return await start_worker_process(url, config, log, pool=POOL)


async def test_sigkilled_worker_step_completes_exactly_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    procs: list[asyncio.subprocess.Process] = []
    async with SandboxServer(SandboxConfig(latency_ms=1500)) as sandbox:
        cfg_path = write_config(tmp_path / "chainyard.toml", sandbox.url)
        cfg = load_config(cfg_path)
        assert cfg.topology.pool_consumer(POOL).ack_wait_s == ACK_WAIT_S
        bus = await open_bus(nats_server.url, name="test", topology=cfg.topology)
        chain = Chain(
            id="survivor",
            steps=[
                LlmStep(id="one", model="m", messages=[Message(role="user", content="first step")]),
                LlmStep(
                    id="two",
                    model="m",
                    messages=[Message(role="user", content="after {{steps.one.output}}")],
                ),
            ],
        )
        try:
            async with (
                Events(bus.nc, bus.subjects.chain_events(TENANT, chain.id)) as ev,
                running(Router(bus, cfg)),
            ):
                first = await start_worker(nats_server.url, cfg_path, tmp_path / "worker1.log")
                procs.append(first)
                await bus.js.publish(
                    bus.subjects.submit(TENANT), encode(chain), headers={"Nats-Msg-Id": chain.id}
                )
                # the first worker is inside the provider call (the sandbox holds it for 1.5 s)
                await wait_until(
                    lambda: sandbox.counts["openai.chat"] >= 1, 30, "the first provider call"
                )
                assert ev.matching(lambda e: isinstance(e, StepCompleted)) == []
                first.send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL

                second = await start_worker(nats_server.url, cfg_path, tmp_path / "worker2.log")
                procs.append(second)
                ended = await ev.ended(chain.id, timeout=30)
                assert isinstance(ended, ChainCompleted), ended
                assert ended.output.text == "echo: after echo: first step"

                second.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(second.wait(), 15) == 0, (
                    tmp_path / "worker2.log"
                ).read_text()

            # the killed call was repeated once by the second worker; step two called once
            assert sandbox.counts["openai.chat"] == 3
            logged = await chain_log(bus.js, TENANT, chain.id)
            done = [e.step_id for e in logged if isinstance(e, StepCompleted)]
            assert sorted(done) == ["one", "two"], done
            assert [type(e).__name__ for e in logged].count("ChainCompleted") == 1
            state = state_decoder.decode((await bus.chains.get(f"{TENANT}.{chain.id}")).value)
            assert state.status == "completed"
            assert (state.steps["one"].status, state.steps["one"].attempt) == ("completed", 1)
            assert {s.step_id: s.attempts for s in ended.steps} == {"one": 1, "two": 1}
            # the completion came from the second worker process
            (one,) = [e for e in logged if isinstance(e, StepCompleted) and e.step_id == "one"]
            assert f"-{second.pid}-" in one.worker
        finally:
            await kill_all(procs)
            await bus.close()
    for p in procs:
        assert not alive(p.pid), f"worker pid {p.pid} left running"
    assert [c for c in children_of(os.getpid()) if c[1] != "nats-server"] == []
