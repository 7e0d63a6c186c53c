"""Crash points for fault tests: `CHAINYARD_FAULT=<point>:<n>` kills the process (exit 137,
no cleanup, like SIGKILL) the n-th time it passes `<point>`. Unset, a check is one comparison.

Points: `after_record` (router: a transition is in KV, its effects not yet published),
`after_publish` (worker: the result event is stored, the work message not yet acked).
"""

from __future__ import annotations

import os

_point, _, _n = os.environ.get("CHAINYARD_FAULT", "").partition(":")
_left = int(_n or 1) if _point else 0


def crash_point(point: str) -> None:
    global _left
    if _point != point:
        return
    _left -= 1
    if _left == 0:
        os._exit(137)
