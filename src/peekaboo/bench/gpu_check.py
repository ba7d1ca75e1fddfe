"""The GPU check, one command on one GPU (``benchmarks/gpu.py`` runs it and writes its section of
docs/PERFORMANCE.md): the ``gpu``-marked tests, Stable Diffusion 1.5's size measured on the GPU, and the masks of
bfloat16 against float32.

Parts, and their budget on one H100-class GPU: the whole check must end within 10 minutes.

=============  ======================================================================================  ======
part           what it runs                                                                            budget
=============  ======================================================================================  ======
``tests``      ``pytest -m gpu`` (tiny models; stopped after :data:`TESTS_TIMEOUT_S`)                  2 min
``throughput`` :func:`peekaboo.bench.throughput.gpu.section_gpu`: SD-1.5's configs with random weights  5 min
               built on the GPU and saved, fp32 and bf16 at 1, 4 and 8 pairs per step, the switches at
               bf16 and 4 pairs (``compile=true``, the slowest to start; VAE gradient checkpointing;
               ``estimator=full``), the paper-style loop; warm-up and timed steps each, every variant
               loaded afresh
``masks``      :func:`precision_masks`: the bundled model on :data:`MASK_PAIRS` synthetic pairs,       1 min
               float32 and bfloat16, at the preset and from alpha 0.5
(slack)        imports, Trainer setup, writing                                                         1 min
=============  ======================================================================================  ======

The budgets are :data:`BUDGET_S` and :data:`SLACK_S`.

The masks compare on the bundled model because it is the one trained model the GPU machine has (no hub): a random
SD-1.5 makes masks that mean nothing, so whether bf16 keeps them says nothing either.

The check keeps its own clock: past the budget (``--budget-s``) the rows and parts left are reported as not run,
the throughput part leaves the masks part its budget, and the slow-to-compile ``compile=true`` row comes last.
What it measured is never lost to a stop: each throughput row is logged as it ends, ``--progress FILE`` is rewritten
with the section so far after every row and part, and SIGTERM / SIGUSR1 end the check with the section of what
finished (:class:`~peekaboo.errors.Stopped`).

Dry mode (``--dry``) runs the same code on the CPU, briefly: the tests only collected, a tiny model for
the throughput part, 1 step per run, 2 pairs from alpha 0.5 for the masks. The test suite runs it
(tests/test_gpu_script.py); its report is never the repository's. Without ``--dry``, a machine where torch sees no
CUDA device is an error (a driver older than the CUDA that torch was built for, say), not a quiet dry run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peekaboo.bench.common import fmt, machine_info
from peekaboo.bench.common import markdown_table as table
from peekaboo.bench.methods import MODEL_GROUP
from peekaboo.bench.throughput import gpu
from peekaboo.bench.throughput.cpu import iou
from peekaboo.bench.throughput.harness import Bench, Report, binary_mask, ious, load_items
from peekaboo.diffusion.components import TINY
from peekaboo.errors import PeekabooError, Stopped

log = logging.getLogger("gpu_check")

PARTS = ("tests", "throughput", "masks")
BUDGET_S = {"tests": 120, "throughput": 300, "masks": 60}
TOTAL_BUDGET_S = 600
#: What the check leaves of the 10 minutes to starting Python, importing and writing: its default ``--budget-s``
#: is the rest.
SLACK_S = 60
TESTS_TIMEOUT_S = BUDGET_S["tests"]
NOT_RUN = "not run: the check's time budget ran out"
TITLE = "On a GPU"
MASK_PAIRS = 16
MASK_KIND = "raster_bilateral"  # the preset's kind, also from alpha 0.5
MASK_SETTINGS = ("preset", "alpha-0.5")
DRY_MASK_PAIRS = 2
DRY_MASK_SETTINGS = ("alpha-0.5",)  # the preset's region ranking alone takes a minute on a CPU
DRY_MASK_SIZE = 32
#: The dry mode's model: SD's layout at a tiny size, in the bundled tokenizer's vocabulary.
DRY_ARCH = replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": 49408})
DRY_SWITCHES = (("`vae_gradient_checkpointing=true`", "model.vae_gradient_checkpointing=true"),)


@dataclass
class Part:
    """One part's markdown, its wall time, and whether it ended as it should (tests passed, rows measured)."""

    name: str
    body: str
    seconds: float
    ok: bool
    summary: list[str] = field(default_factory=list)
    stopped: bool = False  # ended by a stop signal: the check writes what it has and goes no further
    skipped: bool = False  # not started: the check's time budget ran out before it


