"""`python -m chainyard.sandbox --port 0`: serve the sandbox and print its URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from . import SandboxConfig, SandboxServer


async def _serve(host: str, port: int, config: SandboxConfig) -> None:
    async with SandboxServer(config, host=host, port=port) as server:
        # One line on stdout, flushed, so a demo script can read the URL from a pipe.
        print(server.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chainyard.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    config = SandboxConfig(
        latency_ms=args.latency_ms, error_rate=args.error_rate, api_key=args.api_key
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
