"""The fit driver: optimize a batch of pairs' masks with one Lightning Trainer, and give each pair its result.

:func:`optimize_pairs` is what ``predict``, the :class:`~peekaboo.app.segmenter.Segmenter`, dataset runs and the
benchmarks share. What a fit computes comes from the configs and the pairs; how it runs and where it logs comes
from one :class:`FitOptions`. The callbacks it wires are in :mod:`peekaboo.optim.callbacks`, the preemption
handling in :mod:`peekaboo.optim.preemption`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from peekaboo.config import OptimizationConfig, TrainerConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import PeekabooError
from peekaboo.optim.callbacks import EarlyChoice, LossCurves, MaskImages, PairCurves, StableMaskStop
from peekaboo.optim.loggers import make_logger
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.preemption import Preempted
from peekaboo.optim.restarts import candidate_ids, candidate_inits, choose, chooses_early, prompt_fit
from peekaboo.utils.console import quiet_lightning, warnings_to_log

log = logging.getLogger(__name__)

T = TypeVar("T")

# How many mask/composite snapshots a pair logs to TensorBoard over its optimization.
IMAGE_SNAPSHOTS = 4
# Lightning warnings that say nothing about a fit of this engine: each is a deliberate choice here.
_EXPECTED_WARNINGS = (
    # The loader yields step indices only: worker processes would add cost and nothing else.
    ".*does not have many workers.*",
    # log_every_n_steps is chosen for 300-step pairs; shorter smoke runs need no reminder.
    ".*smaller than the logging interval.*",
    ".*resuming from a checkpoint that ended before the epoch ended.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    # The device is the config's choice (trainer.accelerator), made on purpose.
    ".*(GPU|TPU) available but not used.*",
)


@dataclass(frozen=True)
class FitOptions:
    """How a fit runs and where it logs; never what it computes (the configs and the pairs decide that).

    Attributes:
        tb_dir: the logger's root; each pair's curves (and, for TensorBoard, images) go to the run
            ``<tb_dir>/<pair run name>`` and, for B > 1, the batch's means to ``<tb_dir>/<run_name>``. None (the
            default): no logging.
        logger_kind: which Lightning logger writes the runs (:func:`peekaboo.optim.loggers.make_logger`).
        run_name: the run of the whole batch (for B = 1, the pair's run); default ``<first name>+<B-1>``.
        pair_run_names: each pair's run name (default: its id).
        callbacks: extra callbacks (e.g. checkpointing in dataset runs).
        ckpt_path: resume from this checkpoint.
        enable_progress_bar: Lightning's progress bar for this fit; None: ``trainer.enable_progress_bar``.
        devices: which device of the accelerator this process uses (e.g. ``[local_rank]``).
    """

    tb_dir: str | Path | None = None
    logger_kind: str = "tensorboard"
    run_name: str | None = None
    pair_run_names: Sequence[str] | None = None
    callbacks: Sequence[Callback] = ()
    ckpt_path: str | Path | None = None
    enable_progress_bar: bool | None = None
    devices: Any = 1


class _Steps(torch.utils.data.Dataset):
    """The optimization has no data to iterate: each "batch" is just a step index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Witness(Callback):
    """Records the exception that ended a fit: Lightning turns Ctrl-C into ``sys.exit(1)``, and the engine
    turns it back into ``KeyboardInterrupt`` (exit status 130 at the command line)."""

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


@dataclass
class PairResult:
    """What one pair's optimization produced."""

    alpha: torch.Tensor  # (S, S) float32 in [0, 1], on CPU
    steps: int  # the steps this pair took: fewer than the batch's when early stopping froze it sooner
    seconds: float  # wall time of the batch it was optimized in, divided by the batch size
    losses: dict[str, float] = field(default_factory=dict)
    failed: bool = False  # its loss or mask went non-finite (its alpha is then meaningless)
    curve: dict[str, list] = field(default_factory=dict)  # LossCurves.curve: losses at a few steps
    pruned: bool = False  # a restart candidate frozen when another of its pair was chosen early


def build_trainer(
    cfg: TrainerConfig,
    logger: Any = False,
    callbacks: list[Callback] | None = None,
    enable_progress_bar: bool | None = None,
    enable_checkpointing: bool = False,
    devices: Any = 1,
) -> L.Trainer:
    """A Trainer for one pair: one device, ``max_steps`` optimization steps, no validation."""
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=devices,
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=1,  # one epoch = max_steps step indices
        log_every_n_steps=cfg.log_every_n_steps,
        logger=logger,
        callbacks=callbacks or [],
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=cfg.enable_progress_bar if enable_progress_bar is None else enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        # True: PyTorch's deterministic kernels where they exist, a warning (to the log) for an operation without
        # one (bilinear resizing's backward on CUDA has none: the backbone then resizes by matrix products).
        # False also turns off what an earlier fit of this process turned on.
        deterministic="warn" if cfg.deterministic else False,
        # Each pair's Trainer drives one device of its own process: a cluster environment (SLURM's, which
        # also raises for `srun --ntasks=N` without --ntasks-per-node) would describe the whole job instead.
        plugins=[LightningEnvironment()],
    )


