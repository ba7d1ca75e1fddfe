"""The ablation benchmark (on the shapes scenes) with the repository's paths: ``python benchmarks/ablation.py
[options]`` (``make bench``).

Runs :mod:`peekaboo.bench.ablation` (same options) from the repository root, filling in where its output goes
when the command does not say: the results JSON under ``benchmarks/results/``, docs/BENCHMARK.md for the eval
split (with the sweep's trials, once the sweep has run), docs/BENCHMARK_ROBUST.md for the robust split, and the
sweep's cache of finished trials. The README's one generated block, the eval table, changes only with
``--readme README.md``. A run to its own ``--out`` file (a side experiment) writes its own output only: no
report in docs/ unless ``--docs`` names one, and never the README.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import ablation
from peekaboo.bench.scoring import BENCH_SPLITS

# Relative to the repository root (the working folder), as the reports quote them.
RESULTS = {split: Path(f"benchmarks/results/shapes_{split}.json") for split in BENCH_SPLITS}
SWEEP_OUT = Path("benchmarks/results/shapes_sweep.json")
SWEEP_CACHE = Path("work/bench_sweep_cache.json")
DOCS = {"eval": Path("docs/BENCHMARK.md"), "robust": Path("docs/BENCHMARK_ROBUST.md")}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as :mod:`peekaboo.bench.ablation` does, default its paths to the repository's, run it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ablation.parser(prog="python benchmarks/ablation.py").parse_args(argv)
    # A run to its own --out file (a side experiment) leaves the split's report alone unless --docs names one.
    default_out = args.out is None
    if not default_out and args.readme is not None:
        ablation.parser(prog="python benchmarks/ablation.py").error(
            "--readme: a run to its own --out file leaves the README alone; drop --out to refresh the table.")
    if default_out:
        args.out = SWEEP_OUT if args.sweep else RESULTS[args.split]
    if args.sweep_cache is None:
        args.sweep_cache = SWEEP_CACHE
    if args.docs is None and default_out and args.split in DOCS and not args.sweep:
        args.docs = DOCS[args.split]
    if args.sweep_report is None and SWEEP_OUT.is_file():
        args.sweep_report = SWEEP_OUT
    return ablation.run(args, shlex.join(["python", "benchmarks/ablation.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
