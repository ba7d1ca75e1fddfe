"""Throughput of Peekaboo's optimization: seconds per step, pairs per hour, memory, and what each fast path
buys, measured side by side in one run and written to ``docs/PERFORMANCE.md``.

Sections (``--sections`` picks a subset):

- ``batch``: B = 1, 4, 16 pairs per step through the Lightning Trainer (``peekaboo.optim.engine.optimize_pairs``);
  median seconds per step, fixed cost per run, pairs per hour at the preset's ``max_steps``, peak memory.
- ``overhead``: the same step as a bare PyTorch loop (no Lightning) vs through the Trainer, at B = 1.
- ``reference``: a loop in the style of the paper's code (:mod:`peekaboo.bench.reference_loop`) vs the project's
  default path (the preset's ``data.pairs_per_step`` pairs per module, per pair) and one pair per module, per
  bilateral mask kind; and the masks both make on synthetic ``tune`` pairs (mIoU).
- ``fast``: the project's fast paths (``model.compile``, bf16 weights with ``bf16-mixed``, both) at B = 1 vs the
  reference loop, each with the mIoU of its masks; and the default path batched (B = 16) per pair.
- ``switches``: ``guidance.batch_cfg``, ``model.channels_last``, ``model.compile`` (compile time apart),
  ``model.attention`` (SDPA vs classic), bf16 autocast, ``optimization.composite=latent`` (with the latent
  blend's error against the true encoding), ``guidance.encode_resolution`` and the number of CPU threads.
- ``early_stop``: steps saved by ``optimization.early_stop`` and what it costs in IoU.
- ``end_to_end``: pairs per hour and mIoU on held-out pairs, the paper-style loop with the paper's settings vs
  the project's default and fast settings (:data:`peekaboo.bench.steps.FAST`).
- ``gpu``: Stable-Diffusion-1.5-sized random-weight model at 512x512, fp32 vs bf16, B = 1, 4, 8 and the
  switches; only where CUDA is available ("not measured: no GPU" elsewhere).

Timing: every measured run takes ``--warmup`` steps, then ``--steps`` timed steps; a step's time is the
interval between consecutive ``on_train_batch_end`` calls (the same points in the bare and reference loops),
the reported figure is their median, so a stray slow step on a shared machine does not move it. A run's
"fixed" cost is its wall time minus its steps: Trainer and module setup, prompt encoding, the region ranking of
a region start (``mask.init=region``; forgotten before every run, so each run pays it as a fresh process does),
teardown.

``benchmarks/throughput.py`` runs it and writes the report to ``docs/PERFORMANCE.md``::

    nice -n 10 python benchmarks/throughput.py --model bundled --steps 30 --out docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import json
import logging
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from peekaboo import ops
from peekaboo.bench.common import (
    PeakMemory,
    StepClock,
    Timing,
    cpu_has_bf16_units,
    cpu_seconds,
    fmt,
    machine_info,
    ms,
    synchronize,
)
from peekaboo.bench.common import markdown_table as table
from peekaboo.bench.methods import MODEL_GROUP, resolve_config_dir
from peekaboo.bench.reference_loop import REFERENCE_KINDS, ReferenceLoop
from peekaboo.bench.steps import FAST, PAPER, PAPER_STEPS
from peekaboo.config import TrainConfig, load_config
from peekaboo.data.synthetic import synthetic_pairs
from peekaboo.diffusion.backbone import BUNDLED_PATH, Backbone, latent_blend_error, load_backbone
from peekaboo.errors import PeekabooError
from peekaboo.optim.engine import StableMaskStop, optimize_pairs
from peekaboo.optim.masks import build_mask
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.regions import forget_rankings
from peekaboo.runs.metrics import pair_scores
from peekaboo.utils import images
from peekaboo.utils.devices import trainer_devices

SD15_GROUP = "sd15"  # the preset of the GPU section (the paper's settings)
SPLIT = "tune"  # synthetic pairs the benchmark optimizes (never the evaluation split)
SECTIONS = ("batch", "overhead", "reference", "fast", "switches", "early_stop", "end_to_end", "gpu")

WARMUP_STEPS = 5
TIMED_STEPS = 30
# One intra-op thread: on a niced process sharing 2 cores with other jobs, two OpenMP threads spend most of a
# step waiting for each other at barriers (the "threads" row of the switches table measures it).
CPU_THREADS = 1
BATCH_SIZES = (1, 4, 16)
OVERHEAD_ROUNDS = 4  # Trainer and bare loop alternate this many times, so drifting load hits both alike
REFERENCE_ROUNDS = 2  # alternating rounds of the speed comparison, as for the overhead
QUALITY_KIND = "raster_bilateral"  # the bilateral kind the shapes preset's optimizer settings suit
QUALITY_PAIRS = 16  # one batch of the preset's data.pairs_per_step
#: The paper-style loop starts every mask at alpha 0.5 (it has no cross-attention or region start), so the project
#: runs timed and scored against it start there too: same settings on both sides. A region start also works with
#: the raster kinds only.
REFERENCE_START = "optimization.mask.init=constant"
#: The steps of those runs and of the early-stopping runs: the count the `tune` split chose from alpha 0.5
#: (benchmarks/results/steps_tune_preset.json). The preset's own count is chosen after its region start, which
#: has far less left to do; early stopping only has steps to save in long runs.
ALPHA_START_STEPS = 100
MASK_REPEATS = 20  # mask render + backward repetitions of the filter-only comparison
# The project's fast paths at B=1 against the reference loop, each a set of config overrides; bf16 keeps the mask
# float32 (`bf16-mixed` autocasts the frozen model only; its weights are loaded in bf16 as well).
BF16 = ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]
FAST_VARIANTS: tuple[tuple[str, list[str]], ...] = (
    ("default (fp32, eager)", []),
    ("`model.compile=true`", ["model.compile=true"]),
    ("`model.dtype=bfloat16 trainer.precision=bf16-mixed`", BF16),
    ("compile + bf16", ["model.compile=true", *BF16]),
)
SWITCH_BATCH = 4
#: The switches section's latent-composite override (its row also reports the blend's error).
LATENT_COMPOSITE = "optimization.composite=latent"
THREAD_PROBE = 2  # the thread count the "threads" switch row compares with CPU_THREADS
THREAD_PROBE_STEPS = 10  # fewer steps: the probe is slow by design on a shared machine
EARLY_STOP_PAIRS = 16
# The end-to-end rows score held-out pairs: the fast settings were chosen on the tune split.
END_TO_END_SPLIT = "eval"
END_TO_END_PAIRS = 16
OVERHEAD_GOAL_PCT = 10.0  # the goals, quoted in the report
SPEEDUP_GOAL = 3.0
BATCH_GOAL = 2.0  # B=16 vs B=1 pairs per hour

GPU_BATCH_SIZES = (1, 4, 8)
GPU_WARMUP_STEPS = 2
GPU_TIMED_STEPS = 5
GPU_EXTRAPOLATE_STEPS = 300  # the paper's step count, which the SD preset keeps
GPU_MASK_SIZE = 512  # the composite's side; the VAE sees 512x512 either way
GPU_SWITCH_BATCH = 4
# Stable Diffusion 1.5's component configs (diffusers / transformers arguments); weights are random.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "prediction_type": "epsilon", "clip_sample": False,
}
GPU_PRECISIONS: dict[str, list[str]] = {
    "fp32": ["model.dtype=float32", "trainer.precision=32-true"],
    "bf16": ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"],
}
GPU_SWITCHES: tuple[tuple[str, str], ...] = (
    ("`batch_cfg=false`", "optimization.guidance.batch_cfg=false"),
    ("`channels_last=true`", "model.channels_last=true"),
    ("`compile=true`", "model.compile=true"),
    ("`attention=classic`", "model.attention=classic"),
)
NO_GPU = "not measured: no GPU"

PERCENT = 100.0

log = logging.getLogger("throughput")


# -- measurement primitives (the shared ones are in peekaboo.bench.common) --------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the Trainer's banner and the warnings a bare loop triggers on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*self.log.*")  # no Trainer in the bare loop: logging is a no-op
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        yield


# -- inputs ---------------------------------------------------------------------------------------------------
@dataclass
class Item:
    """A synthetic pair prepared for optimization and scoring."""

    id: str
    prompt: str
    canvas: torch.Tensor  # (3, S, S) working image in [0, 1]
    placement: images.Placement
    target: np.ndarray  # (H, W) uint8 ground truth


def load_items(n: int, size: int, fit: str, split: str = SPLIT) -> list[Item]:
    """The first ``n`` synthetic pairs of ``split``, fitted to ``size x size`` canvases."""
    items = []
    for pair in synthetic_pairs(split, n):
        canvas, placement = images.fit_square(pair.load_image(), size, fit)
        target = pair.load_target()
        assert target is not None, "synthetic pairs always have ground truth"
        items.append(Item(pair.id, pair.prompt, canvas, placement, target))
    return items


def batch_of(items: Sequence[Item]) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(images (B, 3, S, S), prompts, ids)``."""
    return torch.stack([i.canvas for i in items]), [i.prompt for i in items], [i.id for i in items]


