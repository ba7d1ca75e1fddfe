"""Throughput of Peekaboo's optimization, written to ``docs/PERFORMANCE.md`` (``--scenes objects``:
``docs/PERFORMANCE_OBJECTS.md``): ``python benchmarks/throughput.py [--scenes shapes|objects]``.

Runs :mod:`peekaboo.bench.throughput` (same options; ``--help`` lists the sections) with the repository's
configs, and owns where its report goes. Only a run of every section (and no ``--max-steps``) writes the scene
set's report, and it writes nothing else: not the README, no other file in docs/. docs/PERFORMANCE.md keeps the
sections that ``benchmarks/sd15_size.py`` and ``benchmarks/gpu.py`` wrote there.
Any other run writes its own output only: ``--out FILE`` (outside docs/), or, by default, nothing (the report is
printed as it runs). A path it may not write is refused before anything is measured.

Example::

    nice -n 10 python benchmarks/throughput.py --model bundled --steps 30
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import common, throughput
from peekaboo.bench.throughput.report import keep_blocks

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
DEFAULT_OUT = DOCS / "PERFORMANCE.md"  # the shapes scenes' report
OBJECTS_OUT = DOCS / "PERFORMANCE_OBJECTS.md"

log = logging.getLogger("throughput")


def destination(args: argparse.Namespace, p: argparse.ArgumentParser) -> Path | None:
    """Where the report of ``args`` goes (None: printed only); a path it may not write is a usage error."""
    whole = throughput.chosen_sections(args, p) == list(throughput.SECTIONS) and args.max_steps is None
    report = DEFAULT_OUT if args.scenes == "shapes" else OBJECTS_OUT
    return common.destination(args.out, whole, report, (README, DOCS),
                              "every section without --max-steps", p.error)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, then write the report where :func:`destination` says (or only print it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = throughput.parser(prog="python benchmarks/throughput.py")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report to write (default: docs/PERFORMANCE.md, or PERFORMANCE_OBJECTS.md with "
                        "--scenes objects, for a run of every section, else none; '-' = print only)")
    args = p.parse_args(argv)
    if args.config_dir is None:
        args.config_dir = REPO_ROOT / "configs"
    out = destination(args, p)
    text = throughput.measure(args, shlex.join(["python", "benchmarks/throughput.py", *argv]))
    if out is None:  # the sections were printed as they finished
        if args.out is None:
            log.info("report printed only: a run of some sections, or with --max-steps, writes only to --out FILE")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() == DEFAULT_OUT.resolve():
        text = keep_blocks(text, out.read_text() if out.is_file() else None)
    out.write_text(text)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
