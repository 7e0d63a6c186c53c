"""Docs are tests: every example in README.md, docs/*.md and deploy/README.md runs against a live
stack, and what it prints must be what the doc shows (tests/docs_harness.py says how)."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
import yaml
from docs_harness import (
    DOCS,
    ROOT,
    Block,
    DocError,
    Run,
    check_excerpt,
    check_syntax,
    compare,
    default_expectation,
    parse,
    run_block,
)

from chainyard.demo import demo_config, tools
from chainyard.devstack import DevStack
from chainyard.sandbox import SandboxConfig

RUNS = {"shell", "session", "python", "js", "json"}  # kinds that may need the stack
IDS = [str(d.relative_to(ROOT)) for d in DOCS]


def skip_reason(block: Block, local_run: bool) -> str | None:
    """Why a block is only checked for syntax in this run, or None when it runs."""
    if "skip" in block.marks:
        return block.marks["skip"]
    need = block.marks.get("needs")
    if need == "localmodel":
        return None if local_run else "(needs the local model: the localmodel run)"
    if need and shutil.which(need) is None:
        return f"(no {need} on PATH)"
    if block.kind == "js" and shutil.which("node") is None:
        return "(no node on PATH)"
    return None


def run_doc(doc: Path, run: Run, *, local_run: bool) -> list[str]:
    """Run a doc's blocks in order; return one message per failure (file:line first)."""
    failures: list[str] = []
    blocks = parse(doc)
    printed: str | None = None  # what the last block that ran printed
    for i, block in enumerate(blocks):
        if local_run != (block.marks.get("needs") == "localmodel"):
            continue
        try:
            check_syntax(block)
            if "from" in block.marks:
                check_excerpt(block)
            reason = skip_reason(block, local_run)
            if block.kind == "output":
                command = block.marks["output"].removeprefix("of").strip()
                if command and reason is None:
                    printed = run.sh(run.local(command))
                if printed is not None and reason is None:
                    compare(block, printed)
                printed = None
                continue
            printed = None
            if reason is not None or (
                block.kind not in RUNS | {"toml"} and "file" not in block.marks
            ):
                continue
            if "from" in block.marks and any(
                b.marks.get("from") == block.marks["from"] for b in blocks[i + 1 :]
            ):
                continue  # a file is run once, at its last excerpt
            printed = run_block(block, run)
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            expected = default_expectation(block)
            if expected and not (following and following.kind == "output"):
                compare(expected, printed or "")
        except DocError as e:
            failures.append(str(e) if str(e).startswith(block.where) else f"{block.where}: {e}")
    return failures


def needs_stack(doc: Path) -> bool:
    return any(b.kind in RUNS and skip_reason(b, False) is None for b in parse(doc))


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_doc_blocks_parse(doc: Path) -> None:
    """Without a stack: every mark is known, every block parses, every excerpt is its file's."""
    failures = []
    for block in parse(doc):
        try:
            check_syntax(block)
            if "from" in block.marks:
                check_excerpt(block)
        except DocError as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
async def test_doc_examples_run(doc: Path, tmp_path: Path) -> None:
    """A stack per doc (embedded NATS on a free port, router, the demo's sandbox and tools)."""
    if not needs_stack(doc):
        failures = await asyncio.to_thread(run_doc, doc, Run(tmp_path), local_run=False)
    else:
        config = DevStack(
            demo_config(),
            local_model=False,
            tools=tools,
            sandbox=SandboxConfig(latency_ms=20.0),
            gateway_port=0,
        )
        async with config as dev:
            run = Run(tmp_path, dev.nats_url, dev.gateway_url)
            # The examples block on subprocesses; the stack runs on this loop meanwhile.
            failures = await asyncio.to_thread(run_doc, doc, run, local_run=False)
    assert not failures, "\n\n".join(failures)


def has_local_blocks(doc: Path) -> bool:
    try:
        return any(b.marks.get("needs") == "localmodel" for b in parse(doc))
    except DocError:
        return False  # test_doc_blocks_parse reports it


LOCAL_DOCS = [d for d in DOCS if has_local_blocks(d)]


