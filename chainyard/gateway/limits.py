"""Per-key limits shared by every gateway replica: requests per minute, tokens per minute, and
spend per UTC day, counted in the KV bucket `cy_limits` (docs/DESIGN-NOTES.md, "Gateway limits").

One counter per key and limit (`<key_id>.rpm`, `.tpm`, `.usd`) holds its window (the minute or
the UTC day since the epoch) and the amount used in it. Writes are compare-and-set on the
entry's revision (`kv.update(last=...)`), so replicas never lose each other's counts; a watch on
the bucket keeps every replica's view of the counters current, so checks read memory.

- rpm: a request takes one from the minute's allowance. A replica takes a small lease
  (1/16 of what is left, at most 32) in one write and hands it out locally, so a busy key costs
  one KV write per lease, not per request; close to the limit the leases shrink to 1, so the
  sum admitted never exceeds the limit. A lease dies with its minute. Its unused part is the
  tolerance: another replica may refuse early by what a quiet replica still holds.
- tpm and spend: `settle` adds the tokens and cost the request used when it ends (the gateway
  runs it after the answer is sent, `Gateway.settle`; a chain two requests may share, an
  Idempotency-Key's, is counted once: the counter keeps the latest such ids); `admit`
  refuses while the window is used up (tpm: also when the request's estimate would not fit in
  what is left, unless nothing was used yet, so that one large request is never refused for
  ever). Requests in flight are not counted until they settle.

Refused -> the seconds until the window that refused frees (the next minute, or the next UTC
midnight), the `retry-after` to send. Windows follow each replica's clock (keep them in NTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from chainyard.contracts import Topology
from chainyard.gateway.keys import Grant
from chainyard.runtime.kv_view import KvView
from chainyard.runtime.nats import JS_TIMEOUT_S, ensure_kv, retry_api, while_no_leader

log = logging.getLogger("chainyard.gateway.limits")

MINUTE_S = 60.0
DAY_S = 86400.0  # Unix time has no leap seconds: epoch days are UTC days
LEASE_SHARE = 16  # a replica leases 1/16 of what is left in the minute...
LEASE_MAX = 32  # ...and at most this many requests at once
COUNTED_KEEP = 32  # chains of a given id a counter remembers having counted (the latest)


class Counter(msgspec.Struct, frozen=True, kw_only=True):
    """`used` in `window` (minutes or days since the epoch, per the counter's limit); `chains`:
    the latest chains of a given id (an Idempotency-Key's) counted in it, each counted once."""

    window: int
    used: float = 0.0
    chains: tuple[str, ...] = ()


_counter_decoder = msgspec.json.Decoder(Counter)


class Limits(KvView):
    """`admit` before a request, `settle` after it; one per gateway process."""

    def __init__(
        self, kv: KeyValue, clock: Callable[[], float] = time.time, bucket: str = "cy_limits"
    ) -> None:
        super().__init__(kv, bucket, self._apply)
        self.clock = clock  # wall time: windows are UTC minutes and days, the same on replicas
        self._seen: dict[str, tuple[Counter | None, int]] = {}  # KV key -> (counter, revision)
        self._leases: dict[str, tuple[int, int]] = {}  # key id -> (minute, requests left)
        self._locks: dict[str, asyncio.Lock] = {}  # KV key -> one writer in this process
        self.lease_max = LEASE_MAX  # 1: a KV write per request (bench.gateway_http compares)

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        topology: Topology | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> Limits:
        """The counters as they are, then followed; returns once they are loaded."""
        topology = topology or Topology()
        kv = await retry_api(lambda: ensure_kv(js, topology.limits_kv, topology.replicas))
        return await cls(kv, clock, topology.limits_kv.bucket).start()

    def _apply(self, entry: KeyValue.Entry) -> None:
        gone = entry.operation in (KV_DEL, KV_PURGE) or not entry.value
        try:
            counter = None if gone else _counter_decoder.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("limit counter %s is not a counter; it will be rewritten", entry.key)
            counter = None
        self._remember(entry.key, counter, entry.revision or 0)

    def _remember(self, key: str, counter: Counter | None, revision: int) -> None:
        """Keep the newest of what the watch delivers and what this process wrote."""
        if revision >= self._seen.get(key, (None, 0))[1]:
            self._seen[key] = (counter, revision)

    def _used(self, key: str, window: int) -> float:
        counter = self._seen.get(key, (None, 0))[0]
        return counter.used if counter is not None and counter.window == window else 0.0

    async def admit(self, grant: Grant, *, tokens_estimate: int) -> float | None:
        """None: go ahead. A float: refused; retry after that many seconds."""
        now = self.clock()
        minute, day = int(now // MINUTE_S), int(now // DAY_S)
        if grant.spend_usd_per_day is not None:
            if self._used(f"{grant.key_id}.usd", day) >= grant.spend_usd_per_day:
                return (day + 1) * DAY_S - now
        if grant.tpm is not None:
            used = self._used(f"{grant.key_id}.tpm", minute)
            if used >= grant.tpm or (used > 0 and used + tokens_estimate > grant.tpm):
                return (minute + 1) * MINUTE_S - now
        if grant.rpm is not None and not await self._take_request(grant.key_id, grant.rpm, minute):
            return (minute + 1) * MINUTE_S - now
        return None

    async def _take_request(self, key_id: str, rpm: int, minute: int) -> bool:
        if self._from_lease(key_id, minute):
            return True
        key = f"{key_id}.rpm"
        async with self._locks.setdefault(key, asyncio.Lock()):
            if self._from_lease(key_id, minute):  # topped up while this one waited
                return True

            def lease(used: float) -> float:
                left = rpm - used
                return 0 if left <= 0 else max(1, min(self.lease_max, int(left // LEASE_SHARE)))

            took = await self._add(key, minute, lease)
            if took == 0:
                return False
            self._leases[key_id] = (minute, int(took) - 1)
            return True

    def _from_lease(self, key_id: str, minute: int) -> bool:
        at, left = self._leases.get(key_id, (minute, 0))
        if at != minute or left <= 0:
            return False
        self._leases[key_id] = (minute, left - 1)
        return True

    async def _add(
        self, key: str, window: int, amount: Callable[[float], float], chain_id: str | None = None
    ) -> float:
        """Add `amount(used so far)` to the counter by compare-and-set: what was added (0: no
        write; nor for a `chain_id` the window counted already). A lost race reads the
        counter again and retries."""
        counter, revision = self._seen.get(key, (None, 0))
        while True:
            now = counter if counter is not None and counter.window == window else None
            used, chains = (now.used, now.chains) if now is not None else (0.0, ())
            add = 0 if chain_id in chains else amount(used)
            if add == 0:
                return 0
            if chain_id is not None:
                chains = (*chains, chain_id)[-COUNTED_KEEP:]
            new = Counter(window=window, used=used + add, chains=chains)
            try:
                revision = await self._write(key, new, revision)
            except KeyWrongLastSequenceError:
                counter, revision = await self._read(key)
                continue
            self._remember(key, new, revision)
            return add

    async def _write(self, key: str, counter: Counter, last: int) -> int:
        """`counter` at `key` if its revision is still `last`: the new revision. A bucket
        electing a leader answers 503: that is waited out, as the services' writes do."""
        value = msgspec.json.encode(counter)
        return await while_no_leader(
            lambda _left: self.kv.update(key, value, last=last), JS_TIMEOUT_S
        )

    async def _read(self, key: str) -> tuple[Counter | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyDeletedError as e:  # a tombstone: write after its revision
            return None, e.entry.revision if e.entry is not None else 0
        except KeyNotFoundError:
            return None, 0
        try:
            counter = _counter_decoder.decode(entry.value) if entry.value else None
        except msgspec.DecodeError:
            counter = None
        self._remember(key, counter, entry.revision or 0)
        return counter, entry.revision or 0

    def settles(self, grant: Grant) -> bool:
        return grant.tpm is not None or grant.spend_usd_per_day is not None

    async def settle(
        self, grant: Grant, *, tokens: int, cost_usd: float, chain_id: str | None = None
    ) -> None:
        """Count what a finished request used against its key's tpm and daily spend; with a
        `chain_id` (a chain two requests may share: an Idempotency-Key's), once per chain."""
        now = self.clock()
        for key, limited, window, amount in (
            (f"{grant.key_id}.tpm", grant.tpm, int(now // MINUTE_S), float(tokens)),
            (f"{grant.key_id}.usd", grant.spend_usd_per_day, int(now // DAY_S), cost_usd),
        ):
            if limited is not None and amount > 0:
                async with self._locks.setdefault(key, asyncio.Lock()):
                    await self._add(key, window, lambda _used, a=amount: a, chain_id)
