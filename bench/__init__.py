"""chainyard's benchmarks: `python -m bench` (see bench/core.py for how figures plug in)."""
