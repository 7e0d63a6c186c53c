"""`python -m bench [names...] [--quick] [--profile] [--set key=value]`: run, print, record.

Every figure prints one line with its baseline and ratio, and is merged by name into
bench/results.json. The process exits non-zero when any benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from chainyard.runtime.gc_tuning import tune_gc

from .core import RESULTS, Ctx, Figure, machine_facts, select, write_results


def _loop_factory(use_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, bool]:
    if not use_uvloop:
        return None, False
    try:
        import uvloop
    except ImportError:
        return None, False
    return uvloop.new_event_loop, True


def _overrides(pairs: list[str]) -> dict[str, int]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--set wants key=integer, got {p!r}")
        out[key] = int(value)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("names", nargs="*", help="benchmarks or figures to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="small N, for a smoke run")
    ap.add_argument("--profile", action="store_true", help="cProfile an extra run, print hot spots")
    ap.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=N",
        help="override a size, e.g. --set n=20000 --set window=64",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    ap.add_argument("--list", action="store_true", help="list benchmarks and their figures")
    return ap.parse_args(argv)


async def run_all(ctx: Ctx, names: list[str]) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    failed: list[str] = []
    for b in select(names):
        t0 = time.perf_counter()
        print(f"== {b.name}: {b.doc}", flush=True)
        try:
            got = await b.fn(ctx)
        except Exception:
            traceback.print_exc()
            failed.append(b.name)
            continue
        for f in got:
            print(f"   {f.line()}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        figures += got
    return figures, failed


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        for b in select([]):
            print(f"{b.name}: {', '.join(b.figures)}\n    {b.doc}")
        return 0
    try:
        select(args.names)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    factory, uv = _loop_factory(not args.no_uvloop)
    ctx = Ctx(quick=args.quick, profile=args.profile, uvloop=uv, overrides=_overrides(args.set))
    machine = machine_facts(uv)
    print(
        f"machine: {machine['cores']} cores, {machine['python']}, nats-server "
        f"{machine['nats_server']}, uvloop {'on' if uv else 'off'}",
        flush=True,
    )
    tune_gc()  # as the services do (chainyard/runtime/gc_tuning.py)
    with asyncio.Runner(loop_factory=factory) as runner:
        figures, failed = runner.run(run_all(ctx, args.names))
    for note in ctx.notes:
        print(note)
    if figures:
        machine["quick"] = args.quick
        write_results(figures, machine, args.out)
        shown = args.out
        with contextlib.suppress(ValueError):
            shown = args.out.resolve().relative_to(Path.cwd())
        print(f"wrote {len(figures)} figure(s) to {shown}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
