"""Test-only tools for the fault suite: a tool that blocks on a flag file, so a test can hold a
step inside a worker (to SIGKILL or SIGSTOP it there) and let it go when it wants.

Served with `--tools chaos_tools:tools` (tests/chaos on PYTHONPATH). Files live in the
directory named by the environment variable CY_CHAOS_DIR:
- `hold` present: every call first writes `entered.<key>.<pid>`, then waits for `release`;
- every call writes `done.<key>.<pid>` when it returns.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from chainyard.workers.tools import Tools

tools = Tools()


def _dir() -> Path | None:
    d = os.environ.get("CY_CHAOS_DIR")
    return Path(d) if d else None


@tools.tool
async def gate(key: str) -> dict[str, object]:
    """Return the key; hold while the test's `hold` flag is up."""
    d = _dir()
    pid = os.getpid()
    if d is not None and (d / "hold").exists():
        (d / f"entered.{key}.{pid}").touch()
        while not (d / "release").exists():  # noqa: ASYNC110 - another process sets it
            await asyncio.sleep(0.02)
    if d is not None:
        (d / f"done.{key}.{pid}").touch()
    return {"key": key, "pid": pid}