def binary_mask(alpha: torch.Tensor, item: Item, threshold: float) -> np.ndarray:
    """The binary mask at the original image's size, made exactly as a dataset run makes it."""
    return images.finalize_mask(alpha, item.placement, threshold).mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# -- configs and runners ---------------------------------------------------------------------------------------
class Bench:
    """Builds configs from the preset plus overrides, loads backbones, and times runs."""

    def __init__(self, model: str, device: torch.device, warmup: int, steps: int, preset: str = MODEL_GROUP,
                 max_steps: int | None = None, config_dir: str | os.PathLike | None = None):
        self.model, self.device, self.warmup, self.steps, self.preset = model, device, warmup, steps, preset
        self.max_steps = max_steps
        self.config_dir = resolve_config_dir(config_dir)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        self.base = [f"model={preset}", f"model.pretrained={model}", "run.name=throughput", "data=shapes",
                     f"trainer.accelerator={accelerator}", "trainer.enable_progress_bar=false"]
        if max_steps is not None:  # quick checks only: pairs/hour and quality then use this step count
            self.base.append(f"trainer.max_steps={max_steps}")

    def config(self, *overrides: str) -> Any:
        """The preset's :class:`TrainConfig` with ``overrides`` applied (validated as the CLI validates)."""
        return load_config(TrainConfig, [*self.base, *overrides], self.config_dir, "train")

    def reference_config(self, kind: str, *overrides: str) -> Any:
        """:meth:`config` for a run compared with the paper-style loop: mask kind ``kind``, the loop's start
        (:data:`REFERENCE_START`) and :data:`ALPHA_START_STEPS` steps (unless this Bench fixes ``max_steps`` for a
        quick check), then ``overrides``."""
        steps = [] if self.max_steps is not None else [f"trainer.max_steps={ALPHA_START_STEPS}"]
        return self.config(f"optimization.mask.kind={kind}", REFERENCE_START, *steps, *overrides)

    def backbone(self, cfg: Any) -> Backbone:
        """A fresh backbone for ``cfg.model`` (never the process-wide cache: switches must not share one)."""
        return load_backbone(cfg.model, self.device)

    def trainer_run(self, label: str, cfg: Any, items: Sequence[Item], backbone: Backbone,
                    warmup: int | None = None, steps: int | None = None,
                    callbacks: Sequence[Callback] = (), tb_dir: str | None = None) -> tuple[Timing, list]:
        """Time ``optimize_pairs`` over ``items`` (one batch) for warm-up + timed steps."""
        warmup = self.warmup if warmup is None else warmup
        steps = self.steps if steps is None else steps
        trainer_cfg = cfg.trainer.copy()
        trainer_cfg.max_steps = warmup + steps
        clock = StepClock(self.device)
        images, prompts, ids = batch_of(items)
        forget_rankings(backbone)
        with quiet(), PeakMemory(self.device) as mem:
            synchronize(self.device)
            start = time.perf_counter()
            results = optimize_pairs(images, prompts, ids, cfg.optimization, trainer_cfg, backbone,
                                     callbacks=[clock, *callbacks], enable_progress_bar=False,
                                     devices=trainer_devices(self.device), tb_dir=tb_dir)
            wall = time.perf_counter() - start
        durations = clock.durations()
        timing = Timing(label, len(items), durations, min(warmup, len(durations) - 1), wall - sum(durations),
                        mem.peak_mb, "peak = whole process" if mem.whole_process else "")
        return timing, results

    def bare_run(self, label: str, cfg: Any, items: Sequence[Item], backbone: Backbone) -> Timing:
        """The same optimization as :meth:`trainer_run` as a plain PyTorch loop (fp32, no Lightning)."""
        images, prompts, ids = batch_of(items)
        ends: list[float] = []
        forget_rankings(backbone)
        with quiet(), PeakMemory(self.device) as mem:
            synchronize(self.device)
            start = time.perf_counter()
            module = BareModule(images, prompts, ids, cfg.optimization, backbone).to(self.device)
            module.train()
            module.on_fit_start()
            optimizer = module.configure_optimizers()
            synchronize(self.device)
            ends.append(time.perf_counter())
            for step in range(self.warmup + self.steps):
                module.bare_step = step
                loss = module.training_step(step, step)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                synchronize(self.device)
                ends.append(time.perf_counter())
            with torch.no_grad():
                module().cpu()  # the final render optimize_pairs also makes
            wall = time.perf_counter() - start
        durations = [b - a for a, b in itertools.pairwise(ends)]
        return Timing(label, len(items), durations, self.warmup, wall - sum(durations), mem.peak_mb)

    def reference_run(self, label: str, cfg: Any, item: Item, backbone: Backbone, steps: int,
                      warmup: int = 0) -> tuple[Timing, torch.Tensor]:
        """The paper-style loop on one pair; returns its timing and final alpha ``(S, S)``."""
        loop = ReferenceLoop(backbone, cfg.optimization)
        with PeakMemory(self.device) as mem:
            start = time.perf_counter()
            result = loop.run(item.canvas, item.prompt, steps, ops.pair_seed(cfg.optimization.seed, item.id),
                              on_step=lambda _: synchronize(self.device))
            wall = time.perf_counter() - start
        timing = Timing(label, 1, result.step_seconds, warmup, wall - sum(result.step_seconds), mem.peak_mb)
        return timing, result.alpha


class BareModule(PeekabooModule):
    """:class:`PeekabooModule` driven without a Trainer: the loop advances the step its generators read
    (``step_generators`` reads ``self.global_step``, which is the Trainer's counter, or 0 without one)."""

    bare_step: int = 0

    @property
    def global_step(self) -> int:  # type: ignore[override]
        return self.bare_step


# -- sections ------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Markdown sections in order, plus the figures the summary quotes."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add(self, title: str, body: str) -> None:
        self.sections.append((title, body))
        print(f"\n## {title}\n\n{body}", flush=True)


def batch_thread_counts() -> tuple[int, ...]:
    """The benchmark's thread count, then every core: a batch of B pairs has B times more work per operator
    to split between threads than one pair has, so whether batching pays depends on the thread count."""
    return tuple(dict.fromkeys((torch.get_num_threads(), os.cpu_count() or 1)))


