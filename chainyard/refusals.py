"""Permission refusals: a call the connection's NATS user may not make fails at once, by name.

The server answers a publish or a subscription its user may not make with an asynchronous
`-ERR 'Permissions Violation for Publish to "<subject>"'` (or `Subscription to`), which nats-py
hands to the connection's error callback, lowercased, and nothing else: the refused publish
waits out its JetStream timeout and the refused subscription stays silent, so a caller waiting
for a chain's answer would wait until its deadline. `Refusals.saw` is that error callback
(`runtime.nats.connect(on_error=...)`, which `Client.connect` wires); a wait inside
`Refusals.watching(subjects)` then ends with `PermissionDenied` as soon as a refusal names one
of its subjects (`listening` calls back instead, for a wait that is a queue's).
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
    lacks a permission. The message is the server's; `subject` is the refused one (lowercased,
    as nats-py passes the server's words on)."""

    def __init__(self, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class Refusals:
    """The permission refusals the server reported on one connection."""

    RECENT_S = 30.0  # how long `recent` remembers the last one

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: tuple[float, str] | None = None  # when, and the server's words
        self._waiting: dict[str, set[_Listen]] = {}  # by lowercased subject

    def saw(self, e: Exception) -> None:
        """The connection's error callback: records a refusal and fails the waits it names."""
        text = str(e)
        if _REFUSED not in text.lower():
            return
        self.last = (self.clock(), text)
        if (named := _SUBJECT.search(text)) is None:
            return
        for waiting in self._waiting.pop(named[1].lower(), set()):
            waiting.refuse(PermissionDenied(text, named[1].lower()))

    def recent(self) -> str | None:
        """The last refusal, if within RECENT_S: why a timed-out call most likely failed."""
        if self.last is not None and self.clock() - self.last[0] <= self.RECENT_S:
            return self.last[1]
        return None

    def watching(self, subjects: Iterable[str]) -> _Watch:
        """`with refusals.watching([...]):` around a task's publishes and subscriptions on
        `subjects` and its wait for their answer: a refusal ends the wait."""
        return _Watch(self, subjects)

    def listening(
        self, subjects: Iterable[str], on_refused: Callable[[PermissionDenied], None]
    ) -> _Listen:
        """`with refusals.listening([...], callback):` (or its `open()` and `close()`) for a wait
        that is not one task's (a generator's queue): `on_refused` gets the error, once."""
        return _Listen(self, subjects, on_refused)


class _Listen:
    def __init__(
        self,
        refusals: Refusals,
        subjects: Iterable[str],
        on_refused: Callable[[PermissionDenied], None] | None = None,
    ) -> None:
        self.refusals = refusals
        self.subjects = tuple(s.lower() for s in subjects)
        self.on_refused = on_refused
        self.refused: PermissionDenied | None = None

    def refuse(self, error: PermissionDenied) -> None:
        if self.refused is None and self.on_refused is not None:
            self.refused = error
            self.on_refused(error)

    def open(self) -> None:
        for subject in self.subjects:
            self.refusals._waiting.setdefault(subject, set()).add(self)

    def close(self) -> None:
        waiting = self.refusals._waiting
        for subject in self.subjects:
            if (listening := waiting.get(subject)) is not None:
                listening.discard(self)
                if not listening:
                    del waiting[subject]

    def __enter__(self) -> None:
        self.open()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Watch(_Listen):
    """Like `asyncio.timeout`: a refusal cancels the waiting task, and the cancellation leaves
    the block as `PermissionDenied` (any other cancellation passes through unchanged)."""

    task: asyncio.Task[object] | None = None

    def refuse(self, error: PermissionDenied) -> None:
        # The callback runs in nats-py's reading task, never in the waiting one, so the task
        # is suspended inside the block and the cancellation is raised there.
        if self.refused is None and self.task is not None and not self.task.done():
            self.refused = error
            self.task.cancel()

    def __enter__(self) -> None:
        self.task = asyncio.current_task()
        super().__enter__()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(et, e, tb)
        if self.refused is None or self.task is None:
            return
        if self.task.uncancel() == 0 and et is not None and issubclass(et, asyncio.CancelledError):
            raise self.refused from None
