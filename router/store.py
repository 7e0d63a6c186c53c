"""Chain state in KV, read through a small cache of this router's own writes.

Every write is a compare-and-set on the revision the decision was made from. The cache saves
the read on the hot path (one KV round trip of seven per step); when another router replica
wrote in between, the compare-and-set fails, the entry is dropped, and the next read goes to KV.
Writes go through the lean publisher (runtime/lean.py) as nats-py's KV does them: a publish to
the key's subject with `Nats-Expected-Last-Subject-Sequence`.
"""

from __future__ import annotations

from collections import OrderedDict

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chainyard.contracts import ChainState, encode, state_decoder
from chainyard.runtime.lean import Publisher

Conflict = KeyWrongLastSequenceError
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed compare-and-set
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"


class StateStore:
    def __init__(self, kv: KeyValue, publisher: Publisher, cache_size: int = 10_000) -> None:
        self.kv = kv
        self.publisher = publisher
        self._subject = kv._pre  # "$KV.<bucket>.": the subject prefix of its keys
        self._cache: OrderedDict[str, tuple[ChainState, int]] = OrderedDict()
        self._size = cache_size

    @staticmethod
    def key(tenant: str, chain_id: str) -> str:
        return f"{tenant}.{chain_id}"

    async def load(self, key: str, *, fresh: bool = False) -> tuple[ChainState | None, int]:
        if not fresh and (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, 0
        state, rev = state_decoder.decode(entry.value), entry.revision or 0
        self._remember(key, state, rev)
        return state, rev

    async def create(self, key: str, state: ChainState) -> int:
        """Raises Conflict when the key exists."""
        data = encode(state)
        try:
            rev = await self._write(key, data, 0)
        except Conflict:  # exists, or was deleted: nats-py's create tells the two apart
            rev = await self.kv.create(key, data)
        self._remember(key, state, rev)
        return rev

    async def update(self, key: str, state: ChainState, last: int) -> int:
        """Raises Conflict when someone else wrote since `last`."""
        try:
            rev = await self._write(key, encode(state), last)
        except Conflict:
            self._cache.pop(key, None)
            raise
        self._remember(key, state, rev)
        return rev

    async def _write(self, key: str, data: bytes, last: int) -> int:
        try:
            ack = await self.publisher.publish(
                self._subject + key, data, headers={EXPECTED_LAST: str(last)}
            )
        except APIError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict(description=e.description) from e
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
