"""Docs are tests: the code blocks of the Markdown docs, parsed, run and compared.

A block is a fenced code block. An HTML comment right above its fence (invisible on GitHub)
says what to do with it, `;` between several:

    <!-- docs-test: skip (needs docker) -->   check the syntax only, and say why
    <!-- docs-test: needs nats -->            run only where a `nats` binary is on PATH
    <!-- docs-test: needs localmodel -->      run only in the local-model run (`make test`)
    <!-- docs-test: file chain.json -->       also save the block as this file, for later blocks
    <!-- docs-test: output -->                the block is what the previous block printed
    <!-- docs-test: output of CMD -->         ... what the shell command CMD prints
    <!-- docs-test: from PATH -->             the block is an excerpt of PATH, which is run instead
    <!-- docs-test: vary a|b c|d -->          (with output) `a` and `b` may stand for each other
    <!-- docs-test: defaults cache -->         (toml) the keys of table `cache` (`.`: the top
                                              level; several, space-separated) are the defaults

Without a comment, by language: `sh`/`bash` run as a bash script (`set -e`); a block whose first
line starts with `$ ` is a terminal session (each command runs, what it printed is compared);
`python` runs as a script (top-level `await` through asyncio); `js` runs with node; `json`: a
chain is submitted (`chainyard submit --wait`) and must complete unless an output block says
otherwise, a step or an event is validated against the contracts (an event abridged with a
`"..."` list item: each field shown must be the event's, of its type), anything else is parsed;
`toml` is loaded as a chainyard configuration; `yaml` is parsed; a block without a language
is text. Examples connect to `nats://127.0.0.1:4222` (what `chainyard dev` prints): the harness
replaces that URL with its own stack's and sets `CHAINYARD_NATS` and `NATS_URL` to it.

Printed output is compared after normalising what changes from run to run (ids, times,
durations, costs and other decimals, token counts, runs of spaces); `...` in the doc matches
anything within a line, and a line of its own `...` any number of lines. Expected JSON is a
subset: the keys shown must be there with those values (a float matches any float).
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import msgspec.inspect as mi
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy" / "README.md",
]
DOC_URLS = ("nats://127.0.0.1:4222", "nats://localhost:4222")
DOC_GATEWAY_URLS = ("http://127.0.0.1:8080", "http://localhost:8080")  # `chainyard dev`'s
TENANT = "acme"
BLOCK_TIMEOUT_S = 120.0
SHELL = {"sh", "bash", "shell", "console"}
MARK = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->", re.S)
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")
VERBS = ("skip", "needs", "file", "output", "from", "vary", "defaults")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class DocError(AssertionError):
    """A block that failed: names the doc and line, says what differed."""


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{rel(self.doc)}:{self.line}"

    @property
    def is_session(self) -> bool:
        return self.lang in ("", "console") and self.text.startswith("$ ")

    @property
    def kind(self) -> str:
        """What running the block means: shell, session, python, js, json, toml, yaml, output,
        text."""
        if "output" in self.marks:
            return "output"
        if self.is_session:
            return "session"
        if self.lang in SHELL:
            return "shell"
        if self.lang in ("python", "py"):
            return "python"
        if self.lang in ("js", "javascript", "mjs"):
            return "js"
        if self.lang in ("json", "toml", "yaml"):
            return self.lang
        return "text"


def parse(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marks in the comment above it."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        blocks.append(
            Block(doc, start + 1, lang, "\n".join(body) + "\n", marks_above(doc, lines, start))
        )
    return blocks


def marks_above(doc: Path, lines: list[str], fence: int) -> dict[str, str]:
    """The docs-test comment ending on the line right above a fence, as {verb: argument}."""
    j = fence - 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return {}
    while j > 0 and "<!--" not in lines[j]:
        j -= 1
    m = MARK.search("\n".join(lines[j:fence]))
    if not m:
        return {}
    marks: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in re.split(r";(?![^()]*\))", m.group(1)))):
        verb, _, arg = part.partition(" ")
        if verb not in VERBS:
            raise DocError(f"{rel(doc)}:{fence + 1}: unknown docs-test mark {part!r}")
        if verb == "skip" and not re.fullmatch(r"\(.+\)", arg.strip()):
            raise DocError(f"{rel(doc)}:{fence + 1}: `skip` needs a (reason)")
        marks[verb] = " ".join(arg.split())
    return marks


# ---- syntax -------------------------------------------------------------------------------


def check_syntax(block: Block) -> None:
    """Parse the block in its language; raise DocError with the parser's message."""
    try:
        match block.kind:
            case "python":
                compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            case "json":
                json.loads(block.text)
            case "toml":
                tomllib.loads(block.text)
            case "yaml":
                yaml.safe_load(block.text)
            case "shell":
                bash_n(block.text)
            case "session":
                for cmd, _ in session(block.text):
                    bash_n(cmd)
            case "js" if shutil.which("node"):
                check_js(block.text)
    except DocError:
        raise
    except Exception as e:
        raise DocError(f"{block.where}: {block.kind} does not parse: {e}") from e