# -- tests ----------------------------------------------------------------------------------------------------
def gpu_tests(tests: Sequence[str], cwd: Path, dry: bool, timeout_s: float = TESTS_TIMEOUT_S) -> Part:
    """``pytest -m gpu`` over ``tests`` in ``cwd`` (dry: only collected, since without CUDA they all skip)."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               *(["--collect-only"] if dry else []), *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:  # its output is bytes, even with text=True
        captured = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                           for x in (err.stdout, err.stderr) if x)
        output, rc = f"{captured}\nstopped after {timeout_s:.0f} s", None
    seconds = time.perf_counter() - start
    log.info("pytest -m gpu output (last 40 lines):\n%s", "\n".join(output.splitlines()[-40:]))
    lines = [ln.strip("= ") for ln in output.splitlines() if ln.strip()]
    outcome = next((ln for ln in reversed(lines) if re.search(r"\b(passed|failed|error|collected|skipped)\b", ln)),
                   lines[-1] if lines else "no output")
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    ok = rc == 0
    shown = " ".join(["pytest -m gpu -q", *(["--collect-only"] if dry else []), *tests])
    body = f"`{shown}` (exit status {rc if rc is not None else 'none: stopped'}): {outcome}."
    if failures:
        body += "\n\n" + "\n".join(f"- {ln}" for ln in failures)
    log.info("gpu tests: %s", outcome)
    return Part("tests", body, seconds, ok, [f"`pytest -m gpu`: {outcome}"])


# -- throughput -----------------------------------------------------------------------------------------------
def throughput(device: torch.device, config_dir: str | Path | None, dry: bool, deadline: float | None = None,
               progress: Callable[[str], None] | None = None) -> Part:
    """The GPU section of the throughput benchmark (:func:`~peekaboo.bench.throughput.gpu.section_gpu`); dry: a
    tiny model on ``device`` (the CPU), 1 step per run, one pair per step, one switch. A stop keeps the rows
    measured so far (the part is marked stopped); ``progress`` gets the part's body after every row."""
    report = Report()
    start = time.perf_counter()
    options: dict[str, Any] = {"device": device, "config_dir": config_dir, "deadline": deadline,
                               "on_row": progress}
    if dry:
        options |= {"warmup": 0, "steps": 1, "max_steps": 1, "arch": DRY_ARCH, "batch_sizes": (1,),
                    "switches": DRY_SWITCHES, "mask_size": DRY_MASK_SIZE}
    stopped = False
    try:
        gpu.section_gpu(report, **options)
    except Stopped:
        stopped = True
    seconds = time.perf_counter() - start
    body = report.sections[-1][1] if report.sections else "stopped before the model was built"
    rows: dict[str, dict[str, float]] = report.summary.get("gpu_rows", {})
    # A row that runs out of memory is a figure (that setting does not fit this card), not a failure.
    ok = not stopped and "failed" not in body
    summary = []
    largest = max((int(m.group(1)) for label in rows if (m := re.fullmatch(r"fp32, B=(\d+)", label))), default=None)
    if largest is not None and f"bf16, B={largest}" in rows:
        f32, b16 = rows[f"fp32, B={largest}"], rows[f"bf16, B={largest}"]
        pair = f"{largest} pair{'s' * (largest > 1)}"
        summary.append(f"SD-1.5 size, {pair} per step: fp32 {f32['pairs_per_hour']:,.0f} pairs/hour "
                       f"({f32['peak_mb']:,.0f} MB peak), bf16 {b16['pairs_per_hour']:,.0f} pairs/hour "
                       f"({b16['peak_mb']:,.0f} MB peak)")
    return Part("throughput", body, seconds, ok, summary, stopped)


