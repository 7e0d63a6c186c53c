"""Chain state in KV, read through a small cache of this router's own writes.

Every write is a compare-and-set on the revision the decision was made from. The cache saves
the read on the hot path (one KV round trip of seven per step); when another router replica
wrote in between, the compare-and-set fails, the entry is dropped, and the next read goes to KV.
"""

from __future__ import annotations

from collections import OrderedDict

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chainyard.contracts import ChainState, encode, state_decoder

Conflict = KeyWrongLastSequenceError


class StateStore:
    def __init__(self, kv: KeyValue, cache_size: int = 10_000) -> None:
        self.kv = kv
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
        rev = await self.kv.create(key, encode(state))
        self._remember(key, state, rev)
        return rev

    async def update(self, key: str, state: ChainState, last: int) -> int:
        """Raises Conflict when someone else wrote since `last`."""
        try:
            rev = await self.kv.update(key, encode(state), last=last)
        except Conflict:
            self._cache.pop(key, None)
            raise
        self._remember(key, state, rev)
        return rev

    def _remember(self, key: str, state: ChainState, rev: int) -> None:
        if state.status != "running":
            self._cache.pop(key, None)  # ended chains are rarely touched again
            return
        self._cache[key] = (state, rev)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
