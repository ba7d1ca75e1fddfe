"""Throughput of Peekaboo's optimization: seconds per step, pairs per hour and peak memory, measured side by side
in one run and returned as a markdown report (``benchmarks/throughput.py`` writes it to ``docs/PERFORMANCE.md``).

Sections (``--sections`` picks a subset):

- ``batch``: B = 1, 4, 16 pairs per step through the Trainer (``peekaboo.optim.engine.optimize_pairs``);
  median seconds per step, fixed cost per run, pairs per hour at the preset's ``max_steps``, peak memory.
- ``overhead``: the same step as a bare PyTorch loop (no Lightning) vs through the Trainer, at B = 1.
- ``reference``: a loop in the style of the paper's code (:mod:`peekaboo.bench.reference_loop`) vs the project's
  default path (the preset's ``data.pairs_per_step`` pairs per module, per pair) and one pair per module, per
  bilateral mask kind; and the masks both make on synthetic ``tune`` pairs (mIoU).
- ``end_to_end``: pairs per hour and mIoU on held-out pairs, the paper-style loop with the paper's settings vs
  the project's default and, where the scene set's ``tune`` split chose some, fast settings
  (:data:`.cpu.FAST_SETTINGS`).

``--scenes`` picks the synthetic scenes (shapes or objects) and with them the bundled model's preset; runs compared
with the paper-style loop take its start and its estimator, score distillation (:data:`.harness.REFERENCE_SETTINGS`).

Two sections of docs/PERFORMANCE.md come from other scripts, which write them between markers that a run of this
benchmark keeps (:func:`peekaboo.bench.throughput.report.keep_blocks`): Stable Diffusion 1.5's size on the CPU
(:mod:`peekaboo.bench.sd15_size`, ``benchmarks/sd15_size.py``) and on a GPU (:mod:`.gpu`, run by
:mod:`peekaboo.bench.gpu_check`, ``benchmarks/gpu.py``).

Timing: every measured run takes ``--warmup`` steps, then ``--steps`` timed steps; a step's time is the
interval between consecutive ``on_train_batch_end`` calls (the same points in the bare and reference loops),
the reported figure is their median, so a stray slow step on a shared machine does not move it. A run's
"fixed" cost is its wall time minus its steps: Trainer and module setup, prompt encoding, the region ranking of
a region start (``mask.init=region``; forgotten before every run, so each run pays it as a fresh process does),
teardown.

Modules: :mod:`.harness` (inputs and the three timed loops), :mod:`.cpu` (the sections), :mod:`.gpu` (the GPU
section, which ``benchmarks/gpu.py`` runs), :mod:`.report` (the markdown).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from peekaboo.bench.common import cpu_seconds
from peekaboo.bench.methods import SCENE_PRESETS
from peekaboo.bench.throughput import cpu
from peekaboo.bench.throughput.harness import TIMED_STEPS, WARMUP_STEPS, Bench, Report, load_items
from peekaboo.bench.throughput.report import header_lines, load_note, render

SECTIONS = tuple(cpu.SECTIONS)
# One intra-op thread: on a niced process sharing 2 cores with other jobs, two OpenMP threads spend most of a
# step waiting for each other at barriers (the batch section measures every core beside it).
CPU_THREADS = 1

log = logging.getLogger("throughput")


def parser(prog: str = "python -m peekaboo.bench.throughput") -> argparse.ArgumentParser:
    """The benchmark's options (where the report goes is the caller's: see ``benchmarks/throughput.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", choices=tuple(SCENE_PRESETS), default="shapes",
                   help="the synthetic scene set the runs optimize, with its bundled model's preset")
    p.add_argument("--model", default=None,
                   help="model.pretrained: a diffusers folder or hub id (default: the preset's own model)")
    p.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=CPU_THREADS, help="torch intra-op threads on CPU")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override trainer.max_steps (quick checks of this script only; the report then is not "
                        "comparable)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="a folder of presets (default: the packaged ones, or $PEEKABOO_CONFIG_DIR)")
    return p


def chosen_sections(args: argparse.Namespace, p: argparse.ArgumentParser | None = None) -> list[str]:
    """The sections ``args.sections`` names, in the report's order.

    Raises:
        SystemExit: an unknown section (the usage error of ``p``, default :func:`parser`).
    """
    names = {s.strip() for s in args.sections.split(",") if s.strip()}
    if unknown := sorted(names - set(SECTIONS)):
        (p or parser()).error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


def measure(args: argparse.Namespace, command: str) -> str:
    """Run the sections ``args`` (from :func:`parser`) asks for and return the whole report as markdown.

    Args:
        command: the command line, quoted in the report.
    """
    sections = chosen_sections(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the Trainer's per-run banner
    # A fresh inductor cache, so a compiled run measures a first run's compilation.
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch.set_num_threads(args.threads)
        load_before = os.getloadavg()
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        report = Report()
        bench = Bench(args.model, torch.device("cpu"), args.warmup, args.steps, max_steps=args.max_steps,
                      config_dir=args.config_dir, scenes=args.scenes)
        items = []
        for name in sections:
            log.info("section %s", name)
            if not items:
                cfg = bench.config()
                n = max(max(cpu.BATCH_SIZES), cpu.QUALITY_PAIRS)
                items = load_items(n, cfg.optimization.mask.size, cfg.image_options.fit, scenes=args.scenes)
            cpu.SECTIONS[name](bench, report, items)
        cost = (f"- Benchmark cost: {(time.perf_counter() - wall_start) / 60:.1f} min wall, "
                f"{(cpu_seconds() - cpu_start) / 60:.1f} min CPU")
        header = [*header_lines(args, load_before, command), cost]
        return render(report, header, load_note(load_before, os.getloadavg(), args.threads), args.scenes)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peekaboo.bench.throughput``: measure, printing each section as it finishes; writes no file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    measure(parser().parse_args(argv), shlex.join(["python", "-m", "peekaboo.bench.throughput", *argv]))
    return 0
