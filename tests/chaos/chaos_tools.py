"""Test-only tools for the fault suite.

Served with `--tools chaos_tools:tools` (tests/chaos on PYTHONPATH), or `chaos_tools:poison`
for the tool that kills its worker. Files live in the directory named by the environment
variable CY_CHAOS_DIR:
- gate: with `hold` present, every call first writes `entered.<key>.<pid>`, then waits for
  `release`; every call writes `done.<key>.<pid>` when it returns;
- nap: writes `entered.<key>.<pid>`, sleeps `ms`, writes `done.<key>.<pid>`;
- crash (registry `poison`): writes `crashed.<key>.<pid>` and ends its worker process at once,
  every time: a poison step.
Each returns its `key` and `note` (which a chain fills with a reference), so a chain's final
text is known in advance.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from chainyard.workers.tools import Tools

tools = Tools()
poison = Tools()


def _dir() -> Path | None:
    d = os.environ.get("CY_CHAOS_DIR")
    return Path(d) if d else None


def _touch(name: str) -> None:
    if (d := _dir()) is not None:
        (d / name).touch()


@tools.tool
async def gate(key: str, note: str = "") -> dict[str, object]:
    """Return the key and note; hold while the test's `hold` flag is up."""
    d = _dir()
    pid = os.getpid()
    if d is not None and (d / "hold").exists():
        _touch(f"entered.{key}.{pid}")
        while not (d / "release").exists():  # noqa: ASYNC110 - another process sets it
            await asyncio.sleep(0.02)
    _touch(f"done.{key}.{pid}")
    return {"key": key, "note": note, "pid": pid}


@tools.tool
async def nap(key: str, ms: int = 0, note: str = "") -> dict[str, object]:
    """Return the key and note after `ms` milliseconds."""
    _touch(f"entered.{key}.{os.getpid()}")
    await asyncio.sleep(ms / 1000)
    _touch(f"done.{key}.{os.getpid()}")
    return {"key": key, "note": note}


@poison.tool
async def crash(key: str, note: str = "") -> dict[str, object]:
    """End this worker process, as a tool that segfaults or runs out of memory would."""
    _touch(f"crashed.{key}.{os.getpid()}")
    os._exit(17)
