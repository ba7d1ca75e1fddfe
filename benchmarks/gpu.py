"""The GPU check in one command, about 10 minutes on one GPU: ``python benchmarks/gpu.py``.

Runs :mod:`peekaboo.bench.gpu_check` (its docstring has the parts and their budget) from the repository root: the
``gpu``-marked tests, Stable Diffusion 1.5's size on the GPU (fp32 / bf16, 1 / 4 / 8 pairs per step, the switches)
and bf16 against fp32 masks. Only a run of every part on a CUDA device writes the repository's report: its section
of docs/PERFORMANCE.md, between the markers that ``benchmarks/throughput.py`` keeps. Any other run writes its
``--out FILE`` (outside docs/) or only prints. ``--dry`` runs the dry mode on the CPU (tiny model, 1 step, under a
minute) and writes no docs; without it, no CUDA device is an error. Exit status 1 when a part failed or was not
reached in the time budget; 143 when a signal stopped the check, after printing what it measured (and writing it
to ``--progress``, never to docs/).

Examples::

    python benchmarks/gpu.py                                  # on a GPU machine: writes docs/PERFORMANCE.md
    timeout 570 python benchmarks/gpu.py --progress $OUT/gpu.md  # a lent machine: what ran is in $OUT anyway
    python benchmarks/gpu.py --parts throughput --out gpu.md  # one part, to a side file
    python benchmarks/gpu.py --dry                            # the CPU check the test suite runs
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.bench import common, gpu_check
from peekaboo.bench.throughput.report import GPU_BLOCK, write_section
from peekaboo.errors import Stopped, exit_status
from peekaboo.utils import files

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
DEFAULT_OUT = DOCS / "PERFORMANCE.md"

log = logging.getLogger("gpu_check")


def main(argv: Sequence[str] | None = None) -> int:
    """Check, then write the section where :func:`peekaboo.bench.common.destination` says (or only print it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = gpu_check.parser(prog="python benchmarks/gpu.py")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write (default: the GPU section of docs/PERFORMANCE.md for a run of every "
                        "part on a GPU, else none; '-' = print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.config_dir is None:
        args.config_dir = REPO_ROOT / "configs"
    whole = gpu_check.chosen_parts(args, p) == list(gpu_check.PARTS) and not args.dry
    out = common.destination(args.out, whole, DEFAULT_OUT, (README, DOCS), "a run of every part on a GPU", p.error)
    if args.progress is not None and common.destination(args.progress, False, DEFAULT_OUT, (README, DOCS),
                                                        "no progress file", p.error) is None:
        p.error("--progress -: name a file (outside docs/) to rewrite with the section so far.")
    return exit_status(lambda: _check(args, argv, out),
                       rerun_hint="what it measured is printed above (and in --progress); rerun to measure again")


def _check(args: argparse.Namespace, argv: Sequence[str], out: Path | None) -> int:
    """Run the check; write its section to ``out`` (None: print only) unless a signal stopped it."""
    def progress(text: str) -> None:
        files.write_text(text + "\n", args.progress)

    text, ok, stopped = gpu_check.run(args, shlex.join(["python", "benchmarks/gpu.py", *argv]), REPO_ROOT,
                                      progress if args.progress is not None else None)
    print(f"\n{text}\n", flush=True)
    if stopped:  # a stopped check's section never replaces a finished one in the repository's report
        raise Stopped("the check was stopped by a signal")
    if out is not None:
        write_section(out, DEFAULT_OUT, GPU_BLOCK, text)
        log.info("wrote %s", out)
    elif args.out is None:
        log.info("section printed only: a dry run, or of some parts, writes only to --out FILE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
