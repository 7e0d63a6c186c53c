"""The bench registry, the figure record, machine facts and the results file.

A benchmark is an async function `fn(ctx) -> list[Figure]`, registered with `@benchmark(...)`
in a module listed in `MODULES`. `python -m bench [names...]` runs all of them or the named
ones (a name may be a benchmark's or one of the figures it declares).
"""

from __future__ import annotations

import contextlib
import cProfile
import importlib
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Modules that register benchmarks; a new figure = a new module here.
MODULES: tuple[str, ...] = (
    "bench.nats_path",
    "bench.workers",
    "bench.provider_calls",
    "bench.routing",
    "bench.added_latency",
    "bench.deadlines",
    "bench.gateways",
    "bench.gateway_http",
    "bench.transitions",
    "bench.tracing",
    "bench.http_clients",
    "bench.scaling",
    "bench.cache",
    "bench.ops",
    "bench.retention",
)
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
PROFILES = HERE / "profiles"


@dataclass
class Figure:
    """One measured number against its baseline; `ratio` = value / baseline_value."""

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline_value: float
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 4)
        d["value"] = round(self.value, 4)
        d["baseline_value"] = round(self.baseline_value, 4)
        return {k: d[k] for k in (*RECORD_KEYS,)}

    def line(self) -> str:
        return (
            f"{self.name:<32} {self.value:>12.3f} {self.unit:<8} vs {self.baseline_name} "
            f"{self.baseline_value:.3f} {self.unit}  ratio {self.ratio:.3f}"
        )


RECORD_KEYS = ("name", "value", "unit", "baseline_name", "baseline_value", "ratio", "conditions")


@dataclass
class Ctx:
    """What the command line says to every benchmark."""

    quick: bool = False
    profile: bool = False
    uvloop: bool = False
    overrides: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def n(self, key: str, full: int, quick: int) -> int:
        """A size: `--set key=value` wins, then --quick, then the full default."""
        return self.overrides.get(key, quick if self.quick else full)

    @contextlib.contextmanager
    def profiled(self, label: str, top: int = 25) -> Iterator[None]:
        """cProfile the block when --profile is on; dump stats and print the top entries."""
        if not self.profile:
            yield
            return
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            PROFILES.mkdir(exist_ok=True)
            path = PROFILES / f"{label}.pstats"
            prof.dump_stats(path)
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            self.notes.append(f"profile {label}: {path}\n{out.getvalue()}")


BenchFn = Callable[[Ctx], Awaitable[list[Figure]]]


@dataclass(frozen=True)
class Bench:
    name: str
    figures: tuple[str, ...]
    fn: BenchFn
    doc: str


REGISTRY: dict[str, Bench] = {}


def benchmark(name: str, figures: tuple[str, ...] = ()) -> Callable[[BenchFn], BenchFn]:
    """Register `fn` under `name`; `figures` are the figure names it returns."""

    def register(fn: BenchFn) -> BenchFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Bench(name, figures or (name,), fn, (fn.__doc__ or "").strip())
        return fn

    return register


def load_all() -> dict[str, Bench]:
    for m in MODULES:
        importlib.import_module(m)
    return REGISTRY


def select(names: list[str]) -> list[Bench]:
    """The benchmarks to run for these names (all when none); unknown names raise KeyError."""
    benches = list(load_all().values())
    if not names:
        return benches
    chosen: list[Bench] = []
    for n in names:
        hits = [b for b in benches if n == b.name or n in b.figures]
        if not hits:
            known = ", ".join(sorted({x for b in benches for x in (b.name, *b.figures)}))
            raise KeyError(f"unknown benchmark {n!r} (known: {known})")
        chosen += [b for b in hits if b not in chosen]
    return chosen


# -- machine facts ------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _run(args: list[str]) -> str | None:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(uvloop_on: bool) -> dict[str, Any]:
    from chainyard.runtime.server import server_binary

    server = _run([server_binary(), "--version"]) or "unknown"
    commit = _run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"])
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nats_server": server.removeprefix("nats-server: "),
        "nats_py": _version("nats-py"),
        "msgspec": _version("msgspec"),
        "uvloop": uvloop_on,
        "uvloop_version": _version("uvloop") if uvloop_on else None,
        "git_commit": f"{commit}{'-dirty' if dirty else ''}" if commit else None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
    }


# -- results file -----------------------------------------------------------------------


def write_results(figures: list[Figure], machine: dict[str, Any], path: Path = RESULTS) -> None:
    """Merge by figure name into `path` (a JSON list), so a partial run keeps the other figures."""
    old: list[dict[str, Any]] = []
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            loaded = json.loads(path.read_text())
            old = loaded if isinstance(loaded, list) else []
    new = {f.name: {**f.record(), "conditions": {**machine, **f.conditions}} for f in figures}
    merged = [new.pop(r.get("name"), r) for r in old if isinstance(r, dict)]
    merged += list(new.values())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
