"""The chain a client submits: a graph of LLM and tool steps."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

VERSION = 1

# Ids travel inside NATS subjects and message ids, so they are one subject token.
Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$", max_length=64)]
Role = Literal["system", "user", "assistant", "tool"]
Strategy = Literal["cheapest", "fastest", "balanced", "weighted"]
Capability = Literal["tools", "json", "vision", "streaming"]
# A chain's metadata (a feature, a user id, ...) travels to its terminal event, its span and the
# usage report; bounded so that it stays small on every event that carries it. The bounds are
# OpenAI's for a request's `metadata`, so the gateway passes any valid one through.
METADATA_MAX_KEYS = 16
METADATA_MAX_VALUE = 512
MetadataKey = Annotated[str, Meta(min_length=1, max_length=64)]
Metadata = Annotated[
    dict[MetadataKey, Annotated[str, Meta(max_length=METADATA_MAX_VALUE)]],
    Meta(max_length=METADATA_MAX_KEYS),
]


class Base(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Incoming contracts are strict: an unknown field is an error the sender sees."""


class ToolCall(Struct, frozen=True, kw_only=True):
    """A call the model asked for; `args` is the decoded JSON object."""

    id: str
    name: str
    args: dict[str, Any] = {}


class Message(Base, frozen=True, kw_only=True):
    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = []
    tool_call_id: str | None = None


class ToolSpec(Base, frozen=True, kw_only=True):
    """A tool the model may call; `parameters` is its JSON Schema."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


class Params(Base, frozen=True, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    stop: list[str] = []
    response_format: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    stream: bool = False
    # With tools: "auto" (None: the same, the model decides), "none" (it may call none),
    # "required" (it must call one), or the name of the one tool it must call.
    tool_choice: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None


class Route(Base, frozen=True, kw_only=True):
    """Per-step routing constraints; all optional, the router's config fills the rest."""

    strategy: Strategy | None = None
    max_cost_usd: Annotated[float, Meta(ge=0)] | None = None
    prefer: list[str] = []
    avoid: list[str] = []
    capabilities: list[Capability] = []
    hedge_after_ms: Annotated[int, Meta(ge=1)] | None = None


class Loop(Base, frozen=True, kw_only=True):
    """Agent loop: the model may call these tools until it answers or a limit is hit."""

    tools: list[str]
    max_iterations: Annotated[int, Meta(ge=1, le=100)] = 8
    max_tokens: Annotated[int, Meta(ge=1)] | None = None  # input + output, all iterations
    max_cost_usd: Annotated[float, Meta(ge=0)] | None = None


class StepCache(Base, frozen=True, kw_only=True):
    """Opt in to the shared response cache (docs/OPERATIONS.md): an identical request (the
    same model or group, messages, tools and params) of the same tenant answered within
    `ttl_s` seconds completes this step at once, at no cost, without a provider call.
    Caching a call with temperature > 0 is the chain author's choice: a hit repeats one
    sampled answer."""

    ttl_s: Annotated[float, Meta(gt=0, le=366 * 86400)]


class LlmStep(Base, frozen=True, kw_only=True, tag_field="kind", tag="llm"):
    """One model call. Message text may contain `{{steps.<id>.output}}` references."""

    id: Id
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: list[ToolSpec] = []
    params: Params = Params()
    route: Route = Route()
    loop: Loop | None = None
    after: list[Id] = []
    when: str | None = None
    cache: StepCache | None = None  # not with `loop`: an agent loop is not one request


class ToolStep(Base, frozen=True, kw_only=True, tag_field="kind", tag="tool"):
    """One tool call, served by pool `tool.<tool>`. String args may hold references."""

    id: Id
    tool: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    args: dict[str, Any] = {}
    after: list[Id] = []
    when: str | None = None


class WaitStep(Base, frozen=True, kw_only=True, tag_field="kind", tag="wait"):
    """Wait for an external signal (a human approval, a webhook), published with
    `cy.control.<tenant>.<chain>.signal.<signal>`; its JSON payload becomes this step's output.
    Without a signal within `timeout_ms` the step fails (class "timeout")."""

    id: Id
    signal: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    timeout_ms: Annotated[int, Meta(ge=1)] | None = None
    after: list[Id] = []
    when: str | None = None


Step = LlmStep | ToolStep | WaitStep


class Chain(Base, frozen=True, kw_only=True):
    """One agent request. The tenant is never here: it is the intake subject's."""

    id: Id
    steps: Annotated[list[Step], Meta(min_length=1, max_length=256)]
    output: Id | None = None
    budget_usd: Annotated[float, Meta(ge=0)] | None = None
    deadline_ms: Annotated[int, Meta(ge=1)] | None = None
    priority: Annotated[int, Meta(ge=0, le=9)] = 5
    metadata: Metadata = {}
    replay_of: Id | None = None  # set by the router on a replay: the chain this one re-runs
    v: int = VERSION

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    @property
    def output_step(self) -> str:
        return self.output or self.steps[-1].id


def now_ms() -> int:
    """Now, as every `*_ms` time in the contracts: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A fresh, time-ordered, subject-safe id (26 hex chars)."""
    return f"{now_ms():012x}{os.urandom(7).hex()}"
