"""The fault suite's summary: one line per scenario, then a total that leaves none out.

A scenario is a test that uses the `ledger` fixture. Its outcome comes from pytest's own reports
(setup, call, teardown), not from the ledger alone, so a scenario that fails before its audit,
errors, or is stopped by pytest-timeout is counted as failed. Every scenario runs with
pytest-timeout's `signal` method: the timeout fails the test and the session goes on to print
this summary (the `thread` method ends the process without one). The figures are also written
to .chainyard/chaos-{last,short}.json before each scenario starts and after it ends, so even a
session that is killed leaves a file that counts the scenario it was in as failed.

The hooks at the bottom are imported by tests/chaos/conftest.py; the rest is plain data and
functions (tests/chaos/test_chaos_summary.py tests them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from chainyard.ledger import Report

FAILED = ("failed", "error", "timeout", "running", "unaudited")
USERS_DEPLOYMENT = {"router": 2, "worker": 3}  # the least every scenario should run


class Counted(Protocol):
    """What a scenario's process registry tells the summary (chaosharness.Procs)."""

    peak: dict[str, int]


@dataclass
class Scenario:
    nodeid: str
    outcome: str = "running"  # passed | failed | error | timeout | skipped | running | unaudited
    secs: float = 0.0
    why: str = ""  # the first line of what went wrong
    reports: list[Report] = field(default_factory=list)
    procs: list[Counted] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.reports:
            return ",".join(r.scenario for r in self.reports)
        return self.nodeid.split("::")[-1].removeprefix("test_")

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED or any(not r.ok for r in self.reports)

    def peak(self, role: str) -> int:
        """The most processes of `role` ("router" or "worker") running at once."""
        return max((p.peak.get(role, 0) for p in self.procs), default=0)

    def line(self) -> str:
        counts = f"routers={self.peak('router')} workers={self.peak('worker')}"
        tail = f"{counts} secs={self.secs:.1f}"
        if self.outcome != "passed":
            tail += f" {self.outcome.upper()}" + (f": {self.why}" if self.why else "")
        if not self.reports:
            return f"{self.name}: no ledger {tail}"
        return "\n".join(f"{r.line()} {tail}" for r in self.reports)


def _span(values: Iterable[int]) -> str:
    vs = sorted(set(values))
    if not vs:
        return "0"
    return str(vs[0]) if len(vs) == 1 else f"{vs[0]}-{vs[-1]}"


def totals(scenarios: Iterable[Scenario]) -> dict[str, Any]:
    ran = [s for s in scenarios if s.outcome != "skipped"]
    return {
        "scenarios": len(ran),
        "failed": sum(s.failed for s in ran),
        "lost": sum(len(r.lost) for s in ran for r in s.reports),
        "duplicated": sum(len(r.duplicated) for s in ran for r in s.reports),
        "unexpected": sum(len(r.unexpected) for s in ran for r in s.reports),
        # a scenario still running (the file written mid-session) has started nothing yet
        "routers": _span(s.peak("router") for s in ran if s.outcome != "running"),
        "workers": _span(s.peak("worker") for s in ran if s.outcome != "running"),
        "skipped": sum(s.outcome == "skipped" for s in scenarios),
    }


def summary_line(scenarios: Iterable[Scenario]) -> str:
    t = totals(scenarios)
    return (
        f"scenarios={t['scenarios']} failed={t['failed']} lost={t['lost']} "
        f"duplicated={t['duplicated']} unexpected={t['unexpected']} "
        f"routers={t['routers']} workers={t['workers']}"
        + (f" skipped={t['skipped']}" if t["skipped"] else "")
    )


def below_users_deployment(scenarios: Iterable[Scenario]) -> list[str]:
    """Scenarios that ran fewer routers or workers than the deployment users run."""
    return [
        s.name
        for s in scenarios
        if s.outcome != "skipped" and any(s.peak(k) < v for k, v in USERS_DEPLOYMENT.items())
    ]


