"""The chainyard path in one process: intake publish -> Router -> Worker(NullProvider) -> event.

Completion is the `chain.completed` event, seen by a core subscription made before the first
publish; `chain.failed` and `chain.rejected` end a key too, as a failure the driver reports.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from chainyard.contracts import Chain, Config, Deployment, LlmStep, Message, encode
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus
from chainyard.workers.llm import llm_executor
from chainyard.workers.providers.null import NullProvider
from chainyard.workers.runtime import Worker

from .drive import Completions

TENANT = "bench"
POOL = "null"
MODEL = "m"


def one_step_chain(key: str) -> Chain:
    return Chain(
        id=key,
        steps=[LlmStep(id="s", model=MODEL, messages=[Message(role="user", content="hi")])],
    )


@dataclass
class ChainyardPath:
    """Router and Worker as asyncio tasks on `bus`, stopped by one event and awaited."""

    bus: Bus
    completions: Completions
    worker_slots: int
    router_concurrency: int
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sub: Subscription | None = None
    router: Router | None = None
    worker: Worker | None = None

    async def start(self) -> None:
        config = Config(
            deployments=[Deployment(name="null-a", pool=POOL, model=MODEL, provider="null")]
        )
        self.router = Router(self.bus, config, concurrency=self.router_concurrency)
        self.worker = Worker(
            self.bus,
            POOL,
            llm_executor(NullProvider(), lambda t, u: 0.0),
            slots=self.worker_slots,
        )
        subjects = self.bus.subjects
        pattern = f"{subjects.prefix}.events.{TENANT}.*.chain.*"
        offset = len(f"{subjects.prefix}.events.{TENANT}.")

        async def on_chain_event(msg: Msg) -> None:
            key, _, kind = msg.subject[offset:].partition(".chain.")
            self.completions.done(key, None if kind == "completed" else kind)

        self._sub = await self.bus.nc.subscribe(pattern, cb=on_chain_event)
        await self.bus.nc.flush()
        self._tasks = [
            asyncio.create_task(self.router.run(self._stop), name="bench-router"),
            asyncio.create_task(self.worker.run(self._stop), name="bench-worker"),
        ]

    async def submit(self, key: str) -> None:
        await self.bus.js.publish(
            self.bus.subjects.submit(TENANT),
            encode(one_step_chain(key)),
            headers={"Nats-Msg-Id": key},
        )

    def check_alive(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise RuntimeError(f"{t.get_name()} died") from t.exception()

    async def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(BaseException):
                    await t
            if pending:
                raise RuntimeError(
                    f"did not stop within {timeout_s} s: {[t.get_name() for t in pending]}"
                )
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise RuntimeError(f"{t.get_name()} failed") from t.exception()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
