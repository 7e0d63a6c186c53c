"""Chain state as kept in KV `cy_chains`, updated only by compare-and-set on revision."""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from ._chain import VERSION, Chain, Message, Step
from ._messages import ErrorInfo, Output, Target, Usage

StepStatus = Literal[
    "pending", "dispatched", "waiting", "completed", "failed", "skipped", "cancelled"
]
ChainStatus = Literal["running", "completed", "failed", "cancelled"]


class StepState(Struct, frozen=True, kw_only=True):
    status: StepStatus = "pending"
    attempt: int = 0
    target: Target | None = None
    tried: list[str] = []  # deployments already tried, for failover
    dispatched_at_ms: int | None = None
    output: Output | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    latency_ms: float | None = None
    error: ErrorInfo | None = None
    # Agent loops: the conversation so far, the tool calls of this iteration still running,
    # and the loop's own count; a tool call's step records its spec and its loop step.
    transcript: list[Message] = []
    calls: list[str] = []
    iterations: int = 0
    spec: Step | None = None
    parent: str | None = None
    # Routing: budget held for the attempt in flight (settled on its result), and a hedge.
    reserved_usd: float = 0.0
    hedge_attempt: int = 0  # > 0: a hedge of this step is in flight under this attempt number
    hedge_target: Target | None = None
    hedge_reserved_usd: float = 0.0
    dead: list[int] = []  # attempts that failed while another attempt of the step was live
    cached: bool = False  # completed from the response cache (no provider call)


class ChainState(Struct, frozen=True, kw_only=True):
    chain: Chain
    tenant: str
    status: ChainStatus = "running"
    steps: dict[str, StepState] = {}
    created_at_ms: int
    deadline_at_ms: int | None = None
    ended_at_ms: int | None = None
    reason: str | None = None
    signals: dict[str, Any] = {}  # signals received, by name (a wait step may come later)
    # W3C trace context of the chain's own span, fixed at intake (`traceparent`, `tracestate`,
    # and `parent`: the intake span), so later events on any router replica continue the trace.
    trace: dict[str, str] = {}
    digest: str = (
        ""  # chain_digest() of the submitted bytes: the same id with other bytes is refused
    )
    v: int = VERSION

    @property
    def cost_usd(self) -> float:
        return sum(s.cost_usd for s in self.steps.values())

    @property
    def usage(self) -> Usage:
        total = Usage()
        for s in self.steps.values():
            total = total + s.usage
        return total
