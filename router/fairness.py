"""Tenant fairness at intake: one tenant's flood must not starve the others.

Each router counts, per tenant, the steps it dispatched that have not reported back. A new
chain of a tenant at its cap (`Config.tenant_max_outstanding`, per replica) is put back
(`nak` with a growing delay) so other tenants' chains behind it in the intake stream go first.
The deferral is bounded: on the intake consumer's last delivery the chain is accepted anyway,
so nothing is ever dropped. Chains of priority 8 and 9 are never deferred.
"""

from __future__ import annotations

import time
from collections import defaultdict

PRIORITY_BYPASS = 8


class Fairness:
    def __init__(self, cap: int, ttl_s: float = 60.0) -> None:
        self.cap = cap
        self.ttl_s = ttl_s
        self._out: defaultdict[str, dict[str, float]] = defaultdict(dict)  # tenant -> key -> expiry

    def note(self, tenant: str, key: str) -> None:
        if self.cap:
            self._out[tenant][key] = time.monotonic() + self.ttl_s

    def done(self, tenant: str, key: str) -> None:
        if self.cap:
            self._out[tenant].pop(key, None)

    def outstanding(self, tenant: str) -> int:
        out = self._out.get(tenant)
        if not out:
            return 0
        now = time.monotonic()
        for k in [k for k, exp in out.items() if exp < now]:  # finished on another replica
            del out[k]
        return len(out)

    def defer_s(self, tenant: str, priority: int, delivered: int, max_deliver: int) -> float | None:
        """How long to put a new chain back, or None to take it now."""
        if not self.cap or priority >= PRIORITY_BYPASS:
            return None
        if max_deliver > 0 and delivered >= max_deliver:
            return None  # the last delivery: never drop a chain for fairness
        if self.outstanding(tenant) < self.cap:
            return None
        # Short and capped: the chain must come back soon after its tenant drops under the cap,
        # since the intake never gives up on it (a longer wait only idles the tenant's share).
        return min(0.1 * 2 ** (delivered - 1), 1.0)
