"""The ablation benchmark with the repository's paths: ``python benchmarks/ablation.py [--scenes shapes|objects]
[options]`` (``make bench``).

Runs :mod:`peekaboo.bench.ablation` (same options) from the repository root, filling in where its output goes
when the command does not say: the results JSON under ``benchmarks/results/`` (``<scenes>_<split>.json``), the
scene set's report for the eval split (docs/BENCHMARK.md for shapes, docs/BENCHMARK_OBJECTS.md for objects; with
the sweep's trials, once the sweep has run) and for the robust split (``..._ROBUST.md``), and the sweep's cache of
finished trials; a table (not a sweep) runs at the scene set's committed sweep choices (``--tuned``) where there
are some. The README's one generated block, the main rows of the objects eval table, changes only with
``--readme README.md`` (``make bench`` passes it). A run to its own ``--out`` file (a side experiment) writes its
own output only: no report in docs/ unless ``--docs`` names one, and never the README.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import ablation
from peekaboo.bench.common import refuse_part_run
from peekaboo.bench.methods import SCENE_PRESETS
from peekaboo.bench.scoring import BENCH_SPLITS

# Relative to the repository root (the working folder), as the reports quote them; by scene set, then split.
RESULTS = {scenes: {split: Path(f"benchmarks/results/{scenes}_{split}.json") for split in BENCH_SPLITS}
           for scenes in SCENE_PRESETS}
SWEEP_OUT = {scenes: Path(f"benchmarks/results/{scenes}_sweep.json") for scenes in SCENE_PRESETS}
# The finished trials are committed with the results: a sweep takes more CPU-hours than one session has, and a
# session's work folder does not outlive it. The claims beside the cache (``*.claims/``) are not committed.
SWEEP_CACHE = {scenes: Path(f"benchmarks/results/{scenes}_sweep_trials.json") for scenes in SCENE_PRESETS}
DOCS = {"shapes": {"eval": Path("docs/BENCHMARK.md"), "robust": Path("docs/BENCHMARK_ROBUST.md")},
        "objects": {"eval": Path("docs/BENCHMARK_OBJECTS.md"), "robust": Path("docs/BENCHMARK_OBJECTS_ROBUST.md")}}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as :mod:`peekaboo.bench.ablation` does, default its paths to the repository's, run it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ablation.parser(prog="python benchmarks/ablation.py")
    args = parser.parse_args(argv)
    # A run to its own --out file (a side experiment) leaves the split's report alone unless --docs names one.
    default_out = args.out is None
    if not default_out and args.readme is not None:
        parser.error(
            "--readme: a run to its own --out file leaves the README alone; drop --out to refresh the table.")
    if default_out:
        args.out = SWEEP_OUT[args.scenes] if args.sweep else RESULTS[args.scenes][args.split]
        whole = args.methods is None and args.pairs is None and not args.overrides
        refuse_part_run(args.out, whole or args.sweep, args.resume or args.merge,
                        parser.error, "--resume (or --merge)")
    if args.sweep_cache is None:
        args.sweep_cache = SWEEP_CACHE[args.scenes]
    docs = DOCS[args.scenes]
    if args.docs is None and default_out and args.split in docs and not args.sweep:
        args.docs = docs[args.split]
    if args.sweep_report is None and SWEEP_OUT[args.scenes].is_file():
        args.sweep_report = SWEEP_OUT[args.scenes]
    # The table runs at the scene set's tune sweep's choices, where it has one (the shapes choices are in the code).
    if args.tuned is None and not args.sweep and SWEEP_OUT[args.scenes].is_file():
        args.tuned = SWEEP_OUT[args.scenes]
    return ablation.run(args, shlex.join(["python", "benchmarks/ablation.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
