"""A small deterministic YAML emitter: block style, and every scalar safe to read back.

The AsyncAPI document (asyncapi_export.py) is written with it, so the file is byte-stable across
PyYAML versions and diffs show only real changes.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z$][A-Za-z0-9_$./{}<>()\-]*(?: [A-Za-z0-9_$./{}<>()\-]+)*$")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted one
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _block(value: Any) -> bool:
    """Multi-line text goes out as a literal block, when it reads back exactly."""
    return (
        isinstance(value, str)
        and "\n" in value
        and not value[0].isspace()
        and not value.endswith(("\n", " "))
        and all(not line.endswith((" ", "\t")) for line in value.split("\n"))
        and all(ch == "\n" or ch == "\t" or ch.isprintable() for ch in value)
    )


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, v in value.items():
            k = _scalar(str(key))
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:")
                out.extend(_lines(v, indent + 2))
            elif _block(v):
                out.append(f"{pad}{k}: |-")
                out.extend(f"{pad}  {line}" if line else "" for line in v.split("\n"))
            else:
                out.append(f"{pad}{k}: {_inline(v)}")
        return out
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = _lines(item, indent + 2)
                inner[0] = f"{pad}- {inner[0][indent + 2 :]}"
                out.extend(inner)
            else:
                out.append(f"{pad}- {_inline(item)}")
        return out
    return [pad + _inline(value)]


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(value: Any) -> str:
    return "\n".join(_lines(value, 0)) + "\n"
