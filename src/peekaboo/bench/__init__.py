"""Benchmarks: ``python -m peekaboo.bench.shapes`` scores Peekaboo, its ablations and training-free
baselines on the synthetic shapes scenes (see docs/BENCHMARK.md)."""
