"""The objects accuracy gate, intact and under each fault, with the repository's paths:
``python benchmarks/gate.py [options]``.

Runs :mod:`peekaboo.bench.gate` (same options) from the repository root. Without ``--out`` it writes the results
JSON to ``benchmarks/results/gate_objects.json``, and a run under every fault also the report, docs/GATE.md; a run
to its own ``--out`` writes only what it names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import gate
from peekaboo.bench.common import refuse_part_run

RESULTS = "benchmarks/results/gate_objects.json"
DOCS = "docs/GATE.md"
PROG = "python benchmarks/gate.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as :mod:`peekaboo.bench.gate` does, default its paths to the repository's, run it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = gate.parser(PROG)
    args = parser.parse_args(argv)
    extra = []
    if args.out is None:
        extra += ["--out", RESULTS]
        whole = set(args.faults) == {f.name for f in gate.FAULTS}
        refuse_part_run(Path(RESULTS), whole, False, parser.error, None)
        if args.docs is None and whole:
            extra += ["--docs", DOCS]
    return gate.main([*argv, *extra], PROG)


if __name__ == "__main__":
    raise SystemExit(main())