def bash_n(script: str) -> None:
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    if done.returncode:
        raise DocError(f"bash -n: {done.stderr.strip()}")


def check_js(source: str) -> None:
    done = subprocess.run(
        ["node", "--input-type=module", "--check"], input=source, capture_output=True, text=True
    )
    if done.returncode:
        raise DocError(f"node --check: {done.stderr.strip()}")


def session(text: str) -> list[tuple[str, str]]:
    """A terminal session as (command, what it printed); `\\` continues a command."""
    out: list[tuple[str, list[str]]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + "\n" + next(lines, "")
            out.append((cmd, []))
        elif out:
            out[-1][1].append(line)
    return [(cmd, "\n".join(printed).strip("\n")) for cmd, printed in out]


# ---- comparing output ---------------------------------------------------------------------

NORMALISE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(nats|tls|https?)://[\w.-]+:\d+"), r"\1://<host>"),  # free ports
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),
    (re.compile(r"\b[0-9a-f]{16,}\b"), "<id>"),  # chain ids (new_id), trace ids, digests
    (re.compile(r"\b[0-9a-f]{4,}\.\.\."), "<id>"),  # an id the doc abridged
    (re.compile(r"\$\d+\.\d+"), "$<cost>"),
    (re.compile(r"\b\d+(\.\d+)? ?(ms|s|us)\b"), "<duration>"),
    (re.compile(r"\b\d+\.\d+(e-?\d+)?\b"), "<n>"),
    (re.compile(r"\b\d+([/+])\d+\b"), r"<n>\1<n>"),  # tokens in/out, in+out
    (re.compile(r"[ \t]+"), " "),
]