# -- bf16 vs fp32 masks ---------------------------------------------------------------------------------------
def precision_masks(device: torch.device, config_dir: str | Path | None, pairs: int = MASK_PAIRS,
                    max_steps: int | None = None, model: str | None = None,
                    settings: Sequence[str] = MASK_SETTINGS, deadline: float | None = None) -> Part:
    """The same pairs optimized with float32 and with bfloat16 weights (``bf16-mixed``), from the same seeds:
    IoU of the two binary masks of each pair, and each precision's mIoU against the ground truth.

    ``settings`` (:data:`MASK_SETTINGS`): ``preset``, the preset ``shapes`` (its region start ranks regions for a
    while before the first step), and ``alpha-0.5``, the paper-style start over the sweep's alpha-start step count,
    where rounding has more steps to grow. A setting not started by ``deadline`` (a ``time.perf_counter()`` value)
    is a row marked not run; a stop keeps the rows finished before it.
    """
    start = time.perf_counter()
    bench = Bench(model, device, warmup=0, steps=1, preset=MODEL_GROUP, max_steps=max_steps, config_dir=config_dir)
    configs = {"preset": (f"preset `{MODEL_GROUP}`", bench.config),
               "alpha-0.5": ("alpha-0.5 start", lambda *o: bench.reference_config(MASK_KIND, *o))}
    rows, summary, ok, stopped = [], [], True, False
    for label, config in (configs[name] for name in settings):
        if deadline is not None and time.perf_counter() > deadline:
            rows.append([label, pairs, "-", "", "", "", "", NOT_RUN])
            ok = False
            continue
        masks, scores, steps = {}, {}, 0
        try:
            for precision, overrides in gpu.PRECISIONS.items():
                cfg = config(*overrides)
                steps = cfg.trainer.max_steps
                items = load_items(pairs, cfg.optimization.mask.size, cfg.image_options.fit)
                backbone = bench.backbone(cfg)
                _, results = bench.trainer_run(f"{label}, {precision}", cfg, items, backbone, warmup=0, steps=steps)
                ok = ok and not any(r.failed for r in results)
                threshold = cfg.optimization.threshold
                masks[precision] = [binary_mask(r.alpha, it, threshold) for r, it in zip(results, items, strict=True)]
                scores[precision] = float(np.mean(ious([r.alpha for r in results], items, threshold)))
                del backbone
                gpu.release()
        except Stopped:
            rows.append([label, pairs, steps, "", "", "", "", "stopped"])
            ok, stopped = False, True
            break
        agree = [iou(a, b) for a, b in zip(masks["bf16"], masks["fp32"], strict=True)]
        same = sum(bool(np.array_equal(a, b)) for a, b in zip(masks["bf16"], masks["fp32"], strict=True))
        rows.append([label, pairs, steps, fmt(scores["fp32"]), fmt(scores["bf16"]), fmt(float(np.mean(agree))),
                     fmt(min(agree)), f"{same}/{pairs}"])
        summary.append(f"bf16 vs fp32 masks, {label}: mean IoU {np.mean(agree):.3f} (min {min(agree):.3f}), "
                       f"mIoU {scores['fp32']:.3f} vs {scores['bf16']:.3f}")
    body = (f"The bundled model on {pairs} synthetic `tune` pairs, each optimized twice from the same seeds: "
            "float32 weights (`trainer.precision=32-true`; on a GPU with TF32 matmuls, `model.tf32`'s default) and "
            "bfloat16 weights (`bf16-mixed`). \"bf16 vs fp32\" is the IoU of each pair's two binary masks "
            "(at the run's `optimization.threshold`, at the image's size); mIoU is against the ground truth.\n\n"
            + table(["setting", "pairs", "steps", "mIoU fp32", "mIoU bf16", "bf16 vs fp32 mean IoU", "min IoU",
                     "identical masks"], rows))
    return Part("masks", body, time.perf_counter() - start, ok, summary, stopped)


