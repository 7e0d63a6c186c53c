"""Crash points for fault tests: `CHAINYARD_FAULT=<point>:<n>` kills the process (exit 137,
no cleanup, like SIGKILL) the n-th time it passes `<point>`. Unset, a check is one comparison.

Points: `after_record` (router: a transition is in KV, its effects not yet published),
`after_publish` (worker: the result event is stored, the work message not yet acked).
"""

from __future__ import annotations

import itertools
import os

_point, _, _n = os.environ.get("CHAINYARD_FAULT", "").partition(":")
_crash_at = int(_n or 1)
_passes = itertools.count(1)  # passes through `_point`


def crash_point(point: str) -> None:
    if point == _point and next(_passes) == _crash_at:
        os._exit(137)