def normalise(text: str, vary: str = "") -> str:
    for group in vary.split():
        first, *others = group.split("|")
        for other in others:
            text = re.sub(rf"(?<![\w-]){re.escape(other)}(?![\w-])", first, text)
    for pattern, repl in NORMALISE:
        text = pattern.sub(repl, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def matches(expected: str, actual: str, vary: str = "") -> bool:
    """Whether `actual` is what `expected` shows, normalised, with `...` as a wildcard."""
    exp, act = normalise(expected, vary), normalise(actual, vary)
    pattern = ""
    for line in exp.splitlines():
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += ".*?".join(re.escape(p) for p in line.split("...")) + r"\n"
    return re.fullmatch(pattern, act + "\n") is not None


def json_lines(text: str) -> list[object] | None:
    """Every non-empty line as JSON (or the whole text as one value); None when it is not."""
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return None


def subset(expected: object, actual: object, vary: str = "") -> bool:
    """`expected` shows part of `actual`: keys it has, list items up to a "..." item."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and subset(v, actual[k], vary) for k, v in expected.items()
        )
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return False
        if expected and expected[-1] == "...":
            head = expected[:-1]
            return len(actual) >= len(head) and all(map(subset, head, actual[: len(head)]))
        return len(expected) == len(actual) and all(map(subset, expected, actual))
    if isinstance(expected, float):
        return isinstance(actual, int | float) and not isinstance(actual, bool)
    if isinstance(expected, str):
        return isinstance(actual, str) and matches(expected, actual, vary)
    return expected == actual


def compare(block: Block, actual: str) -> None:
    """Raise DocError unless `actual` is what the output block `block` shows."""
    vary = block.marks.get("vary", "")
    expected = json_lines(block.text)
    if expected is not None:
        got = json_lines(actual)
        if got is not None and len(got) == len(expected):
            if all(subset(e, a, vary) for e, a in zip(expected, got, strict=True)):
                return
    elif matches(block.text, actual, vary):
        return
    diff = difflib.unified_diff(
        normalise(block.text, vary).splitlines(),
        normalise(actual, vary).splitlines(),
        "doc (normalised)",
        "printed (normalised)",
        lineterm="",
    )
    raise DocError(f"{block.where}: the output differs from the doc:\n" + "\n".join(diff))


# ---- running ------------------------------------------------------------------------------


@dataclass
class Run:
    """Where a doc's blocks run: a scratch folder that looks like the repository's root (links
    to its folders), and the environment that points every client at the stack."""

    scratch: Path
    nats_url: str = ""
    gateway_url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("contracts", "deploy", "docs"):
            link = self.scratch / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        # A copy, not a link: npm ci refuses a package reached through a symlink, and the
        # doc's own `npm ci` then installs here, beside the repository's node_modules.
        js = self.scratch / "clients" / "js"
        if not js.exists():
            shutil.copytree(ROOT / "clients" / "js", js, ignore=shutil.ignore_patterns("node_*"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHAINYARD"))}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        if self.nats_url:
            self.env |= {"CHAINYARD_NATS": self.nats_url, "NATS_URL": self.nats_url}

    def local(self, text: str) -> str:
        for url in DOC_URLS:
            text = text.replace(url, self.nats_url or url)
        for url in DOC_GATEWAY_URLS:
            text = text.replace(url, self.gateway_url or url)
        return text

    def sh(self, script: str, *, stderr_too: bool = False, stdin: str | None = None) -> str:
        """Run a bash script, as its own process group (background jobs end with it)."""
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.scratch,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(stdin, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise DocError(f"no end within {BLOCK_TIMEOUT_S:.0f} s\n{out}{err or ''}") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if proc.returncode and not stderr_too:
            raise DocError(f"exit status {proc.returncode}\n--- stdout:\n{out}--- stderr:\n{err}")
        return out


PYTHON_RUNNER = """
import ast, asyncio, sys
src = open(sys.argv[1]).read()
code = compile(src, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
ns = {"__name__": "__main__"}
result = eval(code, ns)
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def run_block(block: Block, run: Run) -> str | None:
    """Run one block; return what it printed (None: nothing to compare with)."""
    try:
        return _run_block(block, run)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise DocError(f"{block.where}: not valid against the contracts: {e}") from e


def _run_block(block: Block, run: Run) -> str | None:
    text = run.local(block.text)
    if "file" in block.marks:
        target = run.scratch / block.marks["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    match block.kind:
        case "shell":
            return run.sh(text)
        case "session":
            printed = []
            for cmd, _ in session(text):
                printed.append(f"$ {cmd}\n" + run.sh(cmd, stderr_too=True).rstrip("\n"))
            return "\n".join(printed) + "\n"
        case "python":
            if "from" in block.marks:
                path = ROOT / block.marks["from"]
                return run.sh(f"python {path}")
            script = run.scratch / f"block_{block.line}.py"
            script.write_text(text)
            runner = run.scratch / "run_python_block.py"
            runner.write_text(PYTHON_RUNNER)
            return run.sh(f"python {runner} {script}")
        case "js":
            modules = run.scratch / "node_modules"
            if not modules.exists():
                modules.symlink_to(run.scratch / "clients" / "js" / "node_modules")
            script = run.scratch / f"block_{block.line}.mjs"
            script.write_text(text)
            return run.sh(f"node {script}")
        case "json":
            return run_json(block, run, text)
        case "toml":
            from chainyard.contracts import Config

            config = msgspec.toml.decode(text, type=Config)  # what load_config does
            for table in block.marks.get("defaults", "").split():
                check_defaults(block, tomllib.loads(text), config, table)
    return None


def check_defaults(block: Block, raw: dict[str, object], config: object, table: str) -> None:
    """Each plain value in `table` of the TOML (a dotted path; `.`: the top level; an array
    of tables: its first) is the default of its field in chainyard's config."""
    for key in filter(None, table.split(".")):
        raw_next, config = raw[key], getattr(config, key)
        raw = raw_next[0] if isinstance(raw_next, list) else raw_next  # type: ignore[assignment]
        config = config[0] if isinstance(config, list) else config
    defaults = {f.name: f.default for f in msgspec.structs.fields(type(config))}
    differ = [
        f"{key} = {value!r} (the default is {defaults.get(key, 'none: required')!r})"
        for key, value in raw.items()
        if not isinstance(value, dict | list) and defaults.get(key, msgspec.NODEFAULT) != value
    ]
    if differ:
        raise DocError(f"{block.where}: shown as defaults in [{table}], but: " + "; ".join(differ))


def run_json(block: Block, run: Run, text: str) -> str | None:
    """A chain is submitted and its end printed; a step or an event must decode as one."""
    from chainyard import contracts

    value = json.loads(text)
    if not isinstance(value, dict):
        return None
    if is_chain(value) and "file" not in block.marks:
        return run.sh(
            f"chainyard submit - --wait --tenant {TENANT} --timeout 60 || true", stdin=text
        )
    if "kind" in value:
        msgspec.json.decode(text, type=contracts.Step)
    elif "type" in value and "..." not in _walk(value):
        msgspec.json.decode(text, type=contracts.Event)
    elif "type" in value and "..." not in _walk(unabridged(value)):  # a list cut with "..."
        shown_fields_exist(block, unabridged(value), mi.type_info(contracts.Event))
    elif "new_id" in value:
        msgspec.json.decode(text, type=contracts.Replay)
    elif set(value) == {"reason"}:
        msgspec.json.decode(text, type=contracts.Cancel)
    return None


def is_chain(value: object) -> bool:
    """A chain, not an event that lists step summaries."""
    return isinstance(value, dict) and "steps" in value and "type" not in value


def shown_fields_exist(block: Block, value: object, info: mi.Type) -> None:
    """An abridged value (fields left out, lists cut with "..."): each field shown is one of
    its type's, its value of the field's type, all the way down."""
    if isinstance(info, mi.UnionType):
        tagged = [t for t in info.types if isinstance(t, mi.StructType) and t.tag is not None]
        if isinstance(value, dict) and tagged:
            info = next((t for t in tagged if t.tag == value.get(t.tag_field)), tagged[0])
            if info.tag != value.get(info.tag_field):
                raise DocError(f"{block.where}: no event type {value.get(info.tag_field)!r}")
        else:
            for t in info.types:
                try:
                    shown_fields_exist(block, value, t)
                    return
                except DocError:
                    continue
            raise DocError(f"{block.where}: {value!r} is none of {info}")
    if isinstance(info, mi.StructType):
        if not isinstance(value, dict):
            raise DocError(f"{block.where}: {value!r} where {info.cls.__name__} goes")
        fields = {f.encode_name: f for f in info.fields}
        for key, item in value.items():
            if key == info.tag_field:
                continue
            if key not in fields:
                raise DocError(f"{block.where}: {info.cls.__name__} has no field {key!r}")
            shown_fields_exist(block, item, fields[key].type)
    elif isinstance(info, mi.ListType) and isinstance(value, list):
        for item in value:
            shown_fields_exist(block, item, info.item_type)
    elif not isinstance(info, mi.ListType | mi.DictType | mi.AnyType):
        try:
            msgspec.convert(value, type=scalar_type(info))
        except (msgspec.ValidationError, TypeError) as e:
            raise DocError(f"{block.where}: {value!r}: {e}") from e


def scalar_type(info: mi.Type) -> object:
    """The Python type of a scalar type_info (str, int, float, bool, None, a Literal's values)."""
    scalars = {mi.StrType: str, mi.IntType: int, mi.FloatType: float, mi.BoolType: bool}
    if isinstance(info, mi.LiteralType):
        return Literal[tuple(info.values)]
    return scalars.get(type(info), type(None) if isinstance(info, mi.NoneType) else object)


def unabridged(value: object) -> object:
    """The value without the "..." items that abridge its lists ("..." elsewhere stays)."""
    if isinstance(value, dict):
        return {k: unabridged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unabridged(v) for v in value if v != "..."]
    return value


def _walk(value: object) -> list[object]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list):
        return [x for v in value for x in _walk(v)]
    return [value]


def default_expectation(block: Block) -> Block | None:
    """A submitted chain without an output block must complete."""
    if block.kind == "json" and "file" not in block.marks:
        value = json.loads(block.text)
        if is_chain(value):
            return Block(block.doc, block.line, "json", '{"type": "chain.completed"}\n')
    return None


def check_excerpt(block: Block) -> None:
    """A `from PATH` block must be PATH's own text: each paragraph of it, in order."""
    source = (ROOT / block.marks["from"]).read_text()
    at = 0
    for para in block.text.strip("\n").split("\n\n"):
        found = source.find(para.strip("\n"), at)
        if found < 0:
            raise DocError(
                f"{block.where}: not in {block.marks['from']} (the doc and the file differ):\n"
                f"{para}"
            )
        at = found + len(para)


if __name__ == "__main__":  # python tests/docs_harness.py: every block, what the harness does
    for doc in DOCS:
        for b in parse(doc):
            print(f"{b.where:<28} {b.kind:<8} {b.marks or ''}  {b.text.splitlines()[0][:60]}")
