"""Stable Diffusion 1.5's size on this CPU, measured, and the pairs per step GPUs would hold, derived:
``python benchmarks/sd15_size.py``.

Runs :mod:`peekaboo.bench.sd15_size` (same options) from the repository root. Only the section's own run (every
setting at the default steps and pairs) writes the repository's report: its section of docs/PERFORMANCE.md,
between the markers that ``benchmarks/throughput.py`` keeps. Any other run writes its ``--out FILE`` (outside
docs/) or only prints. A step takes tens of seconds: run it on an otherwise idle machine.

Example::

    python benchmarks/sd15_size.py --model-dir /tmp/sd15-random   # keeps the built model for the next run
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import common, sd15_size
from peekaboo.bench.throughput.report import SD15_CPU_BLOCK, write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
DEFAULT_OUT = DOCS / "PERFORMANCE.md"

log = logging.getLogger("sd15_size")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, then write the section where :func:`peekaboo.bench.common.destination` says (or only print it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = sd15_size.parser(prog="python benchmarks/sd15_size.py")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write (default: the section of docs/PERFORMANCE.md for a run of every "
                        "setting at the default steps, else none; '-' = print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.config_dir is None:
        args.config_dir = REPO_ROOT / "configs"
    sd15_size.chosen_settings(args, p)
    out = common.destination(args.out, sd15_size.is_default_run(args), DEFAULT_OUT, (README, DOCS),
                             "a run of every setting at the default steps", p.error)
    body = sd15_size.measure(args, shlex.join(["python", "benchmarks/sd15_size.py", *argv]))
    text = f"## {sd15_size.TITLE}\n\n{body}"
    if out is not None:
        write_section(out, DEFAULT_OUT, SD15_CPU_BLOCK, text)
        log.info("wrote %s", out)
    elif args.out is None:
        log.info("section printed only: a run of some settings, or other steps, writes only to --out FILE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
