"""Quality against steps with the repository's paths: ``python benchmarks/steps.py [options]``.

Runs :mod:`peekaboo.bench.steps` (same options) from the repository root, filling in where its output goes when
the command does not say: the results JSON under ``benchmarks/results/``, and on the eval and robust splits the
report docs/STEPS.md (docs/STEPS_ROBUST.md) with its plot docs/steps.png (docs/steps_robust.png).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import steps

RESULTS = "benchmarks/results/steps_{split}.json"
DOCS = {"eval": (Path("docs/STEPS.md"), Path("docs/steps.png")),
        "robust": (Path("docs/STEPS_ROBUST.md"), Path("docs/steps_robust.png"))}
PROG = "python benchmarks/steps.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as :mod:`peekaboo.bench.steps` does, default its paths to the repository's, run it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = steps.parser(PROG).parse_args(argv)
    extra = []
    if args.out is None:
        extra += ["--out", RESULTS.format(split=args.split)]
    if args.split in DOCS and args.docs is None and args.plot is None:
        docs, plot = DOCS[args.split]
        extra += ["--docs", str(docs), "--plot", str(plot)]
    return steps.main([*argv, *extra], PROG)


if __name__ == "__main__":
    raise SystemExit(main())
