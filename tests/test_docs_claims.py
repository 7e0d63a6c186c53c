"""What the docs claim, against the code: every `chainyard` command and flag they show, metric
and label, environment variable, gateway route and header, make target, repository path and link
exists. The examples that cannot run here (a cluster, docker) are checked this way too: their
commands parse with chainyard's own CLI parser, their files exist. Offline and fast (no stack).

DESIGN-NOTES.md is left out: it is the record of decisions, and its superseded notes describe
code deleted since on purpose.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import msgspec
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from docs_harness import DOCS, ROOT, Block, parse, rel, session

from chainyard.cli import parser
from chainyard.client import Client
from chainyard.contracts import Cancel, Event, Replay, Subjects, load_config
from chainyard.gateway import http as gateway_http
from chainyard.gateway.app import application
from chainyard.gateway.core import ApiError, Gateway, hints
from chainyard.runtime.metrics import METRICS

USER_DOCS = [d for d in DOCS if d.name != "DESIGN-NOTES.md"]
IDS = [rel(d) for d in USER_DOCS]
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


@dataclass(frozen=True)
class Said:
    """One thing a doc says, and where."""

    where: str
    text: str


def prose(doc: Path) -> Iterator[tuple[int, str]]:
    """The doc's lines outside fenced blocks, with their line numbers."""
    fence: str | None = None
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        m = re.match(r"\s*(`{3,})", line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            yield n, line


def inline_spans(doc: Path) -> Iterator[Said]:
    for n, line in prose(doc):
        for m in INLINE.finditer(line):
            yield Said(f"{rel(doc)}:{n}", m.group(1))


# ---- the CLI ------------------------------------------------------------------------------


@cache
def help_of(path: tuple[str, ...]) -> str:
    """`chainyard PATH --help`, as printed."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        try:
            parser().parse_args([*path, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


def subcommands(path: tuple[str, ...]) -> set[str]:
    """The subcommands `chainyard PATH` takes (its positional `{a,b}`, not a flag's choices)."""
    m = re.search(r"^  \{([\w,-]+)\}", help_of(path), re.M)
    return set(m.group(1).split(",")) if m else set()


def command_lines(block: Block) -> list[str]:
    """The shell command lines of a block (continuations joined, one per line)."""
    if block.kind == "session":
        return [cmd.replace("\n", " ") for cmd, _ in session(block.text)]
    return [line.strip() for line in block.text.replace("\\\n", " ").splitlines() if line.strip()]


def chainyard_argvs(line: str, synopsis: bool) -> list[list[str]]:
    """The argument lists given to `chainyard` on a command line (after `chainyard`)."""
    if synopsis:  # words as written; `a|b` is a choice here (the first is checked)
        words = [w.split("|")[0] for w in line.split("#", 1)[0].split()]
        starts = [i for i, w in enumerate(words) if w == "chainyard"]
        return [words[i + 1 :] for i in starts[:1]]
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:
        return []
    argvs: list[list[str]] = []
    current: list[str] | None = None
    command_next = True  # the next word is a command (not an argument of one)
    for tok in [*tokens, ";"]:
        if tok and set(tok) <= set("|&;<>()"):
            if current is not None:
                if tok[0] in "<>" and current and current[-1].isdigit():
                    current.pop()  # the `2` of `2>`
                argvs.append(current)
            current = None
            command_next = tok[0] not in "<>"  # a redirection's target is a file
        elif current is not None:
            current.append(tok)
        elif command_next and (tok == "chainyard" or tok.endswith("/chainyard")):
            current = []
        elif not re.fullmatch(r"\w+=\S*", tok):  # `A=b cmd`: an assignment, then the command
            command_next = False
    return argvs


def commands_in(doc: Path) -> Iterator[tuple[Said, list[str], bool]]:
    """(where, argv after `chainyard`, whether it is a synopsis) for every command shown."""
    for block in parse(doc):
        if block.kind not in ("shell", "session", "text"):
            continue
        synopsis = block.kind == "text" or "synopsis" in block.marks.get("skip", "")
        for line in command_lines(block):
            for argv in chainyard_argvs(line, synopsis):
                yield Said(block.where, line), argv, synopsis
    for said in inline_spans(doc):
        if said.text.startswith("chainyard "):  # a mention (`chainyard gateway`): a synopsis
            for argv in chainyard_argvs(said.text, True):
                yield said, argv, True


def problems_with(argv: list[str], synopsis: bool) -> list[str]:
    """What is wrong with `chainyard ARGV` by its parser: an unknown subcommand or flag; a real
    command line (not a synopsis) must also parse."""
    if argv and not argv[0].islower():
        return []  # `chainyard VERB`: a placeholder
    path: tuple[str, ...] = ()
    rest = list(argv)
    while rest and not rest[0].startswith("-") and rest[0] in subcommands(path):
        path += (rest.pop(0),)
    if not path:
        return [f"no subcommand {argv[0] if argv else ''!r} (chainyard --help)"]
    if subcommands(path) and not any(w in subcommands(path) for w in rest):
        if not synopsis:
            return [f"`chainyard {' '.join(path)}` needs one of {sorted(subcommands(path))}"]
    known = help_of(path) + help_of(())
    wrong = [
        f"`chainyard {' '.join(path)}` has no flag {flag}"
        for word in rest
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", word)
        if word.startswith(("-", "[-")) and not re.search(rf"(?<![\w-]){flag}(?![\w-])", known)
    ]
    if wrong or synopsis:
        return wrong
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                return [err.getvalue().strip().splitlines()[-1]]
    return []


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_every_chainyard_command_shown_parses(doc: Path) -> None:
    """Commands in blocks that run, blocks that are skipped here (a cluster, Jaeger), synopses
    and prose: the subcommand and every flag exist; a whole command line parses."""
    failures = [
        f"{said.where}: {said.text}\n  {p}"
        for said, argv, synopsis in commands_in(doc)
        for p in problems_with(argv, synopsis)
    ]
    assert not failures, "\n".join(failures)


def test_the_command_check_catches_drift() -> None:
    assert problems_with(["usage", "--tenant", "acme"], synopsis=False) == []
    assert problems_with(["usage", "--tenants", "acme"], synopsis=False)
    assert problems_with(["nosuch"], synopsis=False)
    assert problems_with(["dlq", "list", "--since", "24h"], synopsis=False) == []
    assert problems_with(["dlq", "list", "[--sincee", "24h]"], synopsis=True)
    assert problems_with(["dev", "--port", "many"], synopsis=False)  # type=int
    assert chainyard_argvs("x=$(chainyard keys create --tenant a 2> err) && echo", False) == [
        ["keys", "create", "--tenant", "a"]
    ]


# ---- metrics, environment, gateway --------------------------------------------------------

SERIES = re.compile(r"\b(chainyard_[a-z0-9_]+)(\{[^}]*\})?")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def metric_named(series: str) -> tuple[str, tuple[str, ...]] | None:
    """The metric a Prometheus series name belongs to, and the labels it may carry."""
    for m in METRICS.values():
        names = [m.prometheus + s for s in SUFFIXES.get(m.kind, ("",))]
        if m.kind == "histogram":
            names.append(m.prometheus)  # the family, as a dashboard names it
        if series in names:
            return m.prometheus, m.labels + (("le",) if series.endswith("_bucket") else ())
    return None


def doc_texts(doc: Path) -> Iterator[tuple[str, str]]:
    """(where, text) for each fenced block and each prose line."""
    for block in parse(doc):
        yield block.where, block.text
    for n, line in prose(doc):
        yield f"{rel(doc)}:{n}", line


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_metrics_named_exist_with_their_labels(doc: Path) -> None:
    failures = []
    for where, text in doc_texts(doc):
        for name, labels in SERIES.findall(text):
            found = metric_named(name)
            if found is None:
                failures.append(f"{where}: no metric {name} (chainyard/runtime/metrics.py)")
                continue
            shown = set(re.findall(r"(\w+)\s*=~?", labels))
            if extra := shown - set(found[1]):
                failures.append(f"{where}: {name} has no label {sorted(extra)}: {found[1]}")
    assert not failures, "\n".join(failures)


def source_text() -> str:
    files = [*(ROOT / "chainyard").rglob("*.py"), *(ROOT / "deploy").rglob("*.conf")]
    return "\n".join(p.read_text() for p in files)


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_environment_variables_named_are_read(doc: Path) -> None:
    """CHAINYARD_* variables are read by chainyard; CY_*_PASSWORD ones by deploy/*.conf."""
    source = source_text()
    failures = [
        f"{where}: nothing reads {name}"
        for where, text in doc_texts(doc)
        for name in re.findall(r"\b(CHAINYARD_[A-Z0-9_]+|CY_[A-Z0-9_]+_PASSWORD)\b", text)
        if not re.search(rf"[\"'$]{name}\b", source)
    ]
    assert not failures, "\n".join(failures)


def gateway_app() -> web.Application:
    """The gateway's routes; the handlers are never called, so no Gateway behind them."""
    settings = SimpleNamespace(max_body_bytes=1024)
    return application(cast(Gateway, SimpleNamespace(settings=settings)))


ROUTE = re.compile(r"\b(GET|POST|PUT|DELETE|PATCH) (/v1[\w/{}.-]*)")


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
async def test_gateway_routes_named_exist(doc: Path) -> None:
    """`GET /v1/chains/ID`: a route of the gateway (not its 404 for everything else)."""
    app = gateway_app()
    failures = []
    for where, text in doc_texts(doc):
        for line in text.splitlines():
            if "no such endpoint" in line:
                continue  # quoting the gateway's 404
            for method, path in ROUTE.findall(line):
                concrete = re.sub(r"\{\w+\}|\b[A-Z]{2,}\b", "x", path)
                match = await app.router.resolve(make_mocked_request(method, concrete, app=app))
                route = match.route
                if route.resource is None or route.resource.canonical == "/{tail}":
                    failures.append(f"{where}: the gateway has no route {method} {path}")
    assert not failures, "\n".join(failures)


def hint_effect(name: str) -> object:
    """What the gateway makes of header `name: 1`: a route, deadline or cache, or a 400."""
    try:
        return hints({name: "1"})
    except ApiError as e:
        return e.status


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_gateway_headers_named_are_used(doc: Path) -> None:
    """An x-chainyard-* header the docs name is one the gateway answers with, or a request hint
    that changes the chain (an unknown one changes nothing)."""
    answered = {gateway_http.CHAIN_ID, gateway_http.TRACE_ID, gateway_http.CACHE}
    ignored = hint_effect("x-chainyard-no-such-hint")
    failures = [
        f"{where}: the gateway neither sends nor reads {name}"
        for where, text in doc_texts(doc)
        for name in {n.lower() for n in re.findall(r"\b[xX]-[cC]hainyard-[\w-]*\w", text)}
        if name not in answered and hint_effect(name) == ignored
    ]
    assert not failures, "\n".join(failures)


# ---- make targets, paths, links -----------------------------------------------------------


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_make_targets_named_exist(doc: Path) -> None:
    texts = [(b.where, b.text) for b in parse(doc) if b.kind in ("shell", "session", "text")]
    texts += [(s.where, s.text) for s in inline_spans(doc)]
    failures = [
        f"{where}: no make target {target}"
        for where, text in texts
        for target in re.findall(r"(?:^|[\s;&|(])make ([\w-]+)", text)
        if target not in make_targets()
    ]
    assert not failures, "\n".join(failures)


TOP = ("deploy", "docs", "tests", "bench", "chainyard", "contracts", "clients", "router", "workers")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./*-]*[\w*])")


def git_ignores(path: str) -> bool:
    """Whether git ignores `path` (as a file, or as a folder: `node_modules/`)."""
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", path, path + "/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return bool(done.stdout.strip())


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the doc's headings."""
    anchors = set()
    for _, line in prose(doc):
        if m := re.match(r"#+\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_paths_and_links_exist(doc: Path) -> None:
    """A repository path in prose or in a block skipped here (`deploy/nats.conf`) exists; a
    relative link goes to a file that exists, and to a heading it has."""
    failures = [  # blocks that do not run here (a cluster, docker): the files they name
        f"{b.where}: no {path} in the repository"
        for b in parse(doc)
        if b.kind in ("shell", "session") and "skip" in b.marks
        for path in REPO_PATH.findall(b.text)
        if not any(ROOT.glob(path)) and not git_ignores(path)
    ]
    for n, line in prose(doc):
        where = f"{rel(doc)}:{n}"
        for path in REPO_PATH.findall(line):
            if not any(ROOT.glob(path)) and not git_ignores(path):  # ignored: a run's output
                failures.append(f"{where}: no {path} in the repository")
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"\w+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            linked = (doc.parent / file).resolve() if file else doc
            if not linked.exists():
                failures.append(f"{where}: the link {target} goes to no file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                failures.append(f"{where}: {rel(linked)} has no heading #{anchor}")
    assert not failures, "\n".join(failures)


def every_help(path: tuple[str, ...] = ()) -> str:
    """The help of chainyard and of each of its subcommands, all levels."""
    return help_of(path) + "".join(every_help((*path, s)) for s in sorted(subcommands(path)))


@cache
def bench_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_flags_named_in_prose_exist(doc: Path) -> None:
    """A flag the prose names on its own (`--metrics-port`) is one of some chainyard command, or
    of the benchmarks (`python -m bench --quick`)."""
    known = every_help() + bench_help()
    failures = [
        f"{said.where}: no chainyard command has {flag}"
        for said in inline_spans(doc)
        if said.text.startswith("--")
        for flag in re.findall(r"^(--[a-z][\w-]*)", said.text)
        if not re.search(rf"(?<![\w-]){flag}(?![\w-])", known)
    ]
    assert not failures, "\n".join(failures)


# ---- defaults -----------------------------------------------------------------------------

# Where a doc states flags' defaults, the command they belong to (with its required arguments).
DEFAULTS_OF = {
    "docs/KUBERNETES.md": ["deploy", "k8s", "--config", "c.toml"],  # its option table
    "docs/GATEWAY.md": ["gateway", "--config", "c.toml"],
    "docs/OPERATIONS.md": ["usage"],
}
STATED_DEFAULT = [
    re.compile(r"^\| `(--[\w-]+)[^`]*` \| `?([^|`]*?)`? \|"),  # | `--flag X` | `default` | what |
    re.compile(r"`(--[\w-]+)` \((?:default )?`?([\w.:/-]+)`?[,;)]"),  # `--flag` (default `X`)
    re.compile(
        r"`(--[\w-]+)` is .*?default `([^`]+)`"
    ),  # `--since` is a duration (...; default `24h`)
]


def stated_defaults(doc: Path) -> Iterator[tuple[str, str, str]]:
    for n, line in prose(doc):
        for pattern in STATED_DEFAULT:
            for flag, default in pattern.findall(line):
                yield f"{rel(doc)}:{n}", flag, default.strip()


def parsed(argv: list[str]) -> dict[str, object] | None:
    with redirect_stderr(io.StringIO()):
        try:
            return vars(parser().parse_args(argv))
        except SystemExit:
            return None


@pytest.mark.parametrize("doc", DEFAULTS_OF, ids=list(DEFAULTS_OF))
def test_flag_defaults_stated_are_the_parsers(doc: str) -> None:
    """A stated default, given explicitly, changes nothing; `(required)` is required."""
    command = DEFAULTS_OF[doc]
    base = parsed(command)
    assert base is not None, command
    failures, seen = [], 0
    for where, flag, default in stated_defaults(ROOT / doc):
        dest = flag.removeprefix("--").replace("-", "_")
        if default == "(required)":
            i = command.index(flag)
            seen += 1
            if parsed(command[:i] + command[i + 2 :]) is not None:
                failures.append(f"{where}: {flag} is said to be required; it is not")
        elif default and "<" not in default and dest in base:
            seen += 1
            if parsed([*command, flag, default]) != base:
                failures.append(f"{where}: {flag}'s default is {base[dest]!r}, not {default}")
    assert seen, f"{doc}: no stated default found (the patterns drifted from the doc)"
    assert not failures, "\n".join(failures)


# ---- deploy/compose.yaml (deploy/README.md's `docker compose up`, which cannot run here) -----


def image_files() -> dict[str, Path]:
    """What deploy/Dockerfile copies into the image: its path there -> the repository's file."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    return {
        dst: ROOT / src
        for src, dst in re.findall(r"^COPY (\S+) (/\S+)$", dockerfile, re.M)
        if (ROOT / src).is_file()
    }


def test_compose_services_run_commands_chainyard_accepts() -> None:
    """Each compose service: its build and mounted files exist; a chainyard command parses, and
    its --config (copied into the image) loads and its --tools imports; a `python -m` entrypoint
    has the flags given."""
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (deploy / "Dockerfile").read_text(), re.M)
    assert entrypoint and entrypoint.group(1) == '["chainyard"]'
    copied = image_files()
    failures, commands = [], 0
    for name, service in compose["services"].items():
        if build := service.get("build"):
            context = deploy / build["context"]
            if not (context / build["dockerfile"]).is_file():
                failures.append(f"{name}: no {build['dockerfile']} in {context}")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not (deploy / source).exists():
                failures.append(f"{name}: mounts {source}, which deploy/ does not have")
        if argv := service.get("entrypoint"):
            if argv[:2] == ["python", "-m"]:
                done = subprocess.run(
                    [sys.executable, "-m", argv[2], "--help"], capture_output=True, text=True
                )
                for flag in (w for w in argv[3:] if w.startswith("--")):
                    if flag not in done.stdout:
                        failures.append(f"{name}: python -m {argv[2]} has no {flag}")
            continue
        if "command" not in service or "build" not in service:
            continue  # not chainyard's image (nats, jaeger)
        argv = service["command"]
        commands += 1
        failures += [f"{name}: {p}" for p in problems_with(argv, synopsis=False)]
        args = vars(parser().parse_args(argv))
        if args.get("config"):
            if args["config"] not in copied:
                failures.append(f"{name}: deploy/Dockerfile copies nothing to {args['config']}")
            else:
                load_config(copied[args["config"]])
        if args.get("tools"):
            module, _, attribute = args["tools"].partition(":")
            getattr(import_module(module), attribute)
    assert commands >= 3, "router, worker, tools"
    assert not failures, "\n".join(failures)


# ---- `nats` CLI examples (run only where a `nats` binary is; checked here without one) -------


def nats_calls(block: Block) -> Iterator[tuple[str, str, str | None]]:
    """(verb, subject, payload) of each `nats pub|req|sub` in a block."""
    for line in command_lines(block):
        words = shlex.split(line, comments=True)
        while words and words[0] == "nats":
            words = words[1:]
            while words and words[0] in ("--server", "-s"):
                words = words[2:]
            verb, subject, *rest = [w for w in words if w != "&"]
            payload = rest[0] if rest else None
            yield verb, subject, payload
            words = []


def nats_call_problems(verb: str, subject: str, payload: str | None, saved: set[str]) -> str:
    """Why the subject or payload is not what chainyard's topology and contracts take."""

    s, parts = Subjects(prefix="cy"), subject.split(".")
    if verb == "sub":
        ok = len(parts) == 5 and s.chain_events(parts[2], parts[3]) == subject
        return "" if ok else f"{subject} is not a chain's events (cy.events.T.CHAIN.>)"
    if verb not in ("pub", "req"):
        return f"nats {verb}: not checked here"
    if parts[:2] == ["cy", "submit"]:
        file = re.fullmatch(r"\$\(cat (\S+)\)", payload or "")
        if s.submit(parts[2]) != subject or not file or file.group(1) not in saved:
            return f"{subject} {payload}: a chain file the doc saves, sent to cy.submit.T"
        return ""
    if parts[:2] != ["cy", "control"] or len(parts) < 5:
        return f"{subject}: neither cy.submit.T nor cy.control.T.CHAIN.VERB"
    control = ".".join(parts[4:])
    body = (payload or "{}").encode()
    try:
        if control == "cancel":
            msgspec.json.decode(body, type=Cancel)
        elif control == "replay":
            msgspec.json.decode(body, type=Replay)
        elif control.startswith("signal.") and re.fullmatch(r"[\w-]+", control[7:]):
            msgspec.json.decode(body)
        else:
            return f"{subject}: no control verb {control!r} (cancel, replay, signal.NAME)"
    except msgspec.MsgspecError as e:
        return f"{subject}: the payload is not what {control} takes: {e}"
    return ""


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_nats_cli_examples_use_chainyards_subjects(doc: Path) -> None:
    blocks = parse(doc)
    saved = {b.marks["file"] for b in blocks if "file" in b.marks}
    failures = [
        f"{b.where}: {problem}"
        for b in blocks
        if b.kind in ("shell", "session") and re.search(r"^\s*nats ", b.text, re.M)
        for verb, subject, payload in nats_calls(b)
        if (problem := nats_call_problems(verb, subject, payload, saved))
    ]
    assert not failures, "\n".join(failures)


def test_the_nats_check_catches_drift() -> None:
    saved = {"chain.json"}
    assert nats_call_problems("sub", "cy.events.acme.c-1.>", None, saved) == ""
    assert nats_call_problems("sub", "cy.event.acme.c-1.>", None, saved)
    assert nats_call_problems("pub", "cy.submit.acme", "$(cat chain.json)", saved) == ""
    assert nats_call_problems("pub", "cy.submit.acme", "$(cat other.json)", saved)
    assert nats_call_problems("req", "cy.control.acme.c-1.cancel", '{"reason": "x"}', saved) == ""
    assert nats_call_problems("req", "cy.control.acme.c-1.cancel", '{"why": "x"}', saved)
    assert nats_call_problems("req", "cy.control.acme.c-1.stop", "{}", saved)
    assert nats_call_problems("req", "cy.control.acme.c-1.replay", '{"from_step": "a"}', saved)


# ---- deploy/README.md's permission tables against deploy/accounts.conf ----------------------


def conf_permissions(user: str) -> dict[str, set[str]]:
    """The publish and subscribe allow lists of `user` in deploy/accounts.conf."""
    conf = (ROOT / "deploy" / "accounts.conf").read_text()
    start = conf.index(f"user: {user}\n")
    block = conf[start : conf.find("user:", start + 5) if "user:" in conf[start + 5 :] else None]
    quoted = re.compile(r'"([^"]+)"')
    return {
        way: set(quoted.findall(m.group(1)))
        for way in ("publish", "subscribe")
        if (m := re.search(rf"{way}: \{{\s*allow: \[(.*?)\]", block, re.S))
    }


def table_permissions(heading: str) -> dict[str, set[str]]:
    """The subjects each row of the table under `heading` names after `publish` / `subscribe`
    ("the same four on `X`": the row above's four, on X)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    table = re.search(r"\n((?:\|.*\n)+)", text[text.index(heading) :])
    assert table, heading
    rows = re.findall(r"^\| .* \| (.*) \|$", table.group(1), re.M)[1:]  # not the header
    said: dict[str, set[str]] = {"publish": set(), "subscribe": set()}
    last: list[str] = []
    way = "publish"
    for cell in rows:
        if not re.match(r"(publish|subscribe) ", cell):
            cell = f"{way} {cell}"  # "the same four on ...": the row above's direction
        for way, rest in re.findall(r"(publish|subscribe) (.*?)(?=(?:publish|subscribe) |$)", cell):
            names = [
                n for n in re.findall(r"`([^`]+)`", rest) if re.search(r"[.>*]", n) and "<" not in n
            ]
            if same := re.search(r"the same four on `(\w+)`", cell):
                stream = re.search(r"KV_\w+", last[0])
                assert stream, last
                names = [n.replace(stream.group(0), same.group(1)) for n in last] + names
            said[way] |= set(names)
            last = names
    return said


@pytest.mark.parametrize(
    "heading, user",
    [("## Tenants: what a tenant user may do", "tenant-A"), ("## The gateway's user", "gateway")],
)
def test_permission_tables_are_accounts_conf(heading: str, user: str) -> None:
    """Each table lists exactly what the user may publish and subscribe in accounts.conf."""
    assert table_permissions(heading) == conf_permissions(user)


def test_dashboard_queries_shown_are_the_dashboards() -> None:
    """docs/OPERATIONS.md shows a run of the panels' queries ("Title: expr"): each is one of that
    panel's in deploy/grafana/chainyard.json."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "chainyard.json").read_text())
    exprs = {
        p["title"]: {t["expr"].replace("$__rate_interval", "1m") for t in p["targets"]}
        for p in dashboard["panels"]
    }
    doc = ROOT / "docs" / "OPERATIONS.md"
    shown = [
        (b.where, line.split(": ", 1))
        for b in parse(doc)
        if b.kind == "text" and "chainyard_" in b.text
        for line in b.text.splitlines()
        if not line.startswith(" ") and ": " in line
    ]
    assert len(shown) >= 5, shown
    failures = [
        f"{where}: {title!r}: {expr} is not among {sorted(exprs.get(title, ()))}"
        for where, (title, expr) in shown
        if expr not in exprs.get(title, set())
    ]
    assert not failures, "\n".join(failures)


# ---- event types and the Python API named in prose ----------------------------------------

EVENT_TYPES = {t.tag for t in msgspec.inspect.type_info(Event).types}  # type: ignore[attr-defined]


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_event_types_named_exist(doc: Path) -> None:
    """`step.completed`, `chain.rejected`...: a `type` of the contracts' Event union."""
    failures = [
        f"{s.where}: no event type {s.text} (contracts: {sorted(EVENT_TYPES)})"
        for s in inline_spans(doc)
        if re.fullmatch(r"(step|chain|control)\.[a-z_]+", s.text)
        and not re.search(r"\.(json|py|toml|yaml|md)$", s.text)  # a file: chain.json
        and s.text not in EVENT_TYPES
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("doc", USER_DOCS, ids=IDS)
def test_python_api_named_exists(doc: Path) -> None:
    """`Client.answer`, `Client.run(fresh_id=True)`, `chainyard.PermissionDenied`: the attribute
    exists (and a keyword shown is a parameter). (`chainyard.tenant` and other lowercase names
    that are no module are span attributes: TRACING.md.)"""
    import inspect

    import chainyard

    failures = []
    for s in inline_spans(doc):
        m = re.fullmatch(r"(Client|chainyard)\.(\w+)(?:\((\w+)=[^)]*\))?", s.text)
        if not m or (m.group(1) == "chainyard" and m.group(2).islower()):
            continue  # chainyard.client is a module (imported by the examples that run)
        owner = Client if m.group(1) == "Client" else chainyard
        thing = getattr(owner, m.group(2), None)
        if thing is None:
            failures.append(f"{s.where}: {s.text}: no {m.group(1)}.{m.group(2)}")
        elif m.group(3) and m.group(3) not in inspect.signature(thing).parameters:
            failures.append(f"{s.where}: {s.text}: no parameter {m.group(3)}")
    assert not failures, "\n".join(failures)
