"""Routing policy: which deployment gets a step."""

from __future__ import annotations

from chainyard.contracts import LlmStep, Step, Target

from .capacity import CapacityView
from .catalog import Catalog, target_of, tool_target


class Policy:
    """Among the deployments that serve a step, the one whose pool has the most free slots.

    Pools with a fresh heartbeat come first; when none has one, the step still goes to the
    first eligible pool, where the work queue holds it until a worker joins.
    """

    def __init__(self, catalog: Catalog, capacity: CapacityView) -> None:
        self.catalog = catalog
        self.capacity = capacity

    def pick(self, step: Step, exclude: list[str]) -> Target | str:
        if not isinstance(step, LlmStep):
            return tool_target(step.tool)
        candidates = self.catalog.deployments(step)
        if not candidates:
            return f"no deployment serves model {step.model!r}"
        left = [d for d in candidates if d.name not in exclude]
        if not left:
            return f"no deployment of {step.model!r} left to try (tried {', '.join(exclude)})"
        preferred = set(step.route.prefer)
        best = max(
            enumerate(left),
            key=lambda p: (
                p[1].pool in preferred or p[1].name in preferred,
                self.capacity.has_workers(p[1].pool),
                self.capacity.free_slots(p[1].pool),
                -p[0],  # config order breaks ties
            ),
        )[1]
        self.capacity.note_dispatch(best.pool)
        return target_of(best)
