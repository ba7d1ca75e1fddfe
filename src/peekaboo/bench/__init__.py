"""Benchmarks: ``python -m peekaboo.bench.shapes`` scores Peekaboo, its ablations and training-free
baselines on the synthetic shapes scenes (see docs/BENCHMARK.md); ``benchmarks/throughput.py`` times it."""

import platform
from pathlib import Path


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` field of ``/proc/cpuinfo`` (None where there is none, e.g. off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, for a benchmark's provenance (``platform.processor()`` is often empty on Linux)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has_bf16_units() -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX or AVX-512 BF16); without them bf16 runs emulated and
    is several times slower than float32."""
    flags = set((_cpuinfo("flags") or "").split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})
