"""Control messages: a client's cancel / signal / replay, and the router's durable timers.

Control travels on `cy.control.<tenant>.<chain>.<verb>` (stream CY_INTAKE): durable, and the
tenant pinned by the subject like every other intake. `verb` is `cancel`, `signal.<name>` or
`replay`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from ._chain import Id, Route

TimerKind = Literal["wait_timeout", "hedge", "capacity", "deadline"]


class Cancel(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: str = "cancelled by the client"


class StepOverride(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """On replay: run this step with another model (or group) and/or other routing."""

    model: str | None = None
    route: Route | None = None


class Replay(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Re-run an ended chain from `from_step` as a new chain `new_id`.

    Steps that `from_step` does not depend on, directly or not, keep their recorded outputs;
    `from_step` and everything after it run again, with `overrides` applied.
    """

    new_id: Id
    from_step: Id
    overrides: dict[str, StepOverride] = {}


class Timer(Struct, frozen=True, kw_only=True):
    """A durable timer: the router naks it until `due_at_ms`, then acts if still relevant."""

    kind: TimerKind
    tenant: str
    chain_id: str
    step_id: str
    attempt: int
    due_at_ms: int
    data: Annotated[dict[str, Any], Meta()] = {}
