"""The chains cancelled lately, so that their late work is dropped without a provider call."""

from __future__ import annotations

import time
from collections import OrderedDict

RECENT_CANCEL_S = 600.0  # a cancelled chain's late work is dropped for this long ...
RECENT_CANCEL_MAX = 100_000  # ... remembering at most this many chains


class Recent:
    """A bounded set whose entries expire: the chains cancelled in the last `ttl_s` seconds."""

    def __init__(
        self, ttl_s: float = RECENT_CANCEL_S, max_entries: int = RECENT_CANCEL_MAX
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._at: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, key: str) -> None:
        self._at.pop(key, None)
        self._at[key] = time.monotonic()
        while len(self._at) > self.max_entries:
            self._at.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        at = self._at.get(key)  # type: ignore[call-overload]
        if at is None:
            return False
        if time.monotonic() - at > self.ttl_s:
            self._expire()
            return False
        return True

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl_s
        while self._at and next(iter(self._at.values())) < limit:
            self._at.popitem(last=False)

    def __len__(self) -> int:
        self._expire()
        return len(self._at)