@pytest.mark.localmodel
@pytest.mark.parametrize("doc", LOCAL_DOCS, ids=[str(d.relative_to(ROOT)) for d in LOCAL_DOCS])
async def test_doc_examples_run_with_the_local_model(doc: Path, tmp_path: Path) -> None:
    """The blocks that need the local model (the demo): they start their own stack."""
    failures = await asyncio.to_thread(run_doc, doc, Run(tmp_path), local_run=True)
    assert not failures, "\n\n".join(failures)


def test_the_harness_fails_on_drift(tmp_path: Path) -> None:
    """A doc whose printed output, exit status or excerpt drifted fails, naming the line; what
    changes from run to run (ids, times, costs, free ports) does not."""
    example = tmp_path / "example.py"
    example.write_text("def f() -> int:\n    return 1\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```sh\necho 'chain demo-01a24f8e93144c467055ea049a: 412 ms, $0.000021'\n```\n\n"
        "<!-- docs-test: output -->\n```\nchain demo-01a2...: 17 ms, $0.000007\n```\n\n"
        "```sh\necho hello\n```\n\n<!-- docs-test: output -->\n```\ngoodbye\n```\n\n"
        "```sh\nexit 3\n```\n\n"
        "```python\nraise SystemExit('boom')\n```\n\n"
        f"<!-- docs-test: from {example} -->\n```python\ndef f() -> int:\n    return 2\n```\n\n"
        '```json\n{"kind": "llm", "id": "a", "model": "m", "mesages": []}\n```\n\n'
        "<!-- docs-test: defaults cache -->\n```toml\n[cache]\nmax_ttl_s = 5.0\n```\n\n"
        '```json\n{"type": "chain.failed", "chain_id": "x", "reasn": "r", "steps": ["..."]}\n```\n'
    )
    (tmp_path / "scratch").mkdir()
    failures = run_doc(doc, Run(tmp_path / "scratch"), local_run=False)
    lines = sorted(int(f.split(":")[1]) for f in failures)
    assert lines == [15, 19, 23, 28, 33, 38, 43], failures
    assert "goodbye" in failures[0] and "hello" in failures[0]


def test_output_matching() -> None:
    assert compare_ok("total: 4448 ms, 151+57 tokens, $0.000023", "total: 9 ms, 1+2 tokens, $0.1")
    assert compare_ok("A: ...", "A: anything at all")
    assert compare_ok("a\n...\nz", "a\nb\nc\nz")
    assert not compare_ok("a\nz", "a\nb\nz")
    assert not compare_ok("done in 3 steps", "done in 4 steps")  # counts are not normalised
    assert compare_ok(
        '{"type": "chain.completed", "cost_usd": 0.1}',
        '{"type": "chain.completed", "cost_usd": 0.2, "x": 1}',
    )
    assert not compare_ok('{"type": "chain.completed"}', '{"type": "chain.failed"}')


def compare_ok(expected: str, actual: str) -> bool:
    try:
        compare(Block(ROOT / "README.md", 1, "", expected + "\n"), actual)
    except DocError:
        return False
    return True


def test_deploy_readme_tenant_block_is_the_one_in_accounts_conf() -> None:
    """deploy/README.md's "Add a tenant" block shows tenant B's permissions as the file has them."""
    shown = next(b for b in parse(ROOT / "deploy" / "README.md") if "user: tenant-B" in b.text)
    conf = (ROOT / "deploy" / "accounts.conf").read_text()
    block = conf[conf.index("user: tenant-B") :]
    block = block[: block.find("user:", 5) if "user:" in block[5:] else len(block)]
    quoted = re.compile(r'"([^"]+)"')
    assert set(quoted.findall(shown.text)) == set(quoted.findall(block))


def test_compose_nats_runs_with_deploy_nats_conf() -> None:
    """docs/RELIABILITY.md calls `sync_interval: always` required: compose's NATS must have it."""
    nats = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["nats"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in nats["volumes"] if ":" in v}
    conf = nats["command"][nats["command"].index("-c") + 1]
    assert mounted["./nats.conf"] == conf
    assert re.search(
        r"^\s*sync_interval:\s*always", (ROOT / "deploy" / "nats.conf").read_text(), re.M
    )