# -- the whole check ------------------------------------------------------------------------------------------
def parser(prog: str) -> argparse.ArgumentParser:
    """The check's options (where its report goes is the script's)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true",
                   help="the CPU dry mode (without it, a machine with no visible CUDA device is an error)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--tests", nargs="+", default=["tests"], help="what `pytest -m gpu` collects (default: tests)")
    p.add_argument("--config-dir", type=Path, default=None, help="a folder of presets (default: the packaged ones)")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S - SLACK_S,
                   help="seconds the parts may take in all; rows and parts past it are reported as not run "
                        f"(default {TOTAL_BUDGET_S - SLACK_S:.0f}: the 10 minutes less {SLACK_S} s of slack)")
    p.add_argument("--progress", type=Path, default=None,
                   help="file rewritten with the section so far after every throughput row and every part, so a "
                        "check killed at a time limit leaves what it measured (e.g. a folder the machine returns)")
    return p


def chosen_parts(args: argparse.Namespace, p: argparse.ArgumentParser | None = None) -> list[str]:
    """The parts ``args.parts`` names, in :data:`PARTS`' order (an unknown one is a usage error)."""
    names = {s.strip() for s in args.parts.split(",") if s.strip()}
    if unknown := sorted(names - set(PARTS)):
        (p or parser("gpu")).error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return [s for s in PARTS if s in names]


