"""Entry point for the fault suite's service processes: the chainyard CLI with crash hooks.

`python -m chaos_hooks router|worker ...` is `python -m chainyard.cli ...`, plus, when the
environment asks for it, a SIGKILL at one precise point of the delivery discipline. A hook fires
once per arming: the test creates a flag file, the process that claims it (unlink wins) dies.

- CY_CHAOS_KILL_AFTER_PUBLISH=<dir>: a worker dies after its result event was stored and
  before it acks the work message (flag `<dir>/kill-after-publish`).
- CY_CHAOS_KILL_AFTER_CAS=<dir>: the router dies after it recorded a transition in KV and
  before it publishes the effects (next steps, chain events) (flag `<dir>/kill-after-cas`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def _claim(flag: Path) -> bool:
    try:
        flag.unlink()
    except FileNotFoundError:
        return False
    return True


def _die(note: Path) -> None:
    note.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    if pub_dir := os.environ.get("CY_CHAOS_KILL_AFTER_PUBLISH"):
        from chainyard.workers.runtime import Worker

        publish = Worker._publish

        async def publish_then_maybe_die(self: Worker, ev: Any) -> None:
            await publish(self, ev)
            if _claim(Path(pub_dir) / "kill-after-publish"):
                _die(Path(pub_dir) / f"killed-after-publish.{ev.chain_id}.{ev.step_id}")

        Worker._publish = publish_then_maybe_die  # type: ignore[method-assign]

    if cas_dir := os.environ.get("CY_CHAOS_KILL_AFTER_CAS"):
        from chainyard.router.engine import Router

        perform = Router._perform

        async def maybe_die_then_perform(self: Router, outcome: Any) -> None:
            if outcome.dispatch and _claim(Path(cas_dir) / "kill-after-cas"):
                _die(Path(cas_dir) / f"killed-after-cas.{outcome.state.chain.id}")
            await perform(self, outcome)

        Router._perform = maybe_die_then_perform  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from chainyard.cli import main

    sys.exit(main())
