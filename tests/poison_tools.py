"""Test-only tool for the poison-work test: a step that takes its worker process down every
time. Served with `--tools poison_tools:tools` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import os

from chainyard.workers.tools import Tools

CRASH_EXIT = 17  # the exit status a worker dies with, so the test tells it from other deaths
tools = Tools()


@tools.tool
def crash(n: int) -> int:
    """Exit the worker process at once, like a segfault in a native library would."""
    os._exit(CRASH_EXIT)
