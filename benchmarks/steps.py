"""Quality against steps with the repository's paths: ``python benchmarks/steps.py [options]``.

Runs :mod:`peekaboo.bench.steps` (same options) from the repository root, filling in where its output goes when
the command does not say: the results JSON under ``benchmarks/results/`` (``steps_<split>.json`` on the shapes
scenes, ``steps_objects_<split>.json`` on the objects scenes), and on the shapes eval and robust splits the
report docs/STEPS.md (docs/STEPS_ROBUST.md) with its plot docs/steps.png (docs/steps_robust.png), and on the
objects scenes docs/STEPS_OBJECTS.md (docs/STEPS_OBJECTS_ROBUST.md) with docs/steps_objects.png
(docs/steps_objects_robust.png). Only a run of the scene set's built-in settings at the default step counts, with
nothing added, writes that report: a run to its own ``--out`` file, or of some settings, writes only what it names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import steps
from peekaboo.bench.common import refuse_part_run

RESULTS = {"shapes": "benchmarks/results/steps_{split}.json",
           "objects": "benchmarks/results/steps_objects_{split}.json"}
DOCS = {"shapes": {"eval": (Path("docs/STEPS.md"), Path("docs/steps.png")),
                   "robust": (Path("docs/STEPS_ROBUST.md"), Path("docs/steps_robust.png"))},
        "objects": {"eval": (Path("docs/STEPS_OBJECTS.md"), Path("docs/steps_objects.png")),
                    "robust": (Path("docs/STEPS_OBJECTS_ROBUST.md"), Path("docs/steps_objects_robust.png"))}}
PROG = "python benchmarks/steps.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as :mod:`peekaboo.bench.steps` does, default its paths to the repository's, run it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = steps.parser(PROG)
    args = parser.parse_args(argv)
    extra = []
    default_out = args.out is None
    if default_out:
        extra += ["--out", RESULTS[args.scenes].format(split=args.split)]
    # Only the report's own run (the scene set's built-in settings at the default step counts, nothing added)
    # writes the split's report; a run to its own --out file, or of some settings, writes only what it names.
    every = {s.label for s in steps.builtin_settings(args.scenes)}
    whole = ((args.builtins is None or set(args.builtins) == every) and not args.candidate
             and not args.set and sorted(args.steps) == sorted(steps.STEP_COUNTS))
    if default_out:
        refuse_part_run(Path(RESULTS[args.scenes].format(split=args.split)), whole, args.resume,
                        parser.error, "--resume")
    docs_of = DOCS[args.scenes]
    if default_out and whole and args.split in docs_of and args.docs is None and args.plot is None:
        docs, plot = docs_of[args.split]
        extra += ["--docs", str(docs), "--plot", str(plot)]
    return steps.main([*argv, *extra], PROG)


if __name__ == "__main__":
    raise SystemExit(main())
