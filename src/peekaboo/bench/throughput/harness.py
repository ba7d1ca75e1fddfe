"""The throughput benchmark's harness: its inputs (synthetic pairs), the three loops it times (the Trainer, a
bare PyTorch loop, the paper-style loop) and the report the sections add to."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from peekaboo import ops
from peekaboo.bench.common import PeakMemory, StepClock, Timing, synchronize
from peekaboo.bench.methods import SCENE_PRESETS, resolve_config_dir
from peekaboo.bench.reference_loop import ReferenceLoop
from peekaboo.config import TrainConfig, load_config
from peekaboo.data.synthetic import synthetic_pairs
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.loading import load_backbone
from peekaboo.optim.engine import optimize_pairs
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.regions import forget_rankings
from peekaboo.runs.metrics import pair_scores
from peekaboo.utils import images
from peekaboo.utils.devices import trainer_devices

SPLIT = "tune"  # synthetic pairs the benchmark optimizes (never the evaluation split)
WARMUP_STEPS = 5
TIMED_STEPS = 30
#: The paper-style loop starts every mask at alpha 0.5 (it has no region start) and follows score distillation's
#: gradient (it has no other estimator), so the project runs timed and scored against it do too: same settings on
#: both sides.
REFERENCE_SETTINGS = ("optimization.mask.init=constant", "optimization.guidance.estimator=sds")
#: The steps of those runs, by scene set, where the preset's own count was chosen from another start: the count
#: the shapes `tune` split chose from alpha 0.5 (benchmarks/results/steps_tune_preset.json); the shapes preset's
#: own count is chosen after its region start. The objects preset starts at alpha 0.5 itself and keeps its count.
ALPHA_START_STEPS: dict[str, int] = {"shapes": 100}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the Trainer's banner and the warnings a bare loop triggers on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*self.log.*")  # no Trainer in the bare loop: logging is a no-op
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        yield


@dataclass
class Item:
    """A synthetic pair prepared for optimization and scoring."""

    id: str
    prompt: str
    canvas: torch.Tensor  # (3, S, S) working image in [0, 1]
    placement: images.Placement
    target: np.ndarray  # (H, W) uint8 ground truth


def load_items(n: int, size: int, fit: str, split: str = SPLIT, scenes: str = "shapes") -> list[Item]:
    """The first ``n`` pairs of ``split`` of the synthetic ``scenes`` set, fitted to ``size x size`` canvases."""
    items = []
    for pair in synthetic_pairs(split, n, scenes):
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


def ious(alphas: Sequence[torch.Tensor], items: Sequence[Item], threshold: float) -> list[float]:
    """IoU against the ground truth of each item's binary mask from its alpha ``(S, S)``."""
    return [pair_scores(binary_mask(a, it, threshold), it.target)["iou"] for a, it in zip(alphas, items, strict=True)]


class BareModule(PeekabooModule):
    """:class:`PeekabooModule` driven without a Trainer: the loop advances the step its generators read
    (``step_generators`` reads ``self.global_step``, which is the Trainer's counter, or 0 without one)."""

    bare_step: int = 0

    @property
    def global_step(self) -> int:  # type: ignore[override]
        return self.bare_step