def require_device(args: argparse.Namespace) -> None:
    """A check that is not dry needs a CUDA device.

    Raises:
        PeekabooError: torch sees none.
    """
    if not args.dry and not torch.cuda.is_available():
        raise PeekabooError(f"no CUDA device visible to torch {torch.__version__} (built for CUDA "
                            f"{torch.version.cuda or 'none'}): run the check on a GPU machine whose driver supports "
                            "that CUDA, or pass --dry for the CPU dry mode.")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM / SIGUSR1 raise :class:`~peekaboo.errors.Stopped` wherever the check is (a fit notes them itself
    and stops at its next step), so the check ends by writing what it measured instead of dying."""
    def stop(signum: int, frame: Any) -> None:
        raise Stopped(f"signal {signum}")

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace, command: str, cwd: Path,
        progress: Callable[[str], None] | None = None) -> tuple[str, bool, bool]:
    """Run the parts ``args`` asks for; return the section's markdown (its ``## On a GPU`` heading included),
    whether every part ended as it should, and whether a stop signal ended the check.

    Args:
        command: the command line, quoted in the section.
        cwd: where ``pytest`` runs (the repository root).
        progress: gets the section so far after every part and every throughput row (``--progress``).
    """
    require_device(args)
    dry = args.dry
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    if not dry:
        log.info("torch %s, CUDA %s, %s", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(device))
    config_dir = args.config_dir
    names = chosen_parts(args)
    parts: list[Part] = []
    start = time.perf_counter()
    deadline = start + args.budget_s

    def report(partial: Part | None = None) -> str:
        shown = [*parts, *([partial] if partial else [])]
        return render(shown, command, dry, time.perf_counter() - start, names)

    def progress_of(name: str) -> Callable[[str], None] | None:
        if progress is None:
            return None
        return lambda body: progress(report(Part(name, body, time.perf_counter() - part_start, True)))

    with stop_on_signals():
        for i, name in enumerate(names):
            # A part may run until the later parts' budgets are all that is left.
            part_deadline = deadline - sum(BUDGET_S[later] for later in names[i + 1 :])
            part_start = time.perf_counter()
            if part_start > part_deadline:
                parts.append(Part(name, NOT_RUN + ".", 0.0, False, skipped=True))
                continue
            log.info("part %s (budget %d s, %.0f s left before its deadline)", name, BUDGET_S[name],
                     part_deadline - part_start)
            try:
                if name == "tests":
                    part = gpu_tests(args.tests, cwd, dry, min(TESTS_TIMEOUT_S, part_deadline - part_start))
                elif name == "throughput":
                    part = throughput(device, config_dir, dry, part_deadline, progress_of(name))
                elif dry:
                    part = precision_masks(device, config_dir, DRY_MASK_PAIRS, 1, settings=DRY_MASK_SETTINGS,
                                           deadline=part_deadline)
                else:
                    part = precision_masks(device, config_dir, deadline=part_deadline)
            except Stopped as err:
                part = Part(name, f"stopped ({err}) before it finished.", time.perf_counter() - part_start, False,
                            stopped=True)
            except Exception as err:  # one part's failure must not cost the others' figures
                log.exception("part %s failed", name)
                first = str(err).splitlines()[0] if str(err) else ""
                part = Part(name, f"failed: {type(err).__name__}: {first}", time.perf_counter() - part_start, False)
            gpu.release()
            log.info("part %s: %.0f s (budget %d s)%s\n%s", name, part.seconds, BUDGET_S[name],
                     "" if part.ok else ", FAILED", part.body)  # in the log as it ends, in case a later part hangs
            parts.append(part)
            if progress is not None:
                progress(report())
            if part.stopped:
                break
    stopped = any(p.stopped for p in parts)
    return report(), all(p.ok for p in parts) and len(parts) == len(names), stopped


def render(parts: Sequence[Part], command: str, dry: bool, wall_s: float, names: Sequence[str] = ()) -> str:
    """The section: provenance, a summary, then one subsection per part (``names``: every part the check was to
    run; those not reached, after a stop, are listed as such)."""
    info: dict[str, Any] = machine_info()
    gpu_name = info["cuda"] or "none (dry mode on the CPU)"
    cuda = torch.version.cuda or "-"
    costs = ", ".join(f"{p.name} {p.seconds:.0f} s (budget {BUDGET_S[p.name]} s)" for p in parts)
    made = "Generated by `benchmarks/gpu.py`" + (" in dry mode (tiny model, 1 step): no figures to quote" * dry)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {TITLE}", "", made + ".", "", f"- Date: {date}; command: `{command}`",
             f"- GPU: {gpu_name}; CUDA {cuda}; torch {info['torch']}; CPU {info['processor']}, {info['cpu_count']} "
             "cores",
             f"- Cost: {wall_s / 60:.1f} min wall of the {TOTAL_BUDGET_S // 60}-minute budget: {costs}", ""]
    summary = [line for p in parts for line in p.summary]
    done = {p.name for p in parts}
    failed = [p.name for p in parts if not p.ok and not p.stopped and not p.skipped]
    if stopped := [p.name for p in parts if p.stopped]:
        summary.insert(0, f"**Stopped** by a signal in {stopped[0]}; not reached: "
                          f"{', '.join(n for n in names if n not in done) or 'none'}")
    if skipped := [p.name for p in parts if p.skipped]:
        summary.insert(0, f"**Not run** (the time budget ran out): {', '.join(skipped)}")
    if failed:
        summary.insert(0, f"**Failed**: {', '.join(failed)} (below)")
    lines += [f"- {line}." for line in summary] + [""]
    titles = {"tests": "GPU tests", "throughput": "Stable Diffusion 1.5 size", "masks": "bf16 vs fp32 masks"}
    for p in parts:
        lines += [f"### {titles[p.name]}", "", p.body, ""]
    return "\n".join(lines).rstrip("\n")
