"""Chain state in KV, read through a small cache of this router's own writes.

Every write is a compare-and-set on the revision the decision was made from. The cache saves
the read on the hot path (one KV round trip of seven per step); when another router replica
wrote in between, the compare-and-set fails, the entry is dropped, and the next read goes to KV.
A cached or follower-served copy can be behind another replica's write, so a decision to write
nothing is only final on a `fresh` read: the key's last message, served by the stream leader
(router/engine.py `_apply`). Writes are nats-py's KV create / update (a publish to the key's
subject with `Nats-Expected-Last-Subject-Sequence`), sent again while the bucket's stream has no
leader (runtime/nats.py `while_no_leader`). The write that ends a chain carries a TTL
(`ended_ttl_s`, from the config's `ended_chain_ttl_s`): the server removes the ended state then,
so the bucket holds the running chains and the recent ends, not every chain ever run.
"""

from __future__ import annotations

from collections import OrderedDict

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from chainyard.contracts import ChainState, KvDef, encode, state_decoder
from chainyard.runtime.nats import JS_TIMEOUT_S, fits, while_no_leader

# What nats-py's KV raises on JetStream's 10071 / 10164 (wrong last subject sequence): a
# failed CAS. A write with a TTL is a plain publish to the key's subject (nats-py's KV update
# takes no TTL), and its refusal is told apart by the same codes.
Conflict = KeyWrongLastSequenceError
WRONG_LAST = (10071, 10164)
LAST = "Nats-Expected-Last-Subject-Sequence"
REMOVED = ("DEL", "PURGE")  # the KV-Operation header of a deleted key's last message


# What a write puts in its headers at most (the expected last sequence, the TTL)
KV_WRITE_HEADERS = {LAST: "18446744073709551615", "Nats-TTL": "18446744073709551615"}


class StateStore:
    def __init__(
        self,
        kv: KeyValue,
        js: JetStreamContext,
        bucket: KvDef,
        cache_size: int = 10_000,
        max_payload: int = 0,
    ) -> None:
        self.kv = kv
        self.js = js
        self.max_payload = max_payload  # the server's: a write over it closes the connection
        self._stream = (
            f"KV_{bucket.bucket}"  # a bucket's stream and key subjects, as NATS names them
        )
        self._subject = f"$KV.{bucket.bucket}."
        self._cache: OrderedDict[str, tuple[ChainState, int]] = OrderedDict()
        self._size = cache_size
        self.ended_ttl_s = 0  # the TTL of an ended chain's state; 0: none (Router.run sets it)

    @staticmethod
    def key(tenant: str, chain_id: str) -> str:
        return f"{tenant}.{chain_id}"

    async def load(self, key: str, *, fresh: bool = False) -> tuple[ChainState | None, int]:
        """The state and its revision ((None, 0): no such chain). `fresh`: the latest revision,
        from the stream leader; otherwise this router's cache, or KV (any replica may answer)."""
        if fresh:
            try:
                last = await self.js.get_last_msg(self._stream, self._subject + key)
            except NotFoundError:
                return None, 0
            if not last.data or (last.headers or {}).get("KV-Operation") in REMOVED:
                return None, 0
            value, rev = last.data, last.seq or 0
        else:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return hit
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                return None, 0
            if not entry.value:
                return None, 0
            value, rev = entry.value, entry.revision or 0
        state = state_decoder.decode(value)
        self._remember(key, state, rev)
        return state, rev

    async def create(self, key: str, state: ChainState) -> int:
        """Raises Conflict when the key exists."""
        data = encode(state)
        fits(data, KV_WRITE_HEADERS, self.max_payload)
        ttl = self._ttl(state)
        rev = await while_no_leader(lambda _: self.kv.create(key, data, msg_ttl=ttl), JS_TIMEOUT_S)
        self._remember(key, state, rev)
        return rev

    async def update(self, key: str, state: ChainState, last: int) -> int:
        """Raises Conflict when someone else wrote since `last`."""
        data = encode(state)
        fits(data, KV_WRITE_HEADERS, self.max_payload)
        ttl = self._ttl(state)
        try:
            if ttl is None:
                rev = await while_no_leader(lambda _: self.kv.update(key, data, last), JS_TIMEOUT_S)
            else:
                rev = await while_no_leader(
                    lambda left: self._update_with_ttl(key, data, last, ttl, left), JS_TIMEOUT_S
                )
        except Conflict:
            self._cache.pop(key, None)
            raise
        self._remember(key, state, rev)
        return rev

    def _ttl(self, state: ChainState) -> int | None:
        """An ended chain's state is written with a TTL; a running one's never expires."""
        return self.ended_ttl_s if self.ended_ttl_s and state.status != "running" else None

    async def _update_with_ttl(
        self, key: str, data: bytes, last: int, ttl: int, timeout: float
    ) -> int:
        try:
            ack = await self.js.publish(
                self._subject + key, data, timeout=timeout, headers={LAST: str(last)}, msg_ttl=ttl
            )
        except APIError as e:
            if e.err_code in WRONG_LAST:
                raise Conflict(description=e.description) from None
            raise
        return ack.seq

    def _remember(self, key: str, state: ChainState, rev: int) -> None:
        if state.status != "running":
            self._cache.pop(key, None)  # ended chains are rarely touched again
            return
        self._cache[key] = (state, rev)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
