"""AsyncAPI 3.0 export: every subject chainyard uses, as one document for other languages.

The channel addresses come from `Subjects` and the stream facts from `Topology`, so the document
follows the code; message payloads refer to the JSON Schema files that `schema_export` writes
(`./schema/chain.json` ...), and the control payloads (cancel, replay), which have no file of
their own, are inlined under `components.schemas`. The messages themselves (headers, payload
references, the event names) are in _asyncapi_messages.py. The YAML is written by a small
emitter (_yaml.py: no PyYAML at run time), deterministic so that a test can compare it with the
checked-in file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

from ._asyncapi_messages import EVENTS, _ref, message_components
from ._chain import VERSION
from ._control import Cancel, Replay
from ._topology import StreamDef, Topology
from ._yaml import to_yaml
from .schema_export import SCHEMA_DIR, clean_docs

ASYNCAPI_PATH = SCHEMA_DIR.parent / "asyncapi.yaml"


def _stream(s: StreamDef) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "retention": s.retention}
    if s.duplicate_window_s:
        out["duplicate_window_s"] = s.duplicate_window_s
    if s.max_age_s:
        out["max_age_s"] = s.max_age_s
    return out


def _sorted(value: Any) -> Any:
    """JSON Schema parts from msgspec, with sorted keys like the schema files."""
    return json.loads(json.dumps(value, sort_keys=True))


def document(topology: Topology | None = None, schema_ref: str = "./schema") -> dict[str, Any]:
    """The AsyncAPI 3.0 document as plain data. `schema_ref`: the JSON Schema directory,
    relative to where the document is written."""
    topo = topology or Topology()
    sub = topo.subjects
    p = sub.prefix

    params = {
        "tenant": {
            "description": "The tenant: a subject token, never a field. NATS permissions pin it "
            "per user, so a client can only publish and read its own tenant's subjects.",
            "examples": ["acme"],
        },
        "chain": {
            "description": "The chain id (1-64 of [A-Za-z0-9_-]).",
            "examples": ["trip-42"],
        },
        "verb": {
            "description": "`cancel`, `replay` or `signal.<name>` (a signal name is one more "
            "token, so a subscriber uses `>` after the chain id).",
            "examples": ["cancel", "replay", "signal.approval"],
        },
        "pool": {
            "description": "A worker pool: a provider pool from the configuration, or "
            "`tool.<name>` for a tool (two tokens).",
            "examples": ["openai", "cloud-sim", "tool.weather"],
        },
        "type": {
            "description": "The event's `type`, two tokens: "
            + ", ".join(f"`{t}`" for t, _, _ in EVENTS.values())
            + ". Subscribe to `.>` after the chain id; treat an unknown type as not for you.",
            "enum": [t for t, _, _ in EVENTS.values()],
        },
        "step": {"description": "The step id.", "examples": ["answer"]},
        "source": {
            "description": "Where the message could not be processed.",
            "examples": ["intake", "control", "work", "events"],
        },
    }

    def params_of(*names: str) -> dict[str, Any]:
        return {n: _ref(f"#/components/parameters/{n}") for n in names}

    def msgs(*names: str) -> dict[str, Any]:
        return {n: _ref(f"#/components/messages/{n}") for n in names}

    channels: dict[str, Any] = {
        "submit": {
            "address": sub.submit("{tenant}"),
            "title": "Chain intake",
            "description": f"Clients publish a chain here with JetStream publish (stream "
            f"{topo.intake.name}, work queue); the stream's ack means it is stored. `Nats-Msg-Id` "
            "is the chain id, so a resubmission within the duplicate window is stored once. "
            "Subscribe to the chain's events before publishing.",
            "parameters": params_of("tenant"),
            "messages": msgs("chain"),
            "x-nats-stream": _stream(topo.intake),
        },
        "control": {
            "address": sub.control("{tenant}", "{chain}", "{verb}"),
            "title": "Chain control: cancel, signal, replay",
            "description": f"Durable (stream {topo.intake.name}). `cancel` ends the chain with "
            "chain.cancelled; `signal.<name>` releases the chain's wait steps for that signal, "
            "the JSON payload becomes their output; `replay` re-runs an ended chain from a step "
            "as a new chain (`replay_of` names the old one). The router answers every request "
            "on the chain's events: control.accepted once applied, control.rejected when it "
            "cannot apply; each carries the request's `intake_seq` (its publish ack's seq).",
            "parameters": params_of("tenant", "chain", "verb"),
            "messages": msgs("cancel", "signal", "replay"),
            "x-nats-stream": _stream(topo.intake),
        },
        "work": {
            "address": sub.work("{pool}"),
            "title": "Work for one pool",
            "description": f"The router publishes one assignment per step attempt (stream "
            f"{topo.work.name}, work queue; one durable pull consumer per pool, e.g. "
            f"`{topo.pool_consumer('openai').durable}`, ack wait "
            f"{topo.work_ack_wait_s:g} s, no server-side max deliver). A worker "
            "publishes the step's event, waits for its ack, then acks the work. Work delivered "
            f"more than {topo.work_max_deliver} times is not run: the worker publishes "
            "step.failed (fatal) and moves the message to the dead-letter stream.",
            "parameters": params_of("pool"),
            "messages": msgs("assignment"),
            "x-nats-stream": _stream(topo.work),
        },
        "events": {
            "address": sub.event("{tenant}", "{chain}", "{type}"),
            "title": "Chain events",
            "description": f"Everything that happens to a chain (stream {topo.events.name}, "
            "kept 7 days). A client subscribes to "
            f"`{sub.chain_events('<tenant>', '<chain>')}` before it submits and waits for one "
            "of chain.completed, chain.failed, chain.cancelled, chain.rejected.",
            "parameters": params_of("tenant", "chain", "type"),
            "messages": msgs(*EVENTS),
            "x-nats-stream": _stream(topo.events),
        },
        "delta": {
            "address": sub.delta("{tenant}", "{chain}", "{step}"),
            "title": "Streamed tokens",
            "description": "Core NATS, best effort: text fragments of a streaming step "
            "(`params.stream: true`) as they arrive. The step.completed event has the whole "
            "output.",
            "parameters": params_of("tenant", "chain", "step"),
            "messages": msgs("delta"),
        },
        "cancel": {
            "address": sub.cancel("{tenant}", "{chain}"),
            "title": "Drop a chain's in-flight calls",
            "description": "Core NATS, from the router to every worker when a chain was "
            "cancelled: workers abort its calls in flight (they end as step.failed, class "
            "`cancelled`) and drop its work that arrives later. Clients cancel with the "
            "control channel, not here.",
            "parameters": params_of("tenant", "chain"),
            "messages": msgs("cancelNotice"),
        },
        "deadLetter": {
            "address": sub.dlq_subject("{source}"),
            "title": "Dead letters",
            "description": f"Messages that could not be processed (stream {topo.dlq.name}), "
            "unchanged, with the reason in headers; for operators.",
            "parameters": params_of("source"),
            "messages": msgs("deadLetter"),
            "x-nats-stream": _stream(topo.dlq),
        },
    }

    def op(action: str, channel: str, summary: str, messages: list[str] | None = None) -> Any:
        names = messages if messages is not None else list(channels[channel]["messages"])
        return {
            "action": action,
            "channel": _ref(f"#/channels/{channel}"),
            "summary": summary,
            "messages": [_ref(f"#/channels/{channel}/messages/{m}") for m in names],
        }

    step_events = ["stepCompleted", "stepFailed"]
    chain_events = [m for m in EVENTS if m not in step_events]
    operations = {
        "receiveChain": op("receive", "submit", "The router's intake validates and starts chains."),
        "receiveControl": op("receive", "control", "The router applies cancel, signal, replay."),
        "sendWork": op("send", "work", "The router dispatches a step attempt to a pool."),
        "receiveWork": op("receive", "work", "A worker of the pool runs the step."),
        "sendStepEvent": op("send", "events", "A worker reports a step's result.", step_events),
        "receiveStepEvent": op(
            "receive", "events", "The router advances the chain on each step event.", step_events
        ),
        "sendChainEvent": op(
            "send",
            "events",
            "The router reports how a chain or a control request ended.",
            chain_events,
        ),
        "sendDelta": op("send", "delta", "A worker streams a step's text as it is generated."),
        "sendCancel": op("send", "cancel", "The router tells workers to drop a chain's calls."),
        "receiveCancel": op("receive", "cancel", "Workers abort the chain's in-flight calls."),
        "sendDeadLetter": op("send", "deadLetter", "Router and workers set aside what failed."),
    }

    _, control_schemas = msgspec.json.schema_components(
        [Cancel, Replay], ref_template="#/components/schemas/{name}"
    )
    control_schemas = clean_docs(control_schemas)
    return {
        "asyncapi": "3.0.0",
        "id": "urn:chainyard:contracts",
        "info": {
            "title": "chainyard",
            "version": str(VERSION),
            "description": (
                "chainyard's NATS contract: a message-queue driven agent worker pool. A client "
                "publishes a chain on the intake and reads its events; the router routes each "
                "step to a worker pool; workers report results as events.\n"
                "\n"
                "Operations are written from chainyard's side (router and workers). A client "
                "does the opposite: it sends on `submit` and `control`, and receives on "
                "`events` and `delta`.\n"
                "\n"
                "Payloads are the JSON Schema files (draft 2020-12) in `schema/`, generated from "
                "`chainyard.contracts`; the evolution rules are in docs/CONTRACTS.md (new fields "
                "have defaults, intake is strict, readers of outgoing messages are tolerant). "
                f"`info.version` is the contract version `v` carried by every message. This "
                f"file is generated (`chainyard schema`) for the subject prefix `{p}`."
            ),
            "license": {"name": "Apache-2.0"},
            "externalDocs": {
                "description": "The chain format: docs/CHAINS.md; the contracts: docs/CONTRACTS.md",
                "url": "https://chainyard.dev/docs/CHAINS.md",
            },
        },
        "defaultContentType": "application/json",
        "servers": {
            "dev": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "A local NATS with JetStream; `chainyard dev` starts one and "
                "prints its URL. Credentials: user/password in the URL or a creds file.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "parameters": params,
            "messages": message_components(schema_ref),
            "schemas": _sorted(control_schemas),
        },
    }


HEADER = "# Generated by `chainyard schema` (chainyard.contracts.asyncapi_export); do not edit.\n"


def render(topology: Topology | None = None, schema_ref: str = "./schema") -> str:
    return HEADER + to_yaml(document(topology, schema_ref))


def write(schema_dir: Path = SCHEMA_DIR, path: Path | None = None) -> Path:
    """Write the document (default: `asyncapi.yaml` beside `schema_dir`), its payload references
    relative to it. Returns the path written."""
    path = path or schema_dir.parent / ASYNCAPI_PATH.name
    rel = Path(os.path.relpath(schema_dir, path.parent)).as_posix()
    schema_ref = rel if rel.startswith(".") else f"./{rel}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(schema_ref=schema_ref))
    return path
