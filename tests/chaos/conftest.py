"""The fault suite's fixtures; its summary lives in chaos_summary.py.

Every scenario ends with `await ledger.audit(...)` (or `stack.audit(ledger)`), which reads the
event log, KV and the DLQ, checks them against what the scenario's submitter had accepted
(chainyard.ledger), records the result and fails the test on any lost, duplicated or unexpected
item. At the end of the session one line per scenario is printed, then

    scenarios=N failed=F lost=L duplicated=D unexpected=U routers=2-3 workers=3-4

where a scenario that failed, errored or was stopped by pytest-timeout counts in `failed`.

`CHAOS_SHORT=1` (make chaos-short) runs the same scenarios with smaller loads and shorter
outages. The last run's figures are written to .chainyard/chaos-last.json (chaos-short.json).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_summary
from chaosharness import ROOT, SHORT, Ledger, Load, Procs, Stack, write_config

DEPLOY = ROOT / "deploy"


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return Ledger(request.node.nodeid)


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    """One node with the recommended settings (deploy/nats.conf: sync_interval always)."""
    async with NatsServer(config_file=DEPLOY / "nats.conf") as server:
        yield server


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(SandboxConfig(capture=0)) as s:
        yield s


@pytest.fixture
async def stack(
    nats_server: NatsServer, sandbox: SandboxServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """NATS, the sandbox provider, a config of two pools (overridable by
    @pytest.mark.chaos_config(...)), the bus of the test, and an empty process registry.
    Processes are killed on the way out."""
    marker = request.node.get_closest_marker("chaos_config")
    kw = {"pools": 2, **(marker.kwargs if marker else {})}
    cfg = write_config(tmp_path / "chainyard.toml", sandbox.url, **kw)
    from chainyard.contracts import load_config

    topology = load_config(cfg).topology
    flags = tmp_path / "flags"
    flags.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    bus = await open_bus(nats_server.url, name="chaos-test", topology=topology)
    procs = Procs(nats_server.url, cfg, logs, env={"CY_CHAOS_DIR": str(flags)})
    try:
        yield Stack(nats_server, sandbox, bus, procs, Load(bus.js, topology=topology), flags, cfg)
    finally:
        await procs.close()
        await bus.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos_config(**kw): chaos config file overrides")
    chaos_summary.start_session(SHORT, ROOT)


# The summary's hooks: collection (the timeout method), each report, the terminal summary.
pytest_collection_modifyitems = chaos_summary.pytest_collection_modifyitems
pytest_runtest_logstart = chaos_summary.pytest_runtest_logstart
pytest_runtest_logreport = chaos_summary.pytest_runtest_logreport
pytest_terminal_summary = chaos_summary.pytest_terminal_summary