def section_batch(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 1 (and 4): B = 1, 4, 16 through the Trainer, at the benchmark's thread count and on every core."""
    cfg = bench.config()
    backbone = bench.backbone(cfg)
    max_steps = cfg.trainer.max_steps
    rows = []
    main_threads = torch.get_num_threads()
    for threads in batch_thread_counts():
        torch.set_num_threads(threads)
        base = None
        try:
            for b in BATCH_SIZES:
                timing, _ = bench.trainer_run(f"B={b}", cfg, items[:b], backbone)
                pph = timing.pairs_per_hour(max_steps)
                base = base or pph
                rows.append([threads, b, ms(timing.step_s), ms(timing.step_s / b), fmt(timing.fixed_s, 2),
                             f"{pph:,.0f}", f"{pph / base:.2f}x", f"{timing.peak_mb:,.0f}"])
                key = f"batch_{b}" if threads == main_threads else f"batch_{b}_threads_{threads}"
                report.summary[key] = {"step_s": timing.step_s, "pairs_per_hour": pph, "fixed_s": timing.fixed_s,
                                       "peak_mb": timing.peak_mb, "threads": threads}
        finally:
            torch.set_num_threads(main_threads)
    body = (f"Mask `{cfg.optimization.mask.kind}` {cfg.optimization.mask.size}x{cfg.optimization.mask.size}, "
            f"fp32, through `optimize_pairs` (Lightning Trainer), with torch's intra-op threads set as listed "
            f"(the machine has {os.cpu_count()} cores). Pairs per hour at `trainer.max_steps` = "
            f"{max_steps}, each batch paying its fixed cost once; \"vs B=1\" compares at the same thread count. "
            "Peak memory: the process's RSS high-water mark during the run (model weights and libraries "
            "included).\n\n")
    report.add("Pairs per step (B) through the Trainer", body + table(
        ["threads", "B", "ms/step", "ms/step/pair", "fixed s/run", "pairs/hour", "vs B=1", "peak RSS MB"], rows))


def section_overhead(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 2: bare PyTorch loop vs the Trainer, B = 1, alternating rounds."""
    cfg = bench.config()
    backbone = bench.backbone(cfg)
    trainer_steps: list[float] = []
    bare_steps: list[float] = []
    trainer_fixed, bare_fixed, logged_steps, logged_fixed = [], [], [], []
    with tempfile.TemporaryDirectory() as tb_dir:
        for r in range(OVERHEAD_ROUNDS):
            t, _ = bench.trainer_run(f"trainer#{r}", cfg, items[:1], backbone)
            b = bench.bare_run(f"bare#{r}", cfg, items[:1], backbone)
            lg, _ = bench.trainer_run(f"trainer+tb#{r}", cfg, items[:1], backbone, tb_dir=tb_dir)
            trainer_steps += t.steps[t.warmup :]
            bare_steps += b.steps[b.warmup :]
            logged_steps += lg.steps[lg.warmup :]
            trainer_fixed.append(t.fixed_s)
            bare_fixed.append(b.fixed_s)
            logged_fixed.append(lg.fixed_s)
    t_med, b_med, l_med = (statistics.median(x) for x in (trainer_steps, bare_steps, logged_steps))
    overhead = (t_med - b_med) / t_med * PERCENT
    logged = (l_med - b_med) / l_med * PERCENT
    report.summary["trainer_overhead_pct"] = overhead
    report.summary["trainer_tensorboard_overhead_pct"] = logged
    rows = [["bare PyTorch loop", ms(b_med), fmt(statistics.median(bare_fixed), 2), "-"],
            ["Lightning Trainer (`optimize_pairs`)", ms(t_med), fmt(statistics.median(trainer_fixed), 2),
             f"{overhead:+.1f}%"],
            [f"the same, logging to TensorBoard (every {cfg.trainer.log_every_n_steps} steps, mask images "
             "4 times)", ms(l_med), fmt(statistics.median(logged_fixed), 2), f"{logged:+.1f}%"]]
    verdict = "met" if overhead <= OVERHEAD_GOAL_PCT else "NOT met"
    body = (f"B=1, same module, same config; {OVERHEAD_ROUNDS} alternating rounds of {bench.warmup}+{bench.steps} "
            "steps each, medians over the pooled timed steps. The bare loop subclasses `PeekabooModule` only to "
            "advance the step counter its generators read; `training_step`, `backward`, `step`, `zero_grad`. "
            "Neither logs: the module builds its curves only on the steps a logger writes. Overhead = (Trainer - "
            f"bare) / Trainer step time: **{overhead:+.1f}%** (goal <= {OVERHEAD_GOAL_PCT:.0f}%: {verdict}). The "
            "third row adds what a dataset run also does, TensorBoard logging, for its cost.\n\n")
    report.add("Trainer overhead vs a bare PyTorch loop", body + table(
        ["loop", "ms/step", "fixed s/run", "overhead"], rows))


def mask_render_ms(make: Callable[[], torch.nn.Module], device: torch.device, renders: int) -> float:
    """Median milliseconds of ``renders`` mask renders plus one backward through them (the filter's cost)."""
    mask = make().to(device)
    times = []
    for _ in range(MASK_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        total = sum(mask().sum() for _ in range(renders))
        total.backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def mask_costs(cfg: Any, backbone: Backbone, item: Item, device: torch.device) -> tuple[float, float]:
    """Milliseconds per step spent on the mask alone: (reference, project)."""
    gen = torch.Generator().manual_seed(0)
    loop = ReferenceLoop(backbone, cfg.optimization)
    image = item.canvas.to(device)
    # The paper renders the mask twice per step; the project once.
    ref = mask_render_ms(lambda: loop.build_mask(image, gen), device, renders=2)
    proj = mask_render_ms(lambda: build_mask(cfg.optimization.mask, image[None], [gen]), device, renders=1)
    return ref, proj


def section_reference(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 3: the paper-style loop vs the project's default path, speed per kind, then quality.

    The default path is what a dataset run does with the preset: ``data.pairs_per_step`` pairs per module,
    timed per pair; one pair per module (B=1) is timed beside it.
    """
    rows = []
    item = items[0]
    default_b = bench.config().data.pairs_per_step
    for kind in REFERENCE_KINDS:
        cfg = bench.reference_config(kind)
        backbone = bench.backbone(cfg)
        steps: dict[str, list[float]] = {"b1": [], "default": [], "reference": []}
        notes = []
        for _ in range(REFERENCE_ROUNDS):  # alternating, so drifting load hits all loops alike
            for key, chosen in (("b1", [item]), ("default", items[:default_b])):
                try:
                    project, _ = bench.trainer_run(f"project {kind} B={len(chosen)}", cfg, chosen, backbone)
                    steps[key] += [s / len(chosen) for s in project.steps[project.warmup :]]  # per pair
                except Exception as err:  # a diverging setting must not hide the other rows
                    notes.append(f"project run failed: {type(err).__name__}: {err}")
            reference, _ = bench.reference_run(f"reference {kind}", cfg, item, backbone,
                                               bench.warmup + bench.steps, bench.warmup)
            steps["reference"] += reference.steps[reference.warmup :]
        median = {k: statistics.median(v) if v else float("nan") for k, v in steps.items()}
        reference_s = median["reference"]
        speedup, speedup_b1 = reference_s / median["default"], reference_s / median["b1"]
        report.summary[f"speedup_{kind}"] = speedup
        report.summary[f"speedup_b1_{kind}"] = speedup_b1
        report.summary[f"reference_step_s_{kind}"] = reference_s
        ref_mask, proj_mask = mask_costs(cfg, backbone, item, bench.device)
        # Amdahl's bound at B=1: the speedup the project would reach if its mask cost nothing at all.
        bound = reference_s / max(median["b1"] - proj_mask / 1000.0, 1e-9)
        report.summary[f"speedup_bound_{kind}"] = bound
        rows.append([f"`{kind}`", ms(reference_s), ms(median["default"]), f"**{speedup:.2f}x**", ms(median["b1"]),
                     f"{speedup_b1:.2f}x", fmt(ref_mask, 1), fmt(proj_mask, 1), f"{bound:.2f}x", "; ".join(notes)])
    report.summary["default_pairs_per_step"] = default_b
    body = (f"fp32, same model, same settings (preset `{MODEL_GROUP}` with the mask kind switched and "
            f"`{REFERENCE_START}`, the reference loop's start); "
            f"{REFERENCE_ROUNDS} alternating rounds of {bench.warmup}+{bench.steps} steps per loop, medians over the "
            "pooled timed steps. The reference is `peekaboo.bench.reference_loop`: the paper's loop, one pair at a "
            "time (bilateral filter as K*K NaN-bordered shifted copies per iteration, its colour weights computed once "
            "per image as the original's `BilateralProxyBlur` does, mask rendered twice per step, "
            f"`latents.backward(gradient=grad)`). The project's default path is a dataset run's: the preset's "
            f"`data.pairs_per_step={default_b}` pairs per module, each pair's mask as alone; its step time is per "
            "pair (the batch's step over its pairs). B=1 is one pair per module. \"mask ms\" isolates the mask: "
            "the renders a step makes plus one backward through them. \"free-mask bound\" is the speedup B=1 would "
            "reach if its mask cost nothing (reference step / (B=1 step - project mask)): the frozen model's share "
            f"of a one-pair step caps what any mask implementation can gain there. Goal: default path >= "
            f"{SPEEDUP_GOAL:.0f}x faster per step with the bilateral filter.\n\n")
    body += table(["mask kind", "reference ms/step", f"default (B={default_b}) ms/pair-step", "speedup",
                   "B=1 ms/step", "speedup B=1", "reference mask ms", "project mask ms", "free-mask bound (B=1)",
                   "note"], rows)
    body += "\n\n" + quality_table(bench, report, items)
    report.add("Reference loop (paper style) vs the project's default path", body)


def quality_table(bench: Bench, report: Report, items: Sequence[Item]) -> str:
    """Item 3, quality: both loops on the first :data:`QUALITY_PAIRS` tune pairs at ``max_steps``."""
    cfg = bench.reference_config(QUALITY_KIND)
    backbone = bench.backbone(cfg)
    chosen = items[:QUALITY_PAIRS]
    steps = cfg.trainer.max_steps
    threshold = cfg.optimization.threshold
    # One batch of all pairs: the module makes each pair's mask independent of its batch.
    # The default path: batches of data.pairs_per_step (each pair's mask independent of its batch).
    timing, results = bench.trainer_run("project quality", cfg, chosen, backbone, warmup=0, steps=steps)
    rows, proj_ious, ref_ious, agree = [], [], [], []
    ref_seconds = 0.0
    for item, res in zip(chosen, results, strict=True):
        ref_timing, ref_alpha = bench.reference_run("reference quality", cfg, item, backbone, steps)
        ref_seconds += sum(ref_timing.steps) + ref_timing.fixed_s
        proj_mask = binary_mask(res.alpha, item, threshold)
        ref_mask = binary_mask(ref_alpha, item, threshold)
        p, r = pair_scores(proj_mask, item.target)["iou"], pair_scores(ref_mask, item.target)["iou"]
        proj_ious.append(p)
        ref_ious.append(r)
        agree.append(iou(proj_mask, ref_mask))
        rows.append([item.id, f"{item.prompt}", fmt(r), fmt(p), fmt(agree[-1])])
    ref_miou, proj_miou = float(np.mean(ref_ious)), float(np.mean(proj_ious))
    report.summary["quality"] = {"kind": QUALITY_KIND, "pairs": len(chosen), "reference_miou": ref_miou,
                                 "project_miou": proj_miou, "agreement_iou": float(np.mean(agree))}
    rows.append(["**mean**", "", f"**{fmt(ref_miou)}**", f"**{fmt(proj_miou)}**", fmt(float(np.mean(agree)))])
    proj_seconds = sum(timing.steps) + timing.fixed_s
    report.summary["quality"]["end_to_end_speedup"] = ref_seconds / proj_seconds
    return (f"Quality, `{QUALITY_KIND}`, {len(chosen)} synthetic `{SPLIT}` pairs, {steps} steps each, threshold "
            f"{threshold}: IoU against the ground truth, and the IoU between the two loops' masks. The project ran "
            f"the {len(chosen)} pairs as one batch ({proj_seconds:.0f} s in all); the reference one pair at a time "
            f"({ref_seconds:.0f} s in all): **{ref_seconds / proj_seconds:.1f}x** end to end. Both loops draw their "
            "own random numbers, so masks differ pixel-wise even where both are right.\n\n"
            + table(["pair", "prompt", "reference IoU", "project IoU", "reference vs project IoU"], rows))


def masks_miou(cfg: Any, items: Sequence[Item], results: Sequence[Any]) -> float:
    """Mean IoU against the ground truth of the binary masks of ``results`` (one per item)."""
    threshold = cfg.optimization.threshold
    return float(np.mean([pair_scores(binary_mask(r.alpha, item, threshold), item.target)["iou"]
                          for item, r in zip(items, results, strict=True)]))


def section_fast(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 3 with the fast paths: the B=1 step time of each switchable fast path vs the reference loop, and
    the mIoU of the masks each makes on the :data:`QUALITY_PAIRS` pairs of the quality table.

    Each path alternates with the reference loop for :data:`REFERENCE_ROUNDS` rounds, so every ratio compares
    two loops timed minutes apart at most, as the reference section does.
    """
    kind = QUALITY_KIND
    chosen = items[:QUALITY_PAIRS]
    ref_cfg = bench.reference_config(kind)
    ref_backbone = bench.backbone(ref_cfg)
    default_b = ref_cfg.data.pairs_per_step
    variants = [*FAST_VARIANTS, (f"default, `data.pairs_per_step={default_b}` (per pair)", [])]
    rows: list[list[str]] = []
    figures: dict[str, Any] = {"kind": kind, "pairs": len(chosen), "variants": {}}
    base_s, base_miou = float("nan"), float("nan")
    for index, (name, overrides) in enumerate(variants):
        batched = index == len(variants) - 1
        cfg = bench.reference_config(kind, *overrides)
        notes, steps, ref_steps = [], [], []
        step_s, reference_s, miou, compile_s = float("nan"), float("nan"), float("nan"), 0.0
        try:
            backbone = bench.backbone(cfg)
            run_items = chosen[:default_b] if batched else chosen[:1]
            for r in range(REFERENCE_ROUNDS):
                timing, _ = bench.trainer_run(name, cfg, run_items, backbone, warmup=max(1, bench.warmup))
                steps += [t / len(run_items) for t in timing.steps[timing.warmup :]]
                if r == 0 and cfg.model.compile:
                    compile_s = timing.first_step_s - timing.step_s
                    notes.append(f"compile: {compile_s:.0f} s in the first step (B=1), again for the batch")
                reference, _ = bench.reference_run(f"reference {kind}", ref_cfg, items[0], ref_backbone,
                                                   bench.warmup + bench.steps, bench.warmup)
                ref_steps += reference.steps[reference.warmup :]
            step_s, reference_s = statistics.median(steps), statistics.median(ref_steps)
            quality = report.summary.get("quality", {})
            if batched:
                notes.append("each pair's mask as at B=1 (tests/test_module.py)")
            elif not overrides and quality.get("kind") == kind and quality.get("pairs") == len(chosen):
                miou = quality["project_miou"]  # the quality table's run: these pairs, this config, one batch
            elif overrides and not step_s < base_s:
                # A path slower than the default is never the one to choose: its masks are not worth the hours.
                notes.append("slower than the default here: masks not scored")
            else:
                _, results = bench.trainer_run(f"{name} quality", cfg, chosen, backbone, warmup=0,
                                               steps=cfg.trainer.max_steps)
                miou = masks_miou(cfg, chosen, results)
        except Exception as err:  # report the failure instead of hiding the other rows
            notes.append(f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            log.warning("fast path %s failed:\n%s", name, traceback.format_exc())
        if index == 0:
            base_s, base_miou = step_s, miou
        key = f"pairs_per_step={default_b}" if batched else " ".join(overrides) or "default"
        figures["variants"][key] = {"step_s": step_s, "reference_step_s": reference_s,
                                    "speedup": reference_s / step_s, "miou": miou, "compile_s": compile_s}
        diff = miou - base_miou
        rows.append([name, ms(step_s), ms(reference_s), f"**{reference_s / step_s:.2f}x**",
                     fmt(miou) if miou == miou else "-",  # NaN: not scored
                     "-" if diff != diff else f"{diff:+.3f}", "; ".join(notes)])
    report.summary["fast_paths"] = figures
    units = "has" if cpu_has_bf16_units() else "lacks"
    body = (f"`{kind}` through the Trainer, B=1 unless noted, each path alternating with the reference loop "
            f"({REFERENCE_ROUNDS} rounds of {bench.warmup}+{bench.steps} steps each, medians), same model and "
            "settings. Each fast path is a config switch; none is on by default: "
            "compilation costs minutes per process before the first step, and bf16 can pay only on CPUs with bf16 "
            f"matrix instructions (AMX or AVX-512 BF16; this one {units} them) and on GPUs, and only where the "
            "model's matrix products are large enough to outweigh the casts around them. Quality: the mIoU "
            f"of each path's masks on the {len(chosen)} pairs of the quality table ({ref_cfg.trainer.max_steps}"
            " steps, one batch), and its difference from the default's.\n\n")
    report.add("Fast paths vs the reference loop", body + table(
        ["project path", "ms/step (per pair)", "reference ms/step", "vs reference", "mIoU", "vs default", "note"],
        rows))


def section_switches(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 6: the fast-path switches on CPU, at B = :data:`SWITCH_BATCH`."""
    chosen = items[:SWITCH_BATCH]
    variants: list[tuple[str, list[str]]] = [
        ("default (`batch_cfg=true`, `channels_last=false`, `compile=false`)", []),
        ("`optimization.guidance.batch_cfg=false`", ["optimization.guidance.batch_cfg=false"]),
        ("`model.channels_last=true`", ["model.channels_last=true"]),
        ("`model.compile=true`", ["model.compile=true"]),
        # diffusers' explicit matmul + softmax attention instead of torch's fused SDPA kernel.
        ("`model.attention=classic`", ["model.attention=classic"]),
        # bf16 autocast for the frozen model, fp32 mask; on CPU it pays only with bf16 matrix units (AMX).
        ("`trainer.precision=bf16-mixed`", ["trainer.precision=bf16-mixed"]),
        # Blend the image's cached latents with the background's: no VAE backward, an approximate encoding.
        ("`optimization.composite=latent`", [LATENT_COMPOSITE]),
        ("`optimization.guidance.encode_resolution=32`", ["optimization.guidance.encode_resolution=32"]),
    ]
    rows, base = [], float("nan")
    figures: dict[str, Any] = {}
    default = bench.backbone(bench.config())  # the default row's, the prompt encoding's and the thread probe's
    for name, overrides in variants:
        cfg = bench.config(*overrides)
        note = ""
        try:
            backbone = bench.backbone(cfg) if overrides else default
            timing, _ = bench.trainer_run(name, cfg, chosen, backbone, warmup=max(1, bench.warmup))
            step_s = timing.step_s
            if cfg.model.compile:
                # Compilation happens inside the first step (forward and backward graphs).
                figures["compile_s"] = timing.first_step_s - step_s
                note = f"compile: {figures['compile_s']:.1f} s in the first step (cold cache)"
            if LATENT_COMPOSITE in overrides:
                figures["latent_blend_error"] = mean_blend_error(backbone, chosen, cfg.image_options.fit)
                note = (f"blend vs encoding the composite: {figures['latent_blend_error']:.2f} relative error "
                        "(ground-truth masks, solid backgrounds)")
        except Exception as err:  # report the failure instead of hiding it
            step_s = float("nan")
            note = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("switch %s failed:\n%s", name, traceback.format_exc())
        base = step_s if not overrides else base
        figures[" ".join(overrides) or "default"] = step_s
        rows.append([name, ms(step_s), f"{step_s / base:.2f}x", note])
    encode_s = prompt_encoding_s(default, [item.prompt for item in chosen])
    figures["prompt_encoding_s"] = encode_s
    rows.append(["text embeddings every step (the default encodes each prompt once per run)",
                 ms(base + encode_s), f"{(base + encode_s) / base:.2f}x",
                 f"default + the text encoder's {ms(encode_s)} ms for the batch's [uncond, cond] (measured alone)"])
    probe = thread_probe(bench, chosen, default)
    figures[f"threads={THREAD_PROBE}"] = probe.step_s
    rows.append([f"`torch.set_num_threads({THREAD_PROBE})` (benchmark: {torch.get_num_threads()})",
                 ms(probe.step_s), f"{probe.step_s / base:.2f}x", f"{THREAD_PROBE_STEPS} timed steps"])
    report.summary["switches"] = figures
    body = (f"B={SWITCH_BATCH}, preset `{MODEL_GROUP}`, through the Trainer; each variant loads its own backbone. "
            "\"vs default\" is the step-time ratio (below 1 is faster). The compile row uses a fresh inductor "
            "cache, so its compile time is what a first run pays.\n\n")
    report.add("Fast-path switches (CPU)", body + table(["switch", "ms/step", "vs default", "note"], rows))


@torch.no_grad()
def mean_blend_error(backbone: Backbone, items: Sequence[Item], fit: str) -> float:
    """The mean over ``items`` of :func:`peekaboo.diffusion.backbone.latent_blend_error` with each pair's ground-truth
    mask as alpha (the binary mask a converged run approaches) over a solid background seeded by its id."""
    images, _, ids = batch_of(items)  # (B, 3, S, S)
    size = images.shape[-1]
    targets = [Image.fromarray((item.target == 1).astype(np.uint8) * 255).convert("RGB") for item in items]
    alpha = torch.stack([images.fit_square(t, size, fit)[0][:1].gt(0.5).float() for t in targets])  # (B, 1, S, S)
    gens = [torch.Generator().manual_seed(ops.pair_seed(0, i)) for i in ids]
    background = torch.cat([ops.sample_background("solid", img[None], g)
                            for img, g in zip(images, gens, strict=True)])  # (B, 3, S, S)
    return float(latent_blend_error(backbone, images, alpha, background).mean())


def prompt_encoding_s(backbone: Backbone, prompts: Sequence[str]) -> float:
    """Median seconds to tokenize and encode ``[uncond, cond]`` of every prompt from scratch: what each step would
    pay if the module did not keep its prompts' embeddings."""
    times = []
    for _ in range(MASK_REPEATS):
        start = time.perf_counter()
        for prompt in ["", *prompts]:
            backbone.text_encoder(backbone.tokenize(prompt).to(backbone.device))
        synchronize(backbone.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def thread_probe(bench: Bench, items: Sequence[Item], backbone: Backbone) -> Timing:
    """The default config (``backbone`` loaded for it) with :data:`THREAD_PROBE` intra-op threads instead of
    the benchmark's count."""
    threads = torch.get_num_threads()
    cfg = bench.config()
    torch.set_num_threads(THREAD_PROBE)
    try:
        timing, _ = bench.trainer_run("threads", cfg, items, backbone, warmup=1, steps=THREAD_PROBE_STEPS)
    finally:
        torch.set_num_threads(threads)
    return timing


class AlphaRecorder(Callback):
    """Keeps every step's soft masks ``(B, 1, S, S)`` to replay early stopping per pair afterwards."""

    def __init__(self) -> None:
        self.alphas: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The step's own mask (rendered before its optimizer update): what StableMaskStop reads.
        self.alphas.append(pl_module.last_alpha.float().cpu())


class _Replay:
    """What :class:`StableMaskStop` reads from a module: the step's mask, the failed flags, and its loggers
    (none: a replay logs nothing)."""

    loggers: tuple = ()
    logged_this_step = False

    def __init__(self, alpha: torch.Tensor):
        self.last_alpha, self.failed = alpha, torch.zeros(alpha.shape[0], dtype=torch.bool)


def replay_stop(cfg: Any, alphas: Sequence[torch.Tensor]) -> int:
    """The step at which the project's :class:`StableMaskStop` stops on this mask trajectory (or its length)."""
    stop = StableMaskStop(cfg.optimization.early_stop, cfg.optimization.threshold)
    for k, alpha in enumerate(alphas):
        trainer = SimpleNamespace(global_step=k + 1, should_stop=False)  # global_step counts finished steps
        stop.on_train_batch_end(trainer, _Replay(alpha), None, None, k)  # type: ignore[arg-type]
        if trainer.should_stop:
            return k + 1
    return len(alphas)


def section_early_stop(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Item 6, early stopping: steps saved and IoU cost on :data:`EARLY_STOP_PAIRS` tune pairs, in runs of
    :data:`ALPHA_START_STEPS` from alpha 0.5 (:meth:`Bench.reference_config`): the preset's short run after a
    region start leaves nothing to stop early."""
    chosen = items[:EARLY_STOP_PAIRS]
    cfg = bench.reference_config(QUALITY_KIND)
    es_cfg = bench.reference_config(QUALITY_KIND, "optimization.early_stop.enabled=true")
    backbone = bench.backbone(cfg)
    max_steps = cfg.trainer.max_steps
    threshold = cfg.optimization.threshold
    es_timing, es_results = bench.trainer_run("early stop", es_cfg, chosen, backbone, warmup=0, steps=max_steps)
    recorder = AlphaRecorder()
    full_timing, full_results = bench.trainer_run("full", cfg, chosen, backbone, warmup=0, steps=max_steps,
                                                  callbacks=[recorder])
    # Each pair stops on its own and is frozen from then on, so its early-stopped mask must be the full run's
    # mask at its stop step, and replaying the stopping rule on its trajectory alone must stop it there too.
    pair_stops = [r.steps for r in es_results]
    # The mask after k updates is the one step k + 1 renders (the recorder keeps each step's own mask).
    def full_after(i: int, k: int) -> torch.Tensor:
        return recorder.alphas[k][i, 0] if k < len(recorder.alphas) else full_results[i].alpha

    same = max((r.alpha - full_after(i, k)).abs().max().item()
               for i, (r, k) in enumerate(zip(es_results, pair_stops, strict=True)))
    replayed = [replay_stop(es_cfg, [a[i : i + 1] for a in recorder.alphas]) for i in range(len(chosen))]
    full_masks = [binary_mask(r.alpha, it, threshold) for r, it in zip(full_results, chosen, strict=True)]
    full_ious = [pair_scores(m, it.target)["iou"] for m, it in zip(full_masks, chosen, strict=True)]
    es_masks = [binary_mask(r.alpha, it, threshold) for r, it in zip(es_results, chosen, strict=True)]
    es_ious = [pair_scores(m, it.target)["iou"] for m, it in zip(es_masks, chosen, strict=True)]
    agree = [iou(a, b) for a, b in zip(es_masks, full_masks, strict=True)]
    n = len(chosen)
    es_wall = sum(es_timing.steps) + es_timing.fixed_s
    full_wall = sum(full_timing.steps) + full_timing.fixed_s
    rows = [
        ["without early stopping", f"{max_steps}", "-", fmt(float(np.mean(full_ious))), "1.000"],
        [f"batch of {n}, each pair stops on its own", f"{np.mean(pair_stops):.0f} (min {min(pair_stops)}, "
         f"max {max(pair_stops)})", f"{(1 - np.mean(pair_stops) / max_steps):.0%}", fmt(float(np.mean(es_ious))),
         fmt(float(np.mean(agree)))],
    ]
    report.summary["early_stop"] = {
        "pair_stop_mean": float(np.mean(pair_stops)), "miou_full": float(np.mean(full_ious)),
        "miou_early_stop": float(np.mean(es_ious)), "replay_matches": replayed == pair_stops,
        "max_abs_alpha_diff": same}
    es = cfg.optimization.early_stop
    body = (f"{n} synthetic `{SPLIT}` pairs, preset `{MODEL_GROUP}` from alpha 0.5 (`{REFERENCE_START}`), up to "
            f"{max_steps} steps; `early_stop` "
            f"tolerance {es.tolerance}, patience {es.patience}, min_steps {es.min_steps}, loss_tolerance "
            f"{es.loss_tolerance}. Both rows are real runs of one batch; a stopped pair is frozen and leaves the "
            "batch's model calls. Check: replaying the project's `StableMaskStop` on each pair's recorded mask "
            f"trajectory alone stops {sum(a == b for a, b in zip(replayed, pair_stops, strict=True))}/{n} pairs at "
            f"the step the batch stopped them; their masks differ from the full run's at that step by at most "
            f"{same:.2e}. Wall time of the batch: {es_wall:.0f} s with early stopping, {full_wall:.0f} s without "
            "(the latter also records every step's masks).\n\n")
    report.add("Early stopping", body + table(
        ["run", "steps", "steps saved", "mIoU", "IoU vs full-run mask"], rows))


def section_end_to_end(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """End to end: pairs per hour and mIoU of the paper-style loop with the paper's settings against the project's
    default and fast settings, on :data:`END_TO_END_PAIRS` held-out pairs, each path as a user runs it."""
    paper_cfg = bench.config(*PAPER.overrides, f"trainer.max_steps={PAPER_STEPS}")
    chosen = load_items(END_TO_END_PAIRS, paper_cfg.optimization.mask.size, paper_cfg.image_options.fit,
                        END_TO_END_SPLIT)
    backbone = bench.backbone(paper_cfg)
    threshold = paper_cfg.optimization.threshold

    def scored(label: str, about: str, alphas: Sequence[torch.Tensor], steps: Sequence[int], wall: float) -> dict:
        ious = [pair_scores(binary_mask(a, it, threshold), it.target)["iou"]
                for a, it in zip(alphas, chosen, strict=True)]
        return {"label": label, "about": about, "miou": float(np.mean(ious)), "mean_steps": float(np.mean(steps)),
                "wall_s": wall, "pairs_per_hour": 3600.0 * len(chosen) / wall}

    wall, alphas = 0.0, []
    for item in chosen:  # the paper's loop: one pair at a time
        timing, alpha = bench.reference_run("end to end, reference", paper_cfg, item, backbone, PAPER_STEPS)
        wall += sum(timing.steps) + timing.fixed_s
        alphas.append(alpha)
    rows = [scored("paper-style loop, paper settings", f"`peekaboo.bench.reference_loop`, one pair at a time, "
                   f"{PAPER_STEPS} steps, `{' '.join(PAPER.overrides)}`", alphas, [PAPER_STEPS] * len(chosen), wall)]
    project = [("project, paper settings", f"{PAPER_STEPS} steps, `{' '.join(PAPER.overrides)}`",
                [*PAPER.overrides, f"trainer.max_steps={PAPER_STEPS}"]),
               ("project default", "the preset", []),
               ("project fast", f"`{' '.join(FAST.overrides)}` (chosen on the tune split)", list(FAST.overrides))]
    for label, about, overrides in project:
        cfg = bench.config(*overrides)
        per_module = cfg.data.pairs_per_step
        wall, alphas, steps = 0.0, [], []
        for first in range(0, len(chosen), per_module):  # a dataset run's batches
            batch = chosen[first : first + per_module]
            timing, results = bench.trainer_run(label, cfg, batch, backbone, warmup=0, steps=cfg.trainer.max_steps)
            wall += sum(timing.steps) + timing.fixed_s
            alphas += [r.alpha for r in results]
            steps += [r.steps for r in results]
        rows.append(scored(label, about, alphas, steps, wall))
    report.summary["end_to_end"] = {"split": END_TO_END_SPLIT, "pairs": len(chosen), "rows": rows}
    base = rows[0]
    body = (f"{len(chosen)} synthetic `{END_TO_END_SPLIT}` pairs (held out: the fast settings were chosen on "
            f"`tune`), fp32, {torch.get_num_threads()} torch thread(s). Each path runs as a user runs it: the "
            "paper-style loop one pair at a time, the project in a dataset run's batches of `data.pairs_per_step` "
            "pairs through the Trainer; wall time includes every fixed cost. Pairs per hour and mIoU (threshold "
            f"{threshold}) against the paper-style loop's; docs/STEPS.md has mIoU against steps.\n\n")
    body += table(["path", "settings", "mean steps", "s/pair", "pairs/hour", "vs paper-style", "mIoU",
                   "mIoU vs paper-style"],
                  [[r["label"], r["about"], f"{r['mean_steps']:.0f}", f"{r['wall_s'] / len(chosen):.2f}",
                    f"{r['pairs_per_hour']:,.0f}", f"**{r['pairs_per_hour'] / base['pairs_per_hour']:.1f}x**",
                    fmt(r["miou"]), f"{r['miou'] - base['miou']:+.3f}"] for r in rows])
    report.add("End to end: pairs per hour at the paper's quality", body)


# -- GPU: Stable Diffusion 1.5 size ----------------------------------------------------------------------------
def build_sd15_folder(folder: Path, device: torch.device, unet_config: dict[str, Any] = SD15_UNET,
                      vae_config: dict[str, Any] = SD15_VAE, text_config: dict[str, Any] = SD15_TEXT) -> Path:
    """Save a random-weight pipeline with Stable Diffusion 1.5's architecture in diffusers format.

    Random weights cost the same compute as real ones, so step times carry over; the masks mean nothing.
    The tokenizer is the bundled model's vocabulary with SD's 77-token length (no hub is reachable).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    length = text_config["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_PATH / "tokenizer", model_max_length=length)
    torch.manual_seed(0)
    with torch.device(device):  # initializing ~1.1e9 weights is much faster on the GPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text_config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer,
                                   unet=unet.cpu(), scheduler=DDPMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def release() -> None:
    """Free what the last variant left on the GPU before the next one loads (call after dropping it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def section_gpu(report: Report, warmup: int, steps: int, max_steps: int | None = None,
                sd15: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = (SD15_UNET, SD15_VAE, SD15_TEXT),
                device: torch.device | None = None, config_dir: str | os.PathLike | None = None) -> None:
    """Item 5: SD-1.5-sized model, fp32 vs bf16, B = 1, 4, 8, the switches and the reference loop; CUDA only.

    ``sd15``, ``device`` and ``max_steps`` exist to check this code on a small model without a GPU;
    ``config_dir`` is the project's configs/ folder (:func:`peekaboo.bench.methods.resolve_config_dir`).
    """
    if device is None and not torch.cuda.is_available():
        report.summary["gpu"] = NO_GPU
        report.add("Stable Diffusion 1.5 size on a GPU", NO_GPU + ".")
        return
    device = device or torch.device("cuda", 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sd15-random-") as tmp:
        start = time.perf_counter()
        folder = build_sd15_folder(Path(tmp) / "sd15", device, *sd15)
        build_s = time.perf_counter() - start
        bench = Bench(str(folder), device, warmup, steps, preset=SD15_GROUP, max_steps=max_steps,
                      config_dir=config_dir)
        size = f"optimization.mask.size={GPU_MASK_SIZE}"
        items = load_items(max(GPU_BATCH_SIZES), GPU_MASK_SIZE, "scale")
        variants = [(f"{name}, B={{b}}", overrides, GPU_BATCH_SIZES) for name, overrides in GPU_PRECISIONS.items()]
        variants += [(f"bf16, B={{b}}, {name}", [*GPU_PRECISIONS["bf16"], override], (GPU_SWITCH_BATCH,))
                     for name, override in GPU_SWITCHES]
        for label, overrides, batches in variants:
            cfg = bench.config(size, *overrides)
            backbone = bench.backbone(cfg)
            resolution = backbone.resolution
            rows += [gpu_row(bench, label.format(b=b), cfg, items[:b], backbone) for b in batches]
            del backbone
            release()
        cfg = bench.config(size, *GPU_PRECISIONS["fp32"])
        backbone = bench.backbone(cfg)
        rows.append(gpu_reference_row(bench, cfg, items[0], backbone))
        del backbone
        release()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    body = (f"{name}. UNet, VAE and text encoder built from the SD-1.5 configs with random weights (built and "
            f"saved in {build_s:.0f} s), loaded through `load_backbone`; preset `{SD15_GROUP}` "
            f"(`{cfg.optimization.mask.kind}`) with a {GPU_MASK_SIZE}x{GPU_MASK_SIZE} mask and composite (the VAE "
            f"encodes at {resolution}x{resolution}); {warmup}+{steps} steps per row, extrapolated to "
            f"{GPU_EXTRAPOLATE_STEPS} steps per pair batch. Switch rows compare with \"bf16, B={GPU_SWITCH_BATCH}\". "
            "Peak memory is `torch.cuda.max_memory_allocated` (weights included).\n\n")
    report.add("Stable Diffusion 1.5 size on a GPU", body + table(
        ["run", "ms/step", f"s per batch @{GPU_EXTRAPOLATE_STEPS}", "pairs/hour", "peak GPU MB", "note"], rows))


def _gpu_figures(label: str, timing: Timing | None, note: str = "") -> list[str]:
    if timing is None:
        return [label, "-", "", "", "", note]
    batch_s = GPU_EXTRAPOLATE_STEPS * timing.step_s + timing.fixed_s
    return [label, ms(timing.step_s), fmt(batch_s, 1), f"{timing.pairs_per_hour(GPU_EXTRAPOLATE_STEPS):,.0f}",
            f"{timing.peak_mb:,.0f}", note]


def gpu_row(bench: Bench, label: str, cfg: Any, items: Sequence[Item], backbone: Backbone) -> list[str]:
    """One GPU measurement through the Trainer as a table row (running out of memory is a row too)."""
    timing, note = _guarded(lambda: bench.trainer_run(label, cfg, items, backbone)[0])
    if timing and cfg.model.compile:
        note = f"first step {timing.first_step_s:.1f} s (compilation)"
    return _gpu_figures(label, timing, note)


def gpu_reference_row(bench: Bench, cfg: Any, item: Item, backbone: Backbone) -> list[str]:
    """The paper-style loop at SD size, fp32, one pair."""
    timing, note = _guarded(
        lambda: bench.reference_run("reference", cfg, item, backbone, bench.warmup + bench.steps, bench.warmup)[0])
    return _gpu_figures("reference loop (paper style), fp32, B=1", timing, note)


def _guarded(run: Callable[[], Timing]) -> tuple[Timing | None, str]:
    """Run one GPU measurement; running out of memory or failing becomes a note instead of ending the section."""
    timing, note = None, ""
    try:
        timing = run()
    except torch.cuda.OutOfMemoryError:
        note = "out of memory"
    except Exception as err:
        note = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("GPU run failed:\n%s", traceback.format_exc())
    release()  # after the handler: until then the exception's frames hold the failed step's tensors
    return timing, note


# -- report --------------------------------------------------------------------------------------------------
def machine_lines(args: argparse.Namespace, load_before: tuple[float, float, float], command: str) -> list[str]:
    """Where and how the figures were taken."""
    m = machine_info()
    load_after = os.getloadavg()
    versions = (f"torch {m['torch']}, lightning {lightning.__version__}, "
                f"diffusers {_version('diffusers')}, transformers {_version('transformers')}")
    return [
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Machine: {m['processor']}, {m['cpu_count']} cores; GPU: {m['cuda'] or 'none'}; Python {m['python']}; "
        f"{versions}",
        f"- CPU threads used by torch: {m['torch_threads']} (`--threads`)",
        f"- Model: `{args.model}` (preset `{MODEL_GROUP}`), {args.warmup} warm-up + {args.steps} timed steps per run",
        f"- Load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}",
    ]


def _version(name: str) -> str:
    with contextlib.suppress(Exception):
        return __import__(name).__version__
    return "?"


def load_note(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """How far to trust the absolute times: whether other jobs shared the cores while the benchmark ran."""
    cores = os.cpu_count() or 1
    # The benchmark itself keeps about one core busy; a 1-minute load above that means other work ran too.
    if max(before[0], after[0]) <= 1.5 and cores >= 2:
        return ("Nothing else ran on the machine (1-minute load average at most 1.5, the benchmark's own): "
                "absolute times are representative of this CPU.")
    return ("**Other jobs shared the CPU while the benchmark ran** (see the load averages above): absolute times "
            "are pessimistic and noisy; the medians and the side-by-side ratios (measured minutes apart, "
            "alternating where it matters) are the figures to read.")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The headline figures of whichever sections ran."""
    lines = []
    for suffix in ("", *sorted({k[k.index("_threads_"):] for k in summary if "_threads_" in k})):
        batches = [b for b in BATCH_SIZES if f"batch_{b}{suffix}" in summary]
        if not batches:
            continue
        figures = [summary[f"batch_{b}{suffix}"] for b in batches]
        ratio = figures[-1]["pairs_per_hour"] / figures[0]["pairs_per_hour"]
        threads = figures[0].get("threads")
        # The goal is about the CPU: judged with every core working, as torch uses them by default.
        verdict = (f"goal >= {BATCH_GOAL:.0f}x on all cores: {'met' if ratio >= BATCH_GOAL else 'NOT met'}"
                   if threads == os.cpu_count() else "the goal is judged on all cores")
        lines.append(f"- Through the Trainer, {threads or '?'} thread(s): " + "; ".join(
            f"B={b}: {ms(f['step_s'])} ms/step, {f['pairs_per_hour']:,.0f} pairs/hour"
            for b, f in zip(batches, figures, strict=True))
            + f"; B={batches[-1]} gives {ratio:.2f}x the pairs/hour of B={batches[0]} ({verdict}).")
    if "trainer_overhead_pct" in summary:
        pct = summary["trainer_overhead_pct"]
        lines.append(f"- Trainer overhead over a bare PyTorch loop at B=1: {pct:+.1f}% of the step time "
                     f"(goal <= {OVERHEAD_GOAL_PCT:.0f}%: {'met' if pct <= OVERHEAD_GOAL_PCT else 'NOT met'}); "
                     f"{summary['trainer_tensorboard_overhead_pct']:+.1f}% with TensorBoard logging on.")
    speedups = {k: summary[f"speedup_{k}"] for k in REFERENCE_KINDS if f"speedup_{k}" in summary}
    if speedups:
        met = all(v >= SPEEDUP_GOAL for v in speedups.values())
        b = summary.get("default_pairs_per_step", "?")
        lines.append(f"- Project default path (B={b} pairs per module) vs the paper-style loop, per pair-step: "
                     + ", ".join(f"`{k}` {v:.2f}x" for k, v in speedups.items())
                     + f" (goal >= {SPEEDUP_GOAL:.0f}x: {'met' if met else 'NOT met'}); one pair per module (B=1): "
                     + ", ".join(f"`{k}` {summary[f'speedup_b1_{k}']:.2f}x (at most "
                                 f"{summary[f'speedup_bound_{k}']:.2f}x with a free mask)" for k in speedups) + ".")
    if "fast_paths" in summary:
        f = summary["fast_paths"]
        base = f["variants"]["default"]["miou"]
        lines.append(f"- Project paths vs the paper-style loop in alternating rounds, `{f['kind']}`: " + "; ".join(
            f"`{key}` {v['speedup']:.2f}x" + ("" if v["miou"] != v["miou"]  # NaN: not scored
                                              else f" (mIoU {v['miou'] - base:+.3f})")
            for key, v in f["variants"].items()) + f" (B=1 unless noted; mIoU vs the default's {base:.3f} on "
            f"{f['pairs']} pairs).")
    if "quality" in summary:
        q = summary["quality"]
        lines.append(f"- Same masks? `{q['kind']}` on {q['pairs']} pairs: mIoU {q['reference_miou']:.3f} (reference) "
                     f"vs {q['project_miou']:.3f} (project); end to end {q['end_to_end_speedup']:.1f}x faster "
                     "(the project batches the pairs).")
    if "early_stop" in summary:
        e = summary["early_stop"]
        if "miou_early_stop" in e:
            lines.append(f"- Early stopping: each pair of a batch stops on its own, at {e['pair_stop_mean']:.0f} "
                         f"steps on average; mIoU {e['miou_full']:.3f} without, {e['miou_early_stop']:.3f} with.")
        else:  # figures of a report from before per-pair stops in a batch (kept by --update)
            lines.append(f"- Early stopping: a batch stopped at step {e['batch_stop']}, single pairs at "
                         f"{e['pair_stop_mean']:.0f} on average; mIoU {e['miou_full']:.3f} without, "
                         f"{e['miou_batch']:.3f} (batch) / {e['miou_pair']:.3f} (single pairs) with.")
    if "end_to_end" in summary:
        e = summary["end_to_end"]
        paper = e["rows"][0]
        for row in e["rows"][1:]:
            lines.append(f"- End to end on {e['pairs']} `{e['split']}` pairs, {row['label']} vs {paper['label']}: "
                         f"{row['pairs_per_hour'] / paper['pairs_per_hour']:.1f}x the pairs per hour "
                         f"({row['pairs_per_hour']:,.0f} vs {paper['pairs_per_hour']:,.0f}), mean "
                         f"{row['mean_steps']:.0f} steps per pair, mIoU {row['miou']:.3f} vs {paper['miou']:.3f}.")
    if "gpu" in summary:
        lines.append(f"- GPU: {summary['gpu']}.")
    return lines


#: Where the Summary goes in the README (between these lines, by ``benchmarks/throughput.py``).
README_MARKERS = ("<!-- bench:performance:start -->", "<!-- bench:performance:end -->")


def readme_block(text: str, source: str) -> str:
    """The README's copy of a whole report ``text``'s Summary (derived again from its raw figures), with the
    report's machine line and the file ``source`` it came from."""
    header, _, raw = split_report(text)
    return "\n".join([*summary_lines(raw), "",
                      f"From [{source}]({source}) (machine: {_header_field(header, 'Machine', '?')}); "
                      "`python benchmarks/throughput.py` "
                      "rewrites both."])


def render(report: Report, args: argparse.Namespace, load_before: tuple[float, float, float],
           cpu_s: float, wall_s: float, command: str) -> str:
    """The whole ``docs/PERFORMANCE.md``."""
    lines = ["# Performance", "",
             "Generated by `benchmarks/throughput.py`; rerun it to refresh every figure below.", "",
             *machine_lines(args, load_before, command),
             f"- Benchmark cost: {wall_s / 60:.1f} min wall, {cpu_s / 60:.1f} min CPU", "",
             load_note(load_before, os.getloadavg()), ""]
    return "\n".join([*lines, *report_body(report.sections, report.summary)])


SUMMARY_TITLE, RAW_TITLE = "Summary", "Raw figures"


def report_body(sections: Sequence[tuple[str, str]], summary: dict[str, Any]) -> list[str]:
    """The lines after a report's header: the Summary derived from ``summary``, the sections, the raw figures."""
    lines = []
    if headline := summary_lines(summary):
        lines += [f"## {SUMMARY_TITLE}", "", *headline, ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    return [*lines, f"## {RAW_TITLE}", "", "```json", json.dumps(summary, indent=1, default=str), "```", ""]


def split_report(text: str) -> tuple[list[str], list[tuple[str, str]], dict[str, Any]]:
    """A report of :func:`render` as its header lines (before the first section), its measured sections
    ``(title, body)`` in order (not the Summary, which is derived) and its raw figures.

    Raises:
        PeekabooError: ``text`` has no raw-figures block to merge with.
    """
    header, *chunks = re.split(r"^## ", text, flags=re.M)
    sections, raw = [], None
    for chunk in chunks:
        title, _, body = chunk.partition("\n")
        if title == RAW_TITLE:
            block = re.search(r"```json\n(.*?)\n```", body, flags=re.S)
            raw = json.loads(block.group(1)) if block else None
        elif title != SUMMARY_TITLE:
            sections.append((title, body.strip("\n")))
    if raw is None:
        raise PeekabooError(f"the report has no '## {RAW_TITLE}' block to merge with; rerun every section instead.")
    return header.rstrip("\n").split("\n"), sections, raw


def _header_field(header: Sequence[str], name: str, missing: str) -> str:
    """The value of a report header's ``- <name>: <value>`` line, or ``missing``."""
    return next((ln.removeprefix(f"- {name}: ") for ln in header if ln.startswith(f"- {name}: ")), missing)


def _refreshes_only(line: str, titles: set[str]) -> bool:
    """Whether ``line`` is an :func:`update_report` note naming only sections among ``titles``."""
    if not line.startswith("- Refreshed "):
        return False
    named = line.partition(", by ")[0].partition(": ")[2]
    return bool(named) and set(named.split(", ")) <= titles


def update_report(old: str, new: str) -> str:
    """``old`` (a whole report) with the sections ``new`` measured put in place of their earlier versions
    (new ones go last), its raw figures updated with ``new``'s and the Summary derived again from them. The
    header keeps ``old``'s machine and run lines and gains one line naming what was refreshed, when and by
    which command, so a reader can tell which figures come from which run."""
    old_header, old_sections, old_raw = split_report(old)
    new_header, new_sections, new_raw = split_report(new)
    fresh = dict(new_sections)
    sections = [(t, fresh.pop(t, body)) for t, body in old_sections] + list(fresh.items())
    when, command = _header_field(new_header, "Date", "?"), _header_field(new_header, "Command", "?")
    load = next((ln.removeprefix("- ") for ln in new_header if ln.startswith("- Load average")), None)
    cpu = _header_field(new_header, "Machine", "?").split(";")[0]
    elsewhere = cpu if cpu != _header_field(old_header, "Machine", "?").split(";")[0] else None
    note = (f"- Refreshed {when}: {', '.join(t for t, _ in new_sections)}, by {command}"
            + (f" on {elsewhere}" if elsewhere else "") + (f" ({load[0].lower()}{load[1:]})" if load else ""))
    # An earlier note whose sections are all measured again describes figures that are gone.
    old_header = [ln for ln in old_header if not _refreshes_only(ln, {t for t, _ in new_sections})]
    # The note goes right after the header's last list line (the run details), before its closing prose.
    end = max((i for i, ln in enumerate(old_header) if ln.startswith("- ")), default=len(old_header) - 1) + 1
    header = [*old_header[:end], note, *old_header[end:]]
    return "\n".join([*header, "", *report_body(sections, old_raw | new_raw)])


def parser(prog: str = "python -m peekaboo.bench.throughput") -> argparse.ArgumentParser:
    """The benchmark's options (where the report goes is the caller's: see ``benchmarks/throughput.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="model.pretrained: 'bundled', a diffusers folder or hub id")
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


def measure(args: argparse.Namespace, command: str) -> str:
    """Run the sections ``args`` (from :func:`parser`) asks for and return the whole report as markdown.

    Args:
        command: the command line, quoted in the report.
    """
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser().error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the Trainer's per-run banner
    # A fresh inductor cache, so the compile row measures a first run's compilation.
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch.set_num_threads(args.threads)
        load_before = os.getloadavg()
        cpu_start, wall_start = cpu_seconds(), time.perf_counter()
        report = Report()
        bench = Bench(args.model, torch.device("cpu"), args.warmup, args.steps, max_steps=args.max_steps,
                      config_dir=args.config_dir)
        cpu_sections = [s for s in sections if s != "gpu"]
        if cpu_sections:
            cfg = bench.config()
            n = max(max(BATCH_SIZES), QUALITY_PAIRS, EARLY_STOP_PAIRS, SWITCH_BATCH)
            items = load_items(n, cfg.optimization.mask.size, cfg.image_options.fit)
            runners = {"batch": section_batch, "overhead": section_overhead, "reference": section_reference,
                       "fast": section_fast, "switches": section_switches, "early_stop": section_early_stop,
                       "end_to_end": section_end_to_end}
            for name in cpu_sections:
                log.info("section %s", name)
                runners[name](bench, report, items)
        if "gpu" in sections:
            log.info("section gpu")
            section_gpu(report, GPU_WARMUP_STEPS, GPU_TIMED_STEPS, args.max_steps, config_dir=args.config_dir)
        return render(report, args, load_before, cpu_seconds() - cpu_start, time.perf_counter() - wall_start,
                      command)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peekaboo.bench.throughput``: measure, printing each section as it finishes; writes no file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    measure(parser().parse_args(argv), shlex.join(["python", "-m", "peekaboo.bench.throughput", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
