"""Circuit breakers per deployment, shared by every router replica through KV `cy_breakers`.

closed --(N consecutive failures, or M consecutive 429s)--> open until now + cooldown
open --(cooldown over)--> half-open: at most `probes` dispatches per replica go through
half-open --success--> closed;  --failure--> open again, cooldown doubled (capped)

A Retry-After from a provider cools its deployment down until then, without opening the breaker.
A failure counts once across replicas (its id is kept in the value until the next reset) and
only if it ended after the last success: a router that dies before acking lets another replica
see the same results again, late, and neither may push a healthy deployment open.
Every change is a compare-and-set on the key's revision; each router watches the bucket, so a
breaker opened by one replica is seen by all within a watch round trip. Picking reads only the
local copy (no I/O on the routing path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Literal

import msgspec
from msgspec import Struct
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chainyard.contracts import Config, StepCompleted, StepFailed, now_ms
from chainyard.runtime.kv_view import KvView
from chainyard.runtime.nats import retry_api

log = logging.getLogger("chainyard.router.breakers")
BreakerStatus = Literal["closed", "open", "half_open"]


class Breaker(Struct, frozen=True, kw_only=True):
    """The value under `<deployment>` in KV `cy_breakers`."""

    status: BreakerStatus = "closed"
    failures: int = 0  # consecutive failures (any retryable class)
    throttles: int = 0  # consecutive 429s
    open_until_ms: int = 0
    cooldown_s: float = 0.0
    cooled_until_ms: int = 0  # Retry-After: no dispatch before this
    reason: str = ""
    at_ms: int = 0
    reset_ms: int = 0  # when the call that last closed it ended: older failures prove nothing
    counted: tuple[str, ...] = ()  # failures counted since that reset (bounded; see MAX_COUNTED)


_decoder = msgspec.json.Decoder(Breaker)
CLOSED = Breaker()
MAX_COUNTED = 64  # ids kept per deployment: more than any breaker_failures/breaker_throttles


def result_id(ev: StepCompleted | StepFailed) -> str:
    return f"{ev.tenant}.{ev.chain_id}.{ev.step_id}.{ev.attempt}"


def ended_ms(ev: StepCompleted | StepFailed) -> int:
    """When the call ended (0 when the event does not say: then it is never too old)."""
    return int(ev.started_at_ms + ev.latency_ms) if ev.started_at_ms else 0


def next_state(b: Breaker, ev: StepCompleted | StepFailed, cfg: Config, t: int) -> Breaker | None:
    """The breaker after one result, or None when nothing changes (pure; unit-tested)."""
    if isinstance(ev, StepCompleted):
        if b.status == "closed" and b.failures == 0 and b.throttles == 0:
            return None
        if b.status == "open" and t < b.open_until_ms:
            return None  # a late success from before it opened proves nothing
        ended = ended_ms(ev)
        if ended and ended < b.reset_ms:
            return None  # an older success than the one that closed it
        return Breaker(at_ms=t, cooled_until_ms=b.cooled_until_ms, reset_ms=ended or t)
    err = ev.error
    if err.cls not in ("retryable", "timeout"):
        return None  # fatal, context_window, cancelled...: the deployment is not unhealthy
    rid = result_id(ev)
    ended = ended_ms(ev)
    if rid in b.counted or (ended and ended < b.reset_ms):
        return None  # counted already (by a replica), or ended before the last success
    counted = (*b.counted[-(MAX_COUNTED - 1) :], rid)
    throttled = err.status == 429
    failures = b.failures + 1
    throttles = b.throttles + 1 if throttled else 0
    cooled = b.cooled_until_ms
    if err.retry_after_s:
        cooled = max(cooled, t + int(err.retry_after_s * 1000))
    if b.status == "half_open" or (b.status == "open" and t >= b.open_until_ms):
        cooldown = min(max(b.cooldown_s, cfg.breaker_cooldown_s) * 2, cfg.breaker_max_cooldown_s)
        why = f"probe failed: {err.message}"
    elif failures >= cfg.breaker_failures or (throttled and throttles >= cfg.breaker_throttles):
        cooldown = cfg.breaker_cooldown_s
        why = (
            f"{throttles} consecutive 429s"
            if throttled and throttles >= cfg.breaker_throttles
            else (f"{failures} consecutive failures, last: {err.message}")
        )
    else:
        cooldown = None
    if cooldown is None or (b.status == "open" and t < b.open_until_ms):
        # not yet at the threshold, or already open: keep counting, keep the window
        return msgspec.structs.replace(
            b, failures=failures, throttles=throttles, cooled_until_ms=cooled, at_ms=t,
            counted=counted,
        )  # fmt: skip
    until = max(t + int(cooldown * 1000), cooled)
    return Breaker(
        status="open",
        failures=failures,
        throttles=throttles,
        open_until_ms=until,
        cooldown_s=cooldown,
        cooled_until_ms=cooled,
        reason=why,
        at_ms=t,
        reset_ms=b.reset_ms,
        counted=counted,
    )


class Breakers:
    def __init__(self, kv: KeyValue, config: Config) -> None:
        self.kv = kv
        self.config = config
        self.local: dict[str, Breaker] = {}
        self._probes: dict[tuple[str, int], int] = {}  # (deployment, open_until) -> probes sent
        # results counted: (tenant, chain, step, attempt); two tenants' ids never collide
        self._seen: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recording: Counter[str] = Counter()  # deployment -> records in flight
        self._view: KvView | None = None  # the bucket followed: every replica's changes
        self.on_change: Callable[[], None] | None = None

    # -- reading (sync, on the routing path) ------------------------------------------------

    def allows(self, deployment: str, t: int) -> bool:
        b = self.local.get(deployment)
        if b is None or b.status == "closed":
            return b is None or t >= b.cooled_until_ms
        if t < b.open_until_ms or t < b.cooled_until_ms:
            return False
        return self._probes.get((deployment, b.open_until_ms), 0) < self.config.breaker_probes

    def note_dispatch(self, deployment: str) -> None:
        """Count a probe when the deployment is half-open (its cooldown is over)."""
        b = self.local.get(deployment)
        if b is not None and b.status != "closed":
            key = (deployment, b.open_until_ms)
            self._probes[key] = self._probes.get(key, 0) + 1

    def status(self, deployment: str) -> Breaker:
        return self.local.get(deployment, CLOSED)

    # -- recording (async, CAS) -------------------------------------------------------------

    def observe(self, ev: StepCompleted | StepFailed) -> None:
        """Record a result in the background; a result is counted once per router."""
        key = (ev.tenant, ev.chain_id, ev.step_id, ev.attempt)
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > 50_000:
            self._seen.popitem(last=False)
        name = ev.target.deployment
        b = self.local.get(name, CLOSED)
        if next_state(b, ev, self.config, now_ms()) is None and not self._recording[name]:
            # nothing to change: no KV traffic on the happy path (unless a failure is being
            # recorded: this success may have to reset what that record is about to count)
            return
        self._recording[name] += 1
        t = asyncio.get_running_loop().create_task(self.record(ev))
        self._tasks.add(t)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._recording[name] -= 1

        t.add_done_callback(done)

    async def record(self, ev: StepCompleted | StepFailed) -> None:
        name = ev.target.deployment
        for _ in range(10):
            try:
                entry = await self.kv.get(name)
                b, rev = (
                    (_decoder.decode(entry.value), entry.revision)
                    if entry.value
                    else (CLOSED, entry.revision)
                )
            except KeyNotFoundError:
                b, rev = CLOSED, None
            new = next_state(b, ev, self.config, now_ms())
            if new is None:
                self._set(name, b)
                return
            try:
                if rev is None:
                    await self.kv.create(name, msgspec.json.encode(new))
                else:
                    await self.kv.update(name, msgspec.json.encode(new), last=rev)
            except KeyWrongLastSequenceError:
                continue  # another replica changed it: read again
            except Exception as e:
                log.warning("breaker %s: could not record: %s", name, e)
                return
            if new.status == "open" and b.status != "open":
                log.warning("breaker %s open for %.1f s: %s", name, new.cooldown_s, new.reason)
            self._set(name, new)
            return

    def _set(self, name: str, b: Breaker) -> None:
        old = self.local.get(name)
        if old is not None and old.at_ms > b.at_ms:
            return  # a newer one came through the watch already
        self.local[name] = b
        if self.on_change is not None:
            self.on_change()

    # -- watching ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._view = await retry_api(KvView(self.kv, "breakers", apply=self._entry).start)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._view is not None:
            await self._view.stop()

    def _entry(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.local.pop(entry.key, None)
            return
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            self._set(entry.key, _decoder.decode(entry.value))