def outcome_of(report: pytest.TestReport, current: str) -> tuple[str, str]:
    """Fold one phase's report into a scenario's outcome; returns (outcome, why)."""
    if report.failed:
        text = str(report.longrepr or "")
        why = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")), "")
        why = why[:200]
        if (
            "Timeout (>" in text
        ):  # pytest-timeout's message: "Timeout (>300.0s) from pytest-timeout."
            return "timeout", why or "stopped by pytest-timeout"
        if report.when == "call":
            return "failed", why
        return ("error" if current in ("running", "passed") else current), why
    if report.skipped and report.when in ("setup", "call"):
        return "skipped", ""
    if report.when == "call" and report.passed:
        return "passed", ""
    return current, ""


@dataclass
class Session:
    short: bool
    path: Path
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    current: Scenario | None = None
    collected: set[str] = field(default_factory=set)  # node ids of the scenarios

    def start(self, nodeid: str) -> Scenario:
        self.current = self.scenarios[nodeid] = Scenario(nodeid)
        self.save()
        return self.current

    def record(self, report: pytest.TestReport) -> None:
        s = self.scenarios.get(report.nodeid)
        if s is None:
            return
        s.secs += report.duration
        outcome, why = outcome_of(report, s.outcome)
        if outcome != s.outcome:
            s.outcome, s.why = outcome, why or s.why
        if report.when == "teardown":
            if s.outcome == "passed" and not s.reports:
                s.outcome, s.why = "unaudited", "the scenario never reached its ledger audit"
            self.current = None
            self.save()

    def save(self) -> None:
        ss = list(self.scenarios.values())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "short": self.short,
                    "summary": summary_line(ss),
                    "totals": totals(ss),
                    "scenarios": [
                        {
                            "scenario": s.name,
                            "nodeid": s.nodeid,
                            "outcome": s.outcome,
                            "why": s.why,
                            "secs": round(s.secs, 1),
                            "routers": s.peak("router"),
                            "workers": s.peak("worker"),
                            "lines": s.line().splitlines(),
                            "chains": sum(r.accepted for r in s.reports),
                            "lost": [x for r in s.reports for x in r.lost][:20],
                            "duplicated": [x for r in s.reports for x in r.duplicated][:20],
                            "unexpected": [x for r in s.reports for x in r.unexpected][:20],
                            "notes": [r.notes for r in s.reports],
                        }
                        for s in ss
                    ],
                },
                indent=2,
            )
        )
        os.replace(tmp, self.path)


SESSION: Session | None = None


def session() -> Session | None:
    return SESSION


def start_session(short: bool, root: Path) -> Session:
    global SESSION
    name = "chaos-short.json" if short else "chaos-last.json"
    SESSION = Session(short, root / ".chainyard" / name)
    return SESSION


# -- hooks (imported by conftest.py) ---------------------------------------------------------


def is_scenario(item: pytest.Item) -> bool:
    return "ledger" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not is_scenario(item):
            continue
        if SESSION is not None:
            SESSION.collected.add(item.nodeid)
        # The signal method: a timeout fails this test, and the session prints its summary.
        mark = item.get_closest_marker("timeout")
        limit = (mark.args[0] if mark.args else mark.kwargs.get("timeout")) if mark else None
        item.add_marker(pytest.mark.timeout(limit, method="signal"), append=False)


def pytest_runtest_logstart(nodeid: str) -> None:
    if SESSION is not None and nodeid in SESSION.collected:
        SESSION.start(nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if SESSION is not None:
        SESSION.record(report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SESSION is None or not SESSION.scenarios:
        return
    tr = terminalreporter
    ss = list(SESSION.scenarios.values())
    tr.section(f"chaos ledger ({'short' if SESSION.short else 'full'})")
    for s in ss:
        for ln in s.line().splitlines():
            tr.write_line(ln)
    SESSION.save()
    if small := below_users_deployment(ss):
        tr.write_line(f"fewer than 2 routers or 3 workers: {', '.join(small)}")
    tr.write_line(summary_line(ss))
