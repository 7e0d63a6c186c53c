"""What the operator commands (`dlq`, `usage`, `top`) share: one connection, no reconnecting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chainyard.contracts import ChainyardError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient


class Unreachable(ChainyardError):
    """NATS could not be reached; the message names the URL without its credentials."""


async def connect_once(
    url: str, creds: str | None, name: str, inbox_prefix: str = "_INBOX"
) -> NatsClient:
    """A connection for one command: two tries, no reconnecting later (a lost server ends the
    command). max_reconnect_attempts=0 would mean "forever" here. A tenant's user connects
    with `_INBOX_<tenant>` (deploy/accounts.conf: its replies come there)."""
    import nats
    from nats.errors import Error as NatsError

    from chainyard.runtime.nats import _fmt_url

    async def quiet(e: Exception) -> None:
        pass  # a failed connect is reported once, by the caller; not once per attempt

    try:
        return await nats.connect(
            url,
            name=name,
            user_credentials=creds,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=quiet,
            inbox_prefix=inbox_prefix,
        )
    except (NatsError, OSError, TimeoutError) as e:
        raise Unreachable(f"cannot reach NATS at {_fmt_url(url)}: {e or type(e).__name__}") from e
