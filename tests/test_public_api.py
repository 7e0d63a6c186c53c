"""The curated public API (`chainyard.__all__`) and the one exception tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import chainyard
from chainyard.contracts import ChainyardError, load_config
from chainyard.dlq import DlqError
from chainyard.runtime.server import ServerError


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in chainyard.__all__:
        assert getattr(chainyard, name) is not None, name
    assert {"Client", "Chain", "LlmStep", "ToolStep", "Tools", "ChainyardError"} <= set(
        chainyard.__all__
    )
    assert set(chainyard.__all__) <= set(dir(chainyard))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = chainyard.nope  # type: ignore[attr-defined]


def test_contracts_alone_pull_in_no_client_or_worker() -> None:
    """A publisher in a hurry imports the contracts only: no NATS client, no worker runtime."""
    code = (
        "import sys, chainyard.contracts;"
        "print(sorted(m for m in ('nats', 'chainyard.client', 'chainyard.workers', 'httpx')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_exception_base() -> None:
    errors = [
        chainyard.ConfigError,
        chainyard.ChainTimeout,
        chainyard.NoSuchChain,
        chainyard.ProviderError,
        ServerError,
        DlqError,
    ]
    assert all(issubclass(e, ChainyardError) for e in errors)
    assert issubclass(chainyard.ChainTimeout, TimeoutError)  # callers catching TimeoutError
    assert issubclass(chainyard.ConfigError, ValueError)


def test_a_bad_config_raises_config_error_naming_the_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[pools]]\nname = "p"\nslots = "many"\n')
    with pytest.raises(chainyard.ConfigError) as e:
        load_config(cfg)
    assert str(cfg) in str(e.value) and "$.pools[0].slots" in str(e.value)
