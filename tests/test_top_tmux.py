"""`chainyard top` in a real terminal: tmux runs it against a live stack; the test reads the
screen (`tmux capture-pane -p`) until it shows the pools, the tenants, nonzero counts and spend,
sorts a pane, presses q, and sees it exit 0."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from helpers import wait_until
from ops_stack import BIG, FAST, TENANTS, failing, live_stack, provider, waiting  # noqa: F401

from chainyard.runtime.nats import Bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxServer

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)")
SPEND = re.compile(r"spend today \$([0-9.,]+)")


class Tmux:
    """One tmux server of our own (its own socket), one window of `cols` x `rows`."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"cy-top-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            TMUX or "tmux", "-L", self.socket, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, (args, err.decode())
        return out.decode()

    async def start(self, command: str, cols: int = 150, rows: int = 48) -> None:
        await self.run("new-session", "-d", "-s", "top", "-x", str(cols), "-y", str(rows), command)

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", "top")

    async def keys(self, *keys: str) -> None:
        await self.run("send-keys", "-t", "top", *keys)

    async def stop(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            TMUX or "tmux", "-L", self.socket, "kill-server",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await proc.wait()


def spend(screen: str) -> float:
    m = SPEND.search(screen)
    return float(m.group(1).replace(",", "")) if m else 0.0


async def test_top_shows_the_live_stack_and_quits_on_q(
    bus: Bus,
    nats_server: NatsServer,
    provider: SandboxServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    exit_file = tmp_path / "top.exit"
    cmd = (
        f"cd {shlex.quote(os.getcwd())} && stty size > {tmp_path / 'size'} && "
        f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} -m chainyard.cli top "
        f"--nats {nats_server.url}; echo $? > {exit_file}; sleep 30"  # Textual draws on stderr
    )
    tmux = Tmux(tmp_path)
    try:
        async with live_stack(bus, nats_server.url, provider.url, tmp_path) as stack:
            await stack.run_chains(3)
            await stack.submit("acme", waiting("held"))  # running until the stack stops
            await stack.submit("globex", failing("broken"))
            await tmux.start(f"sh -c {shlex.quote(cmd)}")
            last = ""

            async def shows(*words: str) -> bool:
                nonlocal last
                last = await tmux.screen()
                return all(w in last for w in words) and spend(last) > 0

            want = (FAST, BIG, "tool.search", "fast-d", "big-d", *TENANTS, "chains running 1",
                    "boom@tool.search", "broken")  # fmt: skip
            try:
                await wait_until(lambda: shows(*want), 60, "top's screen", interval=0.2)
            except TimeoutError:
                raise AssertionError(f"top's screen never showed {want}:\n{last}") from None
            first = spend(last)
            # while top runs: more chains; the spend on screen rises and the counts follow
            await stack.run_chains(3, first=3)

            async def rose() -> bool:
                # ended today: 6 chains each, and globex's failed one
                ended = {t: re.search(rf"{t}\s+\d+\s+(\d+)\s", last) for t in TENANTS}
                counts = {t: m.group(1) if m else None for t, m in ended.items()}
                return (
                    await shows(*want)
                    and spend(last) > first
                    and counts
                    == {
                        "acme": "6",
                        "globex": "7",
                    }
                )

            try:
                await wait_until(rose, 30, "more spend", interval=0.2)
            except TimeoutError:
                raise AssertionError(f"the spend never rose past {first}:\n{last}") from None
            (tmp_path / "screen.txt").write_text(last)
            await tmux.keys("Tab")
            await tmux.keys("s")
            await tmux.keys("q")
            await wait_until(exit_file.exists, 20, "top to exit after q", interval=0.1)
            assert exit_file.read_text().strip() == "0", await tmux.screen()
    finally:
        await tmux.stop()
    print(last)
