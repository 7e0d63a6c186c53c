"""The AsyncAPI document's messages: every message chainyard sends or receives, by name.

Each entry (`components.messages`) gives a message's content type, its headers (Nats-Msg-Id,
traceparent, the dead-letter reasons) and its payload: a reference to the JSON Schema files that
`schema_export` writes, or an inline schema for what has no file. The channels and operations
(asyncapi_export.py) are about subjects and who uses them, and refer to these entries by name
only; apart so each module reads as one part of the document. `EVENTS` is here too: it names
the event messages, and the events channel and its `type` parameter are built from it.
"""

from __future__ import annotations

from typing import Any

_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

# Event message name -> (subject suffix, $defs entry in event.json, summary).
EVENTS: dict[str, tuple[str, str, str]] = {
    "stepCompleted": (
        "step.completed",
        "StepCompleted",
        "A step's result: output, usage, cost, latency, the deployment that ran it.",
    ),
    "stepFailed": (
        "step.failed",
        "StepFailed",
        "One attempt of a step failed; the router retries elsewhere or fails the chain.",
    ),
    "chainCompleted": (
        "chain.completed",
        "ChainCompleted",
        "Terminal: the chain's output, total usage and cost, one summary per step.",
    ),
    "chainFailed": (
        "chain.failed",
        "ChainFailed",
        "Terminal: a reason a person can read, the step and the error.",
    ),
    "chainCancelled": (
        "chain.cancelled",
        "ChainCancelled",
        "Terminal: the chain was cancelled (cy.control.<tenant>.<chain>.cancel).",
    ),
    "chainRejected": (
        "chain.rejected",
        "ChainRejected",
        "Terminal: intake refused the chain, every error with its JSON path; nothing was created.",
    ),
    "controlRejected": (
        "control.rejected",
        "ControlRejected",
        "A cancel, signal or replay that could not apply; the chain itself is unaffected. "
        "`intake_seq` is the control message's sequence in the intake stream.",
    ),
    "controlAccepted": (
        "control.accepted",
        "ControlAccepted",
        "A cancel, signal or replay the router applied and recorded; `message` says what it "
        "did, `intake_seq` is the control message's sequence in the intake stream.",
    ),
}


def _ref(to: str) -> dict[str, str]:
    return {"$ref": to}


def _headers(**fields: tuple[str, bool]) -> dict[str, Any]:
    """A headers schema; each field is (description, required). `traceparent` is shared."""
    props: dict[str, Any] = {}
    for name, (description, _) in fields.items():
        key = name.replace("_", "-")
        if key == "traceparent":
            props[key] = {"type": "string", "pattern": _TRACEPARENT, "description": description}
        else:
            props[key] = {"type": "string", "description": description}
    schema: dict[str, Any] = {"type": "object", "properties": props}
    required = [name.replace("_", "-") for name, (_, req) in fields.items() if req]
    if required:
        schema["required"] = required
    return schema


_TRACE = (
    "Optional W3C Trace Context of the sender "
    "(https://www.w3.org/TR/trace-context/#traceparent-header), for tracing across NATS.",
    False,
)


def _control(name: str, title: str, summary: str, verb: str, payload: Any) -> dict[str, Any]:
    """A control message (`cy.control.<tenant>.<chain>.<verb>`): a fresh id per request."""
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "headers": _headers(
            Nats_Msg_Id=(f"Unique per request, e.g. `<chain>.{verb}.<fresh id>`.", True),
            traceparent=_TRACE,
        ),
        "payload": payload,
    }


def message_components(schema_ref: str) -> dict[str, Any]:
    """`components.messages`; `schema_ref`: the JSON Schema directory, as in `document()`."""

    def schema(name: str, fragment: str = "") -> dict[str, str]:
        return _ref(f"{schema_ref}/{name}.json" + (f"#/$defs/{fragment}" if fragment else ""))

    msg_id_chain = ("The chain id: the intake stream deduplicates a resubmission.", True)
    messages: dict[str, Any] = {
        "chain": {
            "name": "Chain",
            "title": "A chain of steps",
            "summary": "One agent request: LLM, tool and wait steps with references, "
            "conditions, limits. Intake is strict: unknown fields are rejected.",
            "contentType": "application/json",
            "headers": _headers(Nats_Msg_Id=msg_id_chain, traceparent=_TRACE),
            "payload": schema("chain"),
            "correlationId": {"location": "$message.header#/Nats-Msg-Id"},
        },
        "cancel": _control(
            "Cancel",
            "Cancel a chain",
            "On `cancel`: end the chain with chain.cancelled.",
            "cancel",
            _ref("#/components/schemas/Cancel"),
        ),
        "signal": _control(
            "Signal",
            "Release wait steps",
            "On `signal.<name>`: any JSON value; it becomes the output of the chain's wait steps "
            "for that signal.",
            "signal.<name>",
            {"description": "Any JSON value (null when there is no data)."},
        ),
        "replay": _control(
            "Replay",
            "Re-run an ended chain",
            "On `replay`: a new chain `new_id` re-runs `from_step` and what depends on it, with "
            "`overrides`; earlier outputs are reused.",
            "replay",
            _ref("#/components/schemas/Replay"),
        ),
        "assignment": {
            "name": "Assignment",
            "title": "A step attempt routed to a pool",
            "summary": "The step with its references resolved, the target deployment, the "
            "absolute deadline.",
            "contentType": "application/json",
            "headers": _headers(Nats_Msg_Id=("`<chain>.<step>.<attempt>`.", True)),
            "payload": schema("assignment"),
        },
        **{
            name: {
                "name": defn,
                "title": subject_type,
                "summary": summary,
                "contentType": "application/json",
                "headers": _headers(
                    Nats_Msg_Id=(
                        "Deterministic per event, so a re-emitted event is "
                        "deduplicated by the stream.",
                        True,
                    ),
                ),
                "payload": schema("event", defn),
                "correlationId": {"location": "$message.payload#/chain_id"},
            }
            for name, (subject_type, defn, summary) in EVENTS.items()
        },
        "delta": {
            "name": "Delta",
            "title": "A text fragment",
            "summary": "UTF-8 text, not JSON: the next piece of a streaming step's output.",
            "contentType": "text/plain",
            "payload": {"type": "string"},
        },
        "cancelNotice": {
            "name": "CancelNotice",
            "title": "Drop the chain's calls",
            "summary": "Empty body; the chain id is the subject's last token.",
            "contentType": "application/octet-stream",
            "payload": {"type": "string", "maxLength": 0},
        },
        "deadLetter": {
            "name": "DeadLetter",
            "title": "A message that could not be processed",
            "summary": "The original body, unchanged.",
            "contentType": "application/octet-stream",
            "headers": _headers(
                Cy_Reason=("Why it could not be processed (at most 1000 characters).", True),
                Cy_Subject=("The subject it arrived on, when known.", False),
                Cy_Tenant=("The tenant, when known.", False),
            ),
            "payload": {"description": "The original message body."},
        },
    }
    return messages
