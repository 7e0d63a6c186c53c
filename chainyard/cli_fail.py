"""How a command fails: one line `chainyard <verb>: <message>` and an exit code (`Fail`), and
what it says when NATS cannot be reached. Its own module so that the verbs in other modules
raise the class `cli.main` catches, also when it runs as `python -m chainyard.cli` (there that
module is `__main__`, a second copy of its classes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class Fail(Exception):
    """An expected failure: printed as one line `chainyard <verb>: <message>`, exit `code`.

    Exit codes: 1 the answer is no (a chain failed, was cancelled or rejected; a control was
    refused; no such chain; NATS refused the user a permission), 2 the command cannot be done
    as given (usage, config, tools, input file), 3 a wait timed out, 4 NATS unreachable, or
    answered with an error."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _ConnectLog(logging.Filter):
    """While connecting, the NATS client logs each failed attempt: keep the last error for our
    own message and log it once (`say`: a service says it keeps trying), not twice a second."""

    def __init__(self, url: str, say: bool) -> None:
        super().__init__()
        self.url, self.say, self.last = url, say, ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.last = record.getMessage().removeprefix("nats error: ")
        if not self.say:
            return False
        self.say = False
        record.msg = (
            "cannot reach NATS at %s (%s); retrying until it is up (SIGTERM or Ctrl-C stops)"
        )
        record.args = (_safe_url(self.url), self.last)
        return True


@contextlib.contextmanager
def _connecting(url: str, *, say: bool) -> Iterator[_ConnectLog]:
    quiet = _ConnectLog(url, say)
    nats_log = logging.getLogger("chainyard.nats")
    nats_log.addFilter(quiet)
    try:
        yield quiet
    finally:
        nats_log.removeFilter(quiet)


def _unreachable(url: str, why: str) -> Fail:
    return Fail(
        f"cannot reach NATS at {_safe_url(url)}{f' ({why})' if why else ''}: start it with "
        "`chainyard dev` (it prints the URL to use), or point --nats or CHAINYARD_NATS at yours",
        4,
    )


def _safe_url(url: str) -> str:
    from chainyard.runtime.nats import _fmt_url

    return _fmt_url(url)
