"""The summary never leaves a scenario out: a failed, errored, unaudited or timed-out scenario
is counted, and the line is printed even when pytest-timeout stops a test (a real pytest run in
a subprocess, with the suite's own hooks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import chaos_summary
from chaos_summary import Scenario, summary_line

from chainyard.ledger import Report

HERE = Path(__file__).resolve().parent


class _Procs:
    def __init__(self, routers: int, workers: int) -> None:
        self.peak = {"router": routers, "worker": workers}


def _scenario(outcome: str, *, lost: int = 0, routers: int = 2, workers: int = 3) -> Scenario:
    s = Scenario(f"t.py::test_{outcome}", outcome=outcome, procs=[_Procs(routers, workers)])
    if outcome != "timeout":
        s.reports.append(Report(scenario=outcome, lost=[f"x{i}" for i in range(lost)]))
    return s


def test_summary_counts_every_scenario() -> None:
    ss = [
        _scenario("passed"),
        _scenario("passed", lost=2, routers=3),
        _scenario("timeout", workers=4),
        _scenario("skipped", routers=1),
    ]
    # A passed scenario whose ledger found something is failed too; a skipped one is not run.
    assert summary_line(ss) == (
        "scenarios=3 failed=2 lost=2 duplicated=0 unexpected=0 routers=2-3 workers=3-4 skipped=1"
    )
    assert "TIMEOUT" in ss[2].line() and "no ledger" in ss[2].line()
    assert chaos_summary.below_users_deployment(ss) == []
    ss.append(_scenario("passed", routers=1, workers=2))
    assert chaos_summary.below_users_deployment(ss) == ["passed"]


CONFTEST = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
import chaos_summary
from chaos_summary import (
    pytest_collection_modifyitems, pytest_runtest_logreport, pytest_runtest_logstart,
    pytest_terminal_summary,
)

def pytest_configure(config):
    chaos_summary.start_session(False, Path(__file__).parent)
"""

SCENARIOS = """
import asyncio
import pytest
import chaos_summary
from chainyard.ledger import Report

class Procs:
    peak = {"router": 2, "worker": 3}

@pytest.fixture
async def ledger():
    chaos_summary.session().current.procs.append(Procs())
    yield None  # an async fixture with a teardown, as the real stack is

def audit(name, lost=0):
    r = Report(scenario=name, lost=["x"] * lost)
    chaos_summary.session().current.reports.append(r)
    assert r.ok, r.details()

def test_clean(ledger):
    audit("clean")

def test_lost(ledger):
    audit("lost", lost=1)

def test_fails_before_audit(ledger):
    raise AssertionError("the load never started")

async def test_hangs(ledger):
    await asyncio.sleep(600)

def test_never_audits(ledger):
    pass

@pytest.mark.skip(reason="full run only")
def test_skipped(ledger):
    pass

def test_not_a_scenario():
    pass
"""


def test_summary_printed_when_a_scenario_times_out(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_scenarios.py").write_text(textwrap.dedent(SCENARIOS))
    # timeout_method=thread would end the process without a summary: the suite's marker
    # overrides it for scenarios.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "timeout=3",
            "-o",
            "timeout_method=thread",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert (
        "scenarios=5 failed=4 lost=1 duplicated=0 unexpected=0 routers=2 workers=3 skipped=1"
        in text
    ), text
    assert "hangs: no ledger routers=2 workers=3" in text and "TIMEOUT" in text, text
    assert "never_audits: no ledger" in text and "UNAUDITED" in text, text
    saved = (tmp_path / ".chainyard" / "chaos-last.json").read_text()
    assert '"failed": 4' in saved
    assert chaos_summary.FAILED  # the module the subprocess used is this one
