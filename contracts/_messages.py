"""What flows after intake: work assignments, events, heartbeats.

Outgoing messages are tolerant (unknown fields are ignored on decode) so that a reader built
against an older contract keeps working when a newer writer adds fields with defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from ._chain import VERSION, Step, ToolCall, ToolSpec

ErrorClass = Literal[
    "retryable",  # 408, 409, 429, 5xx, 529, timeouts, connection resets: try again / elsewhere
    "fatal",  # 400, 401, 403, 404, 422, a tool that raised: retrying cannot help
    "context_window",  # the prompt does not fit: a deployment with a larger window may
    "timeout",  # the step's deadline passed while it ran
    "expired",  # the deadline had passed before the worker started it; never sent
    "cancelled",  # the chain was cancelled
    "invalid",  # the work message itself was malformed
]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error", "other"]


class Out(Struct, frozen=True, kw_only=True):
    pass


class Usage(Out, frozen=True, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class Output(Out, frozen=True, kw_only=True):
    """A step's result: model text and tool calls, or a tool's JSON value in `data`."""

    text: str = ""
    data: Any = None
    tool_calls: list[ToolCall] = []
    finish_reason: FinishReason = "stop"


class Target(Out, frozen=True, kw_only=True):
    """The deployment a step was routed to."""

    deployment: str
    pool: str
    provider: str
    model: str  # the provider's own model name


class Assignment(Out, frozen=True, kw_only=True):
    """A step routed to `cy.work.<pool>`; references already resolved.

    `Nats-Msg-Id` is `<chain>.<step>.<attempt>`, so re-emitting it is harmless.
    """

    chain_id: str
    step_id: str
    attempt: int
    tenant: str
    step: Step
    target: Target
    dispatched_at_ms: int
    deadline_at_ms: int | None = None
    reserved_usd: float | None = None
    priority: int = 5
    hedge: bool = False  # a second copy of a slow attempt; the first result wins
    v: int = VERSION

    @property
    def msg_id(self) -> str:
        return f"{self.tenant}.{self.chain_id}.{self.step_id}.{self.attempt}"


class ErrorInfo(Out, frozen=True, kw_only=True):
    cls: ErrorClass
    message: str
    status: int | None = None  # the provider's HTTP status, when there was one
    retry_after_s: float | None = None


class StepCompleted(Out, frozen=True, kw_only=True, tag_field="type", tag="step.completed"):
    chain_id: str
    step_id: str
    attempt: int
    tenant: str
    output: Output
    usage: Usage = Usage()
    cost_usd: float = 0.0
    target: Target
    worker: str
    dispatched_at_ms: int  # the router sent the assignment
    started_at_ms: int  # the call began (after any pause for a provider's rate limit)
    latency_ms: float  # of the call
    ttft_ms: float | None = None
    # A response-cache hit (no provider call; `worker` is "cache"): `saved_usd` is what the
    # call that stored the answer cost, `usage` is zero (no tokens were spent).
    cached: bool = False
    saved_usd: float = 0.0
    v: int = VERSION


class StepFailed(Out, frozen=True, kw_only=True, tag_field="type", tag="step.failed"):
    chain_id: str
    step_id: str
    attempt: int
    tenant: str
    error: ErrorInfo
    target: Target
    worker: str
    dispatched_at_ms: int = 0
    started_at_ms: int = 0
    latency_ms: float = 0.0
    v: int = VERSION


class StepSummary(Out, frozen=True, kw_only=True):
    step_id: str
    status: str
    attempts: int = 0
    pool: str | None = None
    model: str | None = None
    latency_ms: float | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    error: str | None = None
    deployment: str | None = None
    cached: bool = False  # answered from the response cache (no provider call)


class ChainCompleted(Out, frozen=True, kw_only=True, tag_field="type", tag="chain.completed"):
    chain_id: str
    tenant: str
    output: Output
    usage: Usage = Usage()
    cost_usd: float = 0.0
    duration_ms: float = 0.0
    steps: list[StepSummary] = []
    digest: str = ""  # chain_digest() of the submitted chain: tells its end from a reused id's
    metadata: dict[str, str] = {}  # the chain's, for usage reports
    v: int = VERSION


class ChainFailed(Out, frozen=True, kw_only=True, tag_field="type", tag="chain.failed"):
    chain_id: str
    tenant: str
    reason: str
    step_id: str | None = None
    error: ErrorInfo | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    duration_ms: float = 0.0
    steps: list[StepSummary] = []
    digest: str = ""  # chain_digest() of the submitted chain: tells its end from a reused id's
    metadata: dict[str, str] = {}  # the chain's, for usage reports
    v: int = VERSION


class ChainCancelled(Out, frozen=True, kw_only=True, tag_field="type", tag="chain.cancelled"):
    chain_id: str
    tenant: str
    reason: str
    usage: Usage = Usage()
    cost_usd: float = 0.0
    duration_ms: float = 0.0
    steps: list[StepSummary] = []
    digest: str = ""  # chain_digest() of the submitted chain: tells its end from a reused id's
    metadata: dict[str, str] = {}  # the chain's, for usage reports
    v: int = VERSION


class ControlRejected(Out, frozen=True, kw_only=True, tag_field="type", tag="control.rejected"):
    """A cancel, signal or replay that could not apply; the chain itself is unaffected.

    `intake_seq` is the control message's sequence in the intake stream: its sender matches it
    with its publish ack (0: from a router older than the field)."""

    chain_id: str
    tenant: str
    verb: str
    message: str
    intake_seq: int = 0
    v: int = VERSION


class ControlAccepted(Out, frozen=True, kw_only=True, tag_field="type", tag="control.accepted"):
    """A cancel, signal or replay the router has applied and recorded; `message` says what it
    did. One per control message (message id `<tenant>.<chain>.control.<intake_seq>`, the same
    as a rejection's, so a message is answered once either way). Not a step or chain event:
    the ledger and watchers of a chain's end pass over it."""

    chain_id: str
    tenant: str
    verb: str = ""
    message: str = ""
    intake_seq: int = 0
    new_chain_id: str | None = None  # a replay's new chain
    v: int = VERSION


class FieldError(Out, frozen=True, kw_only=True):
    path: str  # "$.steps[2].model", or "$" for the message as a whole
    message: str


class ChainRejected(Out, frozen=True, kw_only=True, tag_field="type", tag="chain.rejected"):
    """Intake refused the chain; nothing was created. Every error says where it is.

    `intake_seq` is the refused message's sequence in the intake stream (a submitter matches it
    with its publish ack). `id_in_use`: the id belongs to an existing chain of the tenant, which
    this rejection does not end."""

    chain_id: str
    tenant: str
    errors: list[FieldError]
    intake_seq: int = 0
    id_in_use: bool = False
    v: int = VERSION


Event = (
    StepCompleted
    | StepFailed
    | ChainCompleted
    | ChainFailed
    | ChainCancelled
    | ChainRejected
    | ControlRejected
    | ControlAccepted
)
StepEvent = StepCompleted | StepFailed
ChainEnded = ChainCompleted | ChainFailed | ChainCancelled | ChainRejected


class DeploymentHealth(Out, frozen=True, kw_only=True):
    """What the provider behind one deployment reports, as seen by one worker."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_at_ms: int | None = None
    reset_tokens_at_ms: int | None = None
    throttled_until_ms: int | None = None
    latency_ms: float | None = None  # EWMA of whole calls
    ttft_ms: float | None = None  # EWMA of time to first token
    error_rate: float = 0.0  # EWMA over calls, 0..1
    calls: int = 0


class Heartbeat(Out, frozen=True, kw_only=True):
    """Written to KV `cy_capacity` under `<pool>.<worker>` every few seconds, with a TTL."""

    pool: str
    worker: str
    slots_total: int
    slots_free: int
    at_ms: int
    interval_ms: int
    models: list[str] = []
    tools: list[ToolSpec] = []  # what a tool worker serves, for agent loops to offer models
    deployments: dict[str, DeploymentHealth] = {}
    draining: bool = False
    v: int = VERSION
