"""A `chainyard dev` process for the CLI tests (test_cli, test_cli_answers): started as a user
starts it, on free ports, and the module-scoped `dev` fixture that shares one per test module."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import python_env

CLI = [sys.executable, "-m", "chainyard.cli"]
URL_LINE = re.compile(r"chainyard dev: NATS at (nats://\S+)")
HINT_LINE = re.compile(r"(clients reach it|point clients at it).*\n")  # printed after the URL


class Dev:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.out = ""  # what it printed on stdout up to its URL and hints


def start_dev(log: Path, *args: str, timeout: float = 60.0) -> Dev:
    """`chainyard dev --no-local ARGS`; returns once it printed its NATS URL (read from its
    stdout, which is kept in `Dev.out`). On any free port unless ARGS name one: a test never
    takes 4222 from a stack a person is running."""
    err = log.open("wb")
    args = args or ("--port", "0", "--gateway-port", "0")
    proc = subprocess.Popen(
        [*CLI, "dev", "--no-local", *args], stdout=subprocess.PIPE, stderr=err, env=python_env()
    )
    err.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"dev stack did not report its URL; stdout={buf!r}\n{log.read_text()}"
            )
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            text = buf.decode(errors="replace")
            if (m := URL_LINE.search(text)) and HINT_LINE.search(text):
                dev = Dev(proc, m.group(1), log)
                dev.out = text
                return dev


def stop_dev(dev: Dev, timeout: float = 30.0) -> int:
    if dev.proc.poll() is None:
        dev.proc.send_signal(signal.SIGTERM)
    try:
        return dev.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        dev.proc.kill()
        dev.proc.wait()
        raise


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    d = start_dev(tmp_path_factory.mktemp("dev") / "dev.log")
    try:
        yield d
    finally:
        stop_dev(d)
