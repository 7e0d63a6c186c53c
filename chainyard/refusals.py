"""Permission refusals: a call the connection's NATS user may not make fails at once, by name.

The server answers a publish or a subscription its user may not make with an asynchronous
`-ERR 'Permissions Violation for Publish to "<subject>"'` (or `Subscription to`), which nats-py
hands to the connection's error callback, lowercased, and nothing else: the refused publish
waits out its JetStream timeout and the refused subscription stays silent, so a caller waiting
for a chain's answer would wait until its deadline. `Refusals.saw` is that error callback
(`runtime.nats.connect(on_error=...)`, which `Client.connect` wires); a wait inside
`Refusals.watching(subjects)` then ends with `PermissionDenied` as soon as a refusal names one
of its subjects.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from types import TracebackType

from chainyard.contracts import ChainyardError

_REFUSED = "permissions violation"
_SUBJECT = re.compile(r'\bto "([^"]+)"')


class PermissionDenied(ChainyardError):
    """The NATS server refused a publish or subscription the call needs: the connection's user
    lacks a permission. The message is the server's, naming the subject."""


class Refusals:
    """The permission refusals the server reported on one connection."""

    RECENT_S = 30.0  # how long `recent` remembers the last one

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: tuple[float, str] | None = None  # when, and the server's words
        self._waiting: dict[str, set[_Watch]] = {}  # by lowercased subject

    def saw(self, e: Exception) -> None:
        """The connection's error callback: records a refusal and fails the waits it names."""
        text = str(e)
        if _REFUSED not in text.lower():
            return
        self.last = (self.clock(), text)
        if (named := _SUBJECT.search(text)) is None:
            return
        for watch in self._waiting.pop(named[1].lower(), set()):
            watch.refuse(text)

    def recent(self) -> str | None:
        """The last refusal, if within RECENT_S: why a timed-out call most likely failed."""
        if self.last is not None and self.clock() - self.last[0] <= self.RECENT_S:
            return self.last[1]
        return None

    def watching(self, subjects: Iterable[str]) -> _Watch:
        """`with refusals.watching([...]):` around a task's publishes and subscriptions on
        `subjects` and its wait for their answer."""
        return _Watch(self, tuple(s.lower() for s in subjects))


class _Watch:
    """Like `asyncio.timeout`: a refusal cancels the waiting task, and the cancellation leaves
    the block as `PermissionDenied` (any other cancellation passes through unchanged)."""

    def __init__(self, refusals: Refusals, subjects: tuple[str, ...]) -> None:
        self.refusals = refusals
        self.subjects = subjects
        self.task: asyncio.Task[object] | None = None
        self.refused: str | None = None

    def refuse(self, text: str) -> None:
        # The callback runs in nats-py's reading task, never in the waiting one, so the task
        # is suspended inside the block and the cancellation is raised there.
        if self.refused is None and self.task is not None and not self.task.done():
            self.refused = text
            self.task.cancel()

    def __enter__(self) -> None:
        self.task = asyncio.current_task()
        for subject in self.subjects:
            self.refusals._waiting.setdefault(subject, set()).add(self)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        waiting = self.refusals._waiting
        for subject in self.subjects:
            if (watches := waiting.get(subject)) is not None:
                watches.discard(self)
                if not watches:
                    del waiting[subject]
        if self.refused is None or self.task is None:
            return
        if self.task.uncancel() == 0 and et is not None and issubclass(et, asyncio.CancelledError):
            raise PermissionDenied(self.refused) from None
