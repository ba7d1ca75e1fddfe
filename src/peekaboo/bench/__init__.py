"""Benchmarks: ``python -m peekaboo.bench.shapes`` scores Peekaboo, its ablations and training-free
baselines on the synthetic shapes scenes (see docs/BENCHMARK.md); ``benchmarks/throughput.py`` times it."""

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, for a benchmark's provenance (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
