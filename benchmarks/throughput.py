"""Throughput of Peekaboo's optimization, written to ``docs/PERFORMANCE.md``: ``python benchmarks/throughput.py``.

Runs :mod:`peekaboo.bench.throughput` (same options; ``--help`` lists the sections) with the repository's
configs, and owns where its report goes: ``--out`` (default docs/PERFORMANCE.md, ``-`` to print only);
``--update`` refreshes only the ``--sections`` measured in an existing report; the report's Summary is copied
between the performance markers of ``--readme`` (default README.md; ``-`` for none).

Example::

    nice -n 10 python benchmarks/throughput.py --model bundled --steps 30 --out docs/PERFORMANCE.md
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import throughput
from peekaboo.bench.common import update_marked
from peekaboo.errors import PeekabooError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "PERFORMANCE.md"
DEFAULT_README = REPO_ROOT / "README.md"

log = logging.getLogger("throughput")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, then write the report to ``--out`` (or print it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = throughput.parser(prog="python benchmarks/throughput.py")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write ('-' = print only)")
    p.add_argument("--update", action="store_true",
                   help="merge the sections measured into the existing --out (the others, and their figures, stay)")
    p.add_argument("--readme", type=Path, default=DEFAULT_README,
                   help="copy the report's Summary between this file's performance markers ('-' = none)")
    args = p.parse_args(argv)
    if args.config_dir is None:
        args.config_dir = REPO_ROOT / "configs"
    text = throughput.measure(args, shlex.join(["python", "benchmarks/throughput.py", *argv]))
    if str(args.out) == "-":  # the sections were printed as they finished
        return 0
    if args.update and args.out.is_file():
        try:
            text = throughput.update_report(args.out.read_text(), text)
        except PeekabooError as err:  # the measured report is not lost: it was printed as it ran
            log.error("%s: %s", args.out, err)
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log.info("wrote %s", args.out)
    if str(args.readme) != "-":
        source = Path(os.path.relpath(args.out.resolve(), args.readme.resolve().parent)).as_posix()
        if update_marked(args.readme, throughput.readme_block(text, source), throughput.README_MARKERS):
            log.info("updated %s", args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
