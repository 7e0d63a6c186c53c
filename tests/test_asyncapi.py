"""contracts/asyncapi.yaml: generated, checked in, a well-formed AsyncAPI 3.0 document."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from chainyard.contracts import Cancel, Replay, StepOverride, Subjects, Topology, encode
from chainyard.contracts import asyncapi_export as aa

DOC_PATH = aa.ASYNCAPI_PATH
SCHEMA_DIR = DOC_PATH.parent / "schema"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(DOC_PATH.read_text())


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_checked_in_asyncapi_matches_the_generator() -> None:
    assert DOC_PATH.read_text() == aa.render(), (
        "contracts/asyncapi.yaml is stale: run `chainyard schema`"
    )


def test_generation_is_deterministic_and_reads_back_exactly() -> None:
    assert aa.render() == aa.render()
    assert yaml.safe_load(aa.render()) == aa.document()


def test_write_puts_references_relative_to_the_document(tmp_path: Path) -> None:
    schema_dir = tmp_path / "out" / "json"
    path = aa.write(schema_dir)
    assert path == tmp_path / "out" / "asyncapi.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["components"]["messages"]["chain"]["payload"] == {"$ref": "./json/chain.json"}


def test_top_level_fields_of_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "chainyard"
    assert doc["info"]["version"] == "1"
    assert doc["defaultContentType"] == "application/json"
    assert {"channels", "operations", "components"} <= set(doc)
    assert all(s["protocol"] == "nats" for s in doc["servers"].values())


def test_channels_are_the_subjects(doc: dict[str, Any]) -> None:
    s = Subjects()
    addresses = {cid: ch["address"] for cid, ch in doc["channels"].items()}
    assert addresses == {
        "submit": s.submit("{tenant}"),
        "control": s.control("{tenant}", "{chain}", "{verb}"),
        "work": s.work("{pool}"),
        "events": s.event("{tenant}", "{chain}", "{type}"),
        "delta": s.delta("{tenant}", "{chain}", "{step}"),
        "cancel": s.cancel("{tenant}", "{chain}"),
        "deadLetter": s.dlq_subject("{source}"),
    }
    assert addresses["submit"] == "cy.submit.{tenant}"
    assert addresses["events"] == "cy.events.{tenant}.{chain}.{type}"
    for cid, ch in doc["channels"].items():
        # Every {parameter} in the address is declared, and only those.
        assert set(re.findall(r"\{(\w+)\}", ch["address"])) == set(ch.get("parameters", {})), cid
        assert ch["messages"], cid


def test_streams_come_from_the_topology(doc: dict[str, Any]) -> None:
    topo = Topology()
    ch = doc["channels"]
    assert ch["submit"]["x-nats-stream"]["name"] == topo.intake.name
    assert ch["control"]["x-nats-stream"]["name"] == topo.intake.name
    assert ch["work"]["x-nats-stream"]["name"] == topo.work.name
    assert ch["events"]["x-nats-stream"]["name"] == topo.events.name
    assert "x-nats-stream" not in ch["delta"]  # core NATS
    assert "x-nats-stream" not in ch["cancel"]


def test_every_internal_ref_resolves_and_operations_use_their_channel(doc: dict[str, Any]) -> None:
    for ref in refs(doc):
        if ref.startswith("#/"):
            resolve(doc, ref)
    for oid, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), oid
        channel = op["channel"]["$ref"]
        assert channel.startswith("#/channels/")
        for m in op["messages"]:
            assert m["$ref"].startswith(channel + "/messages/"), oid
    actions = {
        (op["channel"]["$ref"].rsplit("/", 1)[1], op["action"]) for op in doc["operations"].values()
    }
    assert {("submit", "receive"), ("control", "receive"), ("events", "send")} <= actions


def test_payloads_reference_the_json_schema_files(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    assert messages["chain"]["payload"] == {"$ref": "./schema/chain.json"}
    assert messages["assignment"]["payload"] == {"$ref": "./schema/assignment.json"}
    assert messages["chainCompleted"]["payload"] == {
        "$ref": "./schema/event.json#/$defs/ChainCompleted"
    }
    for ref in refs(doc):
        if ref.startswith("#/"):
            continue
        file, _, fragment = ref.partition("#")
        target = json.loads((DOC_PATH.parent / file).read_text())
        if fragment:
            resolve(target, "#" + fragment)


def test_headers_are_described(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    chain_headers = messages["chain"]["headers"]
    assert chain_headers["required"] == ["Nats-Msg-Id"]
    assert set(chain_headers["properties"]) == {"Nats-Msg-Id", "traceparent"}
    tp = chain_headers["properties"]["traceparent"]["pattern"]
    assert re.match(tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    for name in ("cancel", "signal", "replay", "assignment", "chainCompleted"):
        assert "Nats-Msg-Id" in messages[name]["headers"]["properties"], name


def test_event_types_match_the_event_schema(doc: dict[str, Any]) -> None:
    event_schema = json.loads((SCHEMA_DIR / "event.json").read_text())
    tags = {
        d["properties"]["type"]["enum"][0]
        for d in event_schema["$defs"].values()
        if "type" in d.get("properties", {})
    }
    assert set(doc["components"]["parameters"]["type"]["enum"]) == tags


def test_inline_control_schemas_accept_what_the_client_sends(doc: dict[str, Any]) -> None:
    components = {"components": doc["components"]}

    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **components})

    replay = Replay(
        new_id="r-2", from_step="answer", overrides={"answer": StepOverride(model="gpt-4o")}
    )
    assert not list(validator("Replay").iter_errors(json.loads(encode(replay))))
    assert not list(validator("Cancel").iter_errors(json.loads(encode(Cancel()))))
    assert list(validator("Replay").iter_errors({"new_id": "x", "from_step": "a", "typo": 1}))
