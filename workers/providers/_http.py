"""The HTTP client every adapter uses: the one place where the client library is chosen."""

from __future__ import annotations

import httpx


def new_client(
    base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 600.0
) -> httpx.AsyncClient:
    """An httpx-API client for one provider base URL, sized for thousands of concurrent calls."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
    )