class Bench:
    """Builds configs from the preset plus overrides, loads backbones, and times the three loops."""

    def __init__(self, model: str | None, device: torch.device, warmup: int, steps: int, preset: str | None = None,
                 max_steps: int | None = None, config_dir: str | os.PathLike | None = None, scenes: str = "shapes"):
        """``preset``: the model config group (default: the ``scenes`` set's, :data:`SCENE_PRESETS`); ``scenes``:
        the synthetic scenes the runs optimize (``data=<scenes>``)."""
        self.model, self.device, self.warmup, self.steps = model, device, warmup, steps
        self.scenes, self.preset = scenes, preset or SCENE_PRESETS[scenes]
        self.max_steps = max_steps
        self.config_dir = resolve_config_dir(config_dir)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        # model None: the preset's own model (model=shapes: the bundled shapes model).
        pretrained = [] if model is None else [f"model.pretrained={model}"]
        self.base = [f"model={self.preset}", *pretrained, "run.name=throughput", f"data={scenes}",
                     f"trainer.accelerator={accelerator}", "trainer.enable_progress_bar=false"]
        if max_steps is not None:  # quick checks only: pairs/hour and quality then use this step count
            self.base.append(f"trainer.max_steps={max_steps}")

    def config(self, *overrides: str) -> Any:
        """The preset's :class:`TrainConfig` with ``overrides`` applied (validated as the CLI validates)."""
        return load_config(TrainConfig, [*self.base, *overrides], self.config_dir, "train")

    def reference_config(self, kind: str, *overrides: str) -> Any:
        """:meth:`config` for a run compared with the paper-style loop: mask kind ``kind``, the loop's start and
        estimator (:data:`REFERENCE_SETTINGS`) and the scene set's :data:`ALPHA_START_STEPS` steps (unless this
        Bench fixes ``max_steps`` for a quick check), then ``overrides``."""
        alpha_steps = ALPHA_START_STEPS.get(self.scenes)
        steps = [] if self.max_steps is not None or alpha_steps is None else [f"trainer.max_steps={alpha_steps}"]
        return self.config(f"optimization.mask.kind={kind}", *REFERENCE_SETTINGS, *steps, *overrides)

    def backbone(self, cfg: Any) -> Backbone:
        """A fresh backbone for ``cfg.model`` (never the process-wide cache: variants must not share one), with
        ``model.vae_gradient_checkpointing`` applied."""
        backbone = load_backbone(cfg.model, self.device)
        backbone.set_vae_gradient_checkpointing(cfg.model.vae_gradient_checkpointing)
        return backbone

    def timed_steps(self, warmup: int | None, steps: int | None) -> tuple[int, int]:
        return (self.warmup if warmup is None else warmup), (self.steps if steps is None else steps)

    def trainer_run(self, label: str, cfg: Any, items: Sequence[Item], backbone: Backbone,
                    warmup: int | None = None, steps: int | None = None,
                    callbacks: Sequence[Callback] = (), tb_dir: str | None = None) -> tuple[Timing, list]:
        """Time ``optimize_pairs`` over ``items`` (one batch) for warm-up + timed steps."""
        warmup, steps = self.timed_steps(warmup, steps)
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
                        mem.peak_mb, "peak = whole process" if mem.whole_process else "", mem.reserved_mb)
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
                module.training_step(step, step).backward()
                optimizer.step()
                optimizer.zero_grad()
                synchronize(self.device)
                ends.append(time.perf_counter())
            with torch.no_grad():
                module().cpu()  # the final render optimize_pairs also makes
            wall = time.perf_counter() - start
        durations = [b - a for a, b in itertools.pairwise(ends)]
        return Timing(label, len(items), durations, self.warmup, wall - sum(durations), mem.peak_mb,
                      reserved_mb=mem.reserved_mb)

    def reference_run(self, label: str, cfg: Any, item: Item, backbone: Backbone, warmup: int | None = None,
                      steps: int | None = None) -> tuple[Timing, torch.Tensor]:
        """The paper-style loop on one pair for warm-up + timed steps; returns its timing and final alpha
        ``(S, S)``."""
        warmup, steps = self.timed_steps(warmup, steps)
        loop = ReferenceLoop(backbone, cfg.optimization)
        with PeakMemory(self.device) as mem:
            start = time.perf_counter()
            result = loop.run(item.canvas, item.prompt, warmup + steps,
                              ops.pair_seed(cfg.optimization.seed, item.id),
                              on_step=lambda _: synchronize(self.device))
            wall = time.perf_counter() - start
        timing = Timing(label, 1, result.step_seconds, warmup, wall - sum(result.step_seconds), mem.peak_mb,
                        reserved_mb=mem.reserved_mb)
        return timing, result.alpha


def wall_s(timing: Timing) -> float:
    """A run's whole wall time: its steps and its fixed cost."""
    return sum(timing.steps) + timing.fixed_s


@dataclass
class Report:
    """Markdown sections in order, plus the figures the summary quotes."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add(self, title: str, body: str) -> None:
        self.sections.append((title, body))
        print(f"\n## {title}\n\n{body}", flush=True)
