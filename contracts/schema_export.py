"""JSON Schema export: one file per top-level message, for clients in other languages."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from ._chain import Chain
from ._messages import Assignment, Event, Heartbeat
from ._state import ChainState

TOP_LEVEL: dict[str, Any] = {
    "chain": Chain,
    "assignment": Assignment,
    "event": Event,
    "heartbeat": Heartbeat,
    "chain-state": ChainState,
}

SCHEMA_DIR = Path(__file__).parent / "schema"


def clean_docs(value: Any) -> Any:
    """Descriptions (docstrings) dedented the same way whatever msgspec's version: 0.23 cleans
    them, older releases kept a docstring's continuation indent."""
    if isinstance(value, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else clean_docs(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [clean_docs(v) for v in value]
    return value


def render() -> dict[str, str]:
    """File name -> JSON text, deterministic so a test can compare with the checked-in files."""
    out = {}
    for name, tp in TOP_LEVEL.items():
        schema = clean_docs(msgspec.json.schema(tp))
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://chainyard.dev/schema/{name}.json",
            "title": name,
            **schema,
        }
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render().items():
        path = directory / fname
        path.write_text(text)
        written.append(path)
    return written