def checkpoint_step(path: str | Path | None) -> int | None:
    """The global step a Lightning checkpoint was saved at (None without one)."""
    if path is None:
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def optimize_pair(image: torch.Tensor, prompt: str, pair_id: str, *args, **kwargs) -> PairResult:
    """Optimize one pair's mask: :func:`optimize_pairs` with a batch of one; ``image`` is ``(3, S, S)``."""
    return optimize_pairs(image[None], [prompt], [pair_id], *args, **kwargs)[0]


def optimize_pairs(
    images: torch.Tensor,
    prompts: list[str],
    pair_ids: list[str],
    opt_cfg: OptimizationConfig,
    trainer_cfg: TrainerConfig,
    backbone: Backbone,
    options: FitOptions | None = None,
    **option_fields: Any,
) -> list[PairResult]:
    """Optimize the masks of B independent pairs together with one Lightning Trainer.

    With ``opt_cfg.restarts.count = K > 1``, each pair's K candidates (:mod:`peekaboo.optim.restarts`; candidate
    k starts from ``restarts.mask_inits``' init, cycled) are optimized together as ``K * B`` pairs (their runs are
    the pair's run name with ``#restart<k>`` for ``k >= 1``; their means go to ``options.run_name``, or
    ``<first name>+<K*B-1>`` where that is a candidate's run), and each pair's result is its kept candidate,
    with the losses ``restart/kept`` (its index) and ``restart/fit`` (its
    :func:`~peekaboo.optim.restarts.prompt_fit`). With ``restarts.choose_at = N > 0`` the choice is made after
    step N (:class:`~peekaboo.optim.callbacks.EarlyChoice`) and only the kept candidates run the later steps.

    The fit prints nothing of Lightning's own (hardware banners, tips); the warnings raised inside it go to this
    module's logger.

    Args:
        images: ``(B, 3, S, S)`` working images in [0, 1].
        options: how the fit runs and where it logs (:class:`FitOptions`; default: no logging, no extra
            callbacks, the config's progress bar).
        **option_fields: :class:`FitOptions` fields as keywords, e.g. ``callbacks=[ckpt]``: short for
            ``options=FitOptions(callbacks=[ckpt])`` (with ``options``, they replace its fields).

    Returns:
        One result per pair, in order.
    """
    fit = dataclasses.replace(options or FitOptions(), **option_fields)
    count = opt_cfg.restarts.count
    if count == 1:
        return _fit(images, prompts, pair_ids, opt_cfg, trainer_cfg, backbone, fit)
    start = time.perf_counter()
    names = candidate_ids(list(fit.pair_run_names or pair_ids), count)
    images_k = images.repeat_interleave(count, dim=0)  # (K*B, 3, S, S), pair by pair
    prompts_k = [p for p in prompts for _ in range(count)]
    # The candidates' means go to a run of their own (None: _fit's batch name), not to a candidate's run:
    # a one-pair run's name is its candidate 0's.
    means_run = None if fit.run_name in names else fit.run_name
    results = _fit(images_k, prompts_k, candidate_ids(pair_ids, count), opt_cfg, trainer_cfg, backbone,
                   dataclasses.replace(fit, run_name=means_run, pair_run_names=names),
                   candidate_inits(opt_cfg.restarts, opt_cfg.mask.init) * len(pair_ids))
    alphas = torch.stack([r.alpha for r in results])[:, None]  # (K*B, 1, S, S)
    failed = torch.tensor([r.failed for r in results])
    # Candidates pruned by an early choice (restarts.choose_at) hold unfinished masks: the one left running is
    # kept, unless it failed afterwards, when the pair falls back on its best pruned one.
    pruned = torch.tensor([r.pruned for r in results])
    out_of_race = failed | pruned
    left = ~out_of_race.view(-1, count).all(dim=1).repeat_interleave(count)  # (K*B,): a pair with one running
    # Only the fits the choice reads (and the kept one's, for its record): a pair with a survivor, the survivor's.
    scored = ~(left & pruned)
    rows = scored.nonzero()[:, 0].tolist()
    fit_scores = torch.full((len(results),), float("inf"))
    # Candidates of a pair share their scoring draws: seeded by the pair's id, not the candidate's; a row's fit
    # does not depend on the other rows scored with it.
    fit_scores[scored] = prompt_fit(backbone, images_k[rows].float(), alphas[rows].float(),
                                    [prompts_k[r] for r in rows], [pair_ids[r // count] for r in rows],
                                    opt_cfg.restarts, opt_cfg.seed, opt_cfg.background,
                                    opt_cfg.guidance.guidance_scale)
    kept = choose(fit_scores, torch.where(left, out_of_race, failed), count).tolist()
    seconds = (time.perf_counter() - start) / len(pair_ids)
    out = []
    for i, k in enumerate(kept):
        best = results[i * count + k]
        losses = {**best.losses, "restart/kept": float(k), "restart/fit": float(fit_scores[i * count + k])}
        out.append(PairResult(alpha=best.alpha, steps=best.steps, seconds=seconds, losses=losses,
                              failed=best.failed, curve=best.curve))
    return out


def _fit(
    images: torch.Tensor,
    prompts: list[str],
    pair_ids: list[str],
    opt_cfg: OptimizationConfig,
    trainer_cfg: TrainerConfig,
    backbone: Backbone,
    fit: FitOptions,
    mask_inits: list[str] | None = None,
) -> list[PairResult]:
    """One optimization of each of B pairs (:func:`optimize_pairs` without restarts); ``mask_inits``: each
    pair's mask init (None: ``opt_cfg.mask.init``)."""
    logger: Any = False
    cbs = list(fit.callbacks)
    if chooses_early(opt_cfg.restarts):
        # Before StableMaskStop, which then ends the fit if the choice left no row running.
        cbs.append(EarlyChoice())
    if opt_cfg.early_stop.enabled:
        cbs.append(StableMaskStop(opt_cfg.early_stop, opt_cfg.threshold))
    curves = LossCurves(trainer_cfg.max_steps)  # after both: it records the step a pair stops at
    cbs.append(curves)
    pair_runs: list[Any] = []
    if fit.tb_dir is not None:
        names = list(fit.pair_run_names or pair_ids)
        name = fit.run_name or (names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}")
        resume_step = checkpoint_step(fit.ckpt_path)
        logger = make_logger(fit.logger_kind, fit.tb_dir, name, resume_step)
        # A batch logs its means to its own run and each pair's curves and images to the pair's run.
        pair_runs = [logger] if len(names) == 1 else [make_logger(fit.logger_kind, fit.tb_dir, n, resume_step)
                                                      for n in names]
        # Both after StableMaskStop, which may end the run (and log its curves) at this step.
        if isinstance(logger, TensorBoardLogger):  # the other loggers have no common image call
            cbs.append(MaskImages(max(1, trainer_cfg.max_steps // IMAGE_SNAPSHOTS), pair_runs))
        if len(names) > 1:
            cbs.append(PairCurves(pair_runs))
    witness = _Witness()
    cbs.append(witness)
    has_ckpt = any(isinstance(cb, Checkpoint) for cb in cbs)
    module = PeekabooModule(images, prompts, pair_ids, opt_cfg, backbone, trainer_cfg.max_steps, mask_inits)
    loader = DataLoader(_Steps(trainer_cfg.max_steps), batch_size=None, shuffle=False, num_workers=0)
    with quiet_lightning(), warnings_to_log(log, ignore=_EXPECTED_WARNINGS), _deterministic_flags_kept():
        trainer = build_trainer(trainer_cfg, logger, cbs, fit.enable_progress_bar, has_ckpt, fit.devices)
        start = time.perf_counter()
        try:
            # weights_only: a checkpoint is data (tensors, numbers, strings); never unpickle code from it.
            trainer.fit(module, loader, ckpt_path=str(fit.ckpt_path) if fit.ckpt_path else None, weights_only=True)
        except SIGTERMException:  # Lightning's own stop on SIGTERM: SaveOnPreemption saved the checkpoint
            raise Preempted.at(trainer.global_step) from None
        except SystemExit:
            if isinstance(witness.exception, KeyboardInterrupt):
                # Lightning left SIGINT ignored for its shutdown; give Ctrl-C back to the user.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt from None
            raise
        finally:  # an interrupted batch keeps what its pairs' runs logged (the Trainer closes its own logger)
            for run in pair_runs:
                if run is not logger:
                    run.finalize("success")
    seconds = (time.perf_counter() - start) / len(pair_ids)
    alphas = module.final_alpha  # rendered on the fit's device, before Lightning moved the module to the CPU
    if alphas is None:  # no step left to take (a checkpoint of a finished fit): render it on that device too
        with torch.no_grad():
            alphas = module.to(trainer.strategy.root_device)().detach().float().cpu()
    alphas = alphas[:, 0]  # (B, S, S)
    if logger:
        logger.finalize("success")
    steps = module.steps_used(trainer.global_step)
    stopped = (module.stopped_at >= 0).tolist()
    results = []
    for i in range(len(pair_ids)):
        losses = {k: float(v[i]) for k, v in module.last_losses.items()}
        if stopped[i]:  # a pair frozen before a resume has no losses of its own in this process
            losses = {k: v for k, v in losses.items() if math.isfinite(v)}
        results.append(PairResult(alpha=alphas[i], steps=steps[i], seconds=seconds, failed=bool(module.failed[i]),
                                  losses=losses, curve=curves.curve(i, steps[i] if stopped[i] else None),
                                  pruned=bool(module.pruned[i])))
    return results


@contextlib.contextmanager
def _deterministic_flags_kept() -> Iterator[None]:
    """The Trainer sets PyTorch's process-wide deterministic-algorithms flag (``trainer.deterministic``); give the
    caller's setting back after the fit."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def split_on_oom(items: list[T], run: Callable[[list[T]], list[Any]], what: str = "pairs") -> list[Any]:
    """``run(items)``, and when the accelerator runs out of memory, ``run`` on each half in turn, down to one.

    Every pair keeps its own random stream whatever batch it runs in, so the results are those of the whole
    batch. One item that still does not fit is a user error with the knobs that shrink it: every pair of a run
    has the same size, so the others would not fit either, and the run stops.

    The halves run after the ``except`` block, once the failed attempt is unreachable: its traceback holds the
    frames of the step that ran out (latents holding the VAE's graph), and a retry inside the block would keep
    them, and chain every nested failure to them, while it needs that memory.
    """
    try:
        return run(items)
    except torch.cuda.OutOfMemoryError:
        pass
    free_accelerator_memory()
    if len(items) == 1:
        raise PeekabooError(f"One of the {what} alone does not fit in accelerator memory, and every one needs as "
                            "much; lower optimization.mask.size or model.resolution, or use model.dtype=bfloat16 "
                            "with trainer.precision=bf16-mixed.")
    half = len(items) // 2
    log.warning("out of accelerator memory for %d %s in one batch; retrying as %d + %d.", len(items), what,
                half, len(items) - half)
    return split_on_oom(items[:half], run, what) + split_on_oom(items[half:], run, what)


def free_accelerator_memory() -> None:
    """Collect what a failed fit left (Lightning's trainer, module and callbacks refer to each other) and hand
    the CUDA caching allocator's free blocks back, so the next attempt starts from the memory the model needs."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
