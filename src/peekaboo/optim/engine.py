"""Run one pair's optimization through a Lightning Trainer: the piece ``predict`` and dataset runs share."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
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

from peekaboo.config import EarlyStopConfig, OptimizationConfig, TrainerConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import PeekabooError
from peekaboo.optim.loggers import make_logger
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.restarts import candidate_ids, candidate_inits, choose, prompt_fit

log = logging.getLogger(__name__)

T = TypeVar("T")

# How many mask/composite snapshots a pair logs to TensorBoard over its optimization.
IMAGE_SNAPSHOTS = 4
# About how many points of each pair's loss curve its result keeps (the run report plots them), and with how
# many significant digits: enough for a plot, small enough for one results.jsonl line per pair.
CURVE_POINTS = 32
CURVE_DIGITS = 4
CURVE_KEYS = ("loss/dream", "loss/alpha", "loss/total")


# Signals a cluster sends before it takes the machine back (SLURM: SIGTERM, or SIGUSR1 with --signal).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A fit stopped by a preemption signal, after its checkpoint was saved; rerunning resumes it."""


@dataclass
class _PreemptionFlag:
    signal: int | None = None  # the preemption signal received, if any


#: Set by the handler :func:`preemption_signals` installs; read between steps and between batches.
PREEMPTION = _PreemptionFlag()


def _note_signal(signum: int, frame: Any) -> None:
    # Only a flag: the signal may land anywhere (a callback, a logger flush, a checkpoint save), so the work
    # in flight finishes and the next safe point saves and stops.
    PREEMPTION.signal = signum


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """Note SIGTERM / SIGUSR1 in :data:`PREEMPTION` instead of dying, for the duration of the block (the flag
    starts clear). Lightning's own SIGTERM handler, installed during each fit, calls this one too."""
    PREEMPTION.signal = None
    old = {s: signal.signal(s, _note_signal) for s in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class SaveOnPreemption(Callback):
    """After a preemption signal, save the fit's checkpoint to ``path`` and stop it with :class:`Preempted`.

    Checked after every step; when Lightning itself ends the fit on SIGTERM (its ``SIGTERMException``, at the
    epoch's end) the checkpoint is saved from ``on_exception`` instead, so no path through a fit loses it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._saved_at: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if PREEMPTION.signal is not None:
            self._save(trainer)
            raise Preempted(f"signal {PREEMPTION.signal} at step {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if PREEMPTION.signal is not None and not isinstance(exception, Preempted):
            self._save(trainer)


class _Witness(Callback):
    """Records the exception that ended a fit: Lightning turns Ctrl-C into ``sys.exit(1)``, and the engine
    turns it back into ``KeyboardInterrupt`` (exit status 130 at the command line)."""

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


class _Steps(torch.utils.data.Dataset):
    """The optimization has no data to iterate: each "batch" is just a step index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class MaskImages(Callback):
    """Logs each pair's mask and current composite to its TensorBoard run a few times over the optimization.

    Args:
        every_n_steps: log after every this many steps, and after the last (``max_steps`` or an early stop).
        runs: pair ``i``'s TensorBoard run is ``runs[i]``.
    """

    def __init__(self, every_n_steps: int, runs: list[TensorBoardLogger]):
        self.every, self.runs = max(1, every_n_steps), runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps and not trainer.should_stop:
            return
        with torch.no_grad():
            alpha = pl_module().detach().float().cpu()  # (B, 1, S, S)
        composite = pl_module.last_composite
        if composite is not None:
            composite = composite.float().clamp(0, 1).cpu()  # (B, 3, S, S)
        for i, run in enumerate(self.runs):
            run.experiment.add_images("mask/alpha", alpha[i : i + 1], step)
            if composite is not None:
                run.experiment.add_images("mask/composite", composite[i : i + 1], step)


class PairCurves(Callback):
    """A batch's curves pair by pair: each pair's values go to its own TensorBoard run (``runs[i]``) at the
    steps the Trainer logs the batch's means, so a pair's run reads as a one-pair run does, whatever batch
    the pair ran in."""

    def __init__(self, runs: list[TensorBoardLogger]):
        self.runs = runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        if not pl_module.logged_this_step:
            return
        metrics = pl_module.step_metrics()
        values = torch.stack(list(metrics.values()), 1).float().cpu()  # (B, M): one transfer for all pairs
        step = trainer.global_step - 1  # the index of the step just taken, as Lightning's own logging counts
        took = pl_module.took_step.tolist()  # a pair frozen by early stopping has no new values
        for i, run in enumerate(self.runs):
            if not pl_module.failed[i] and took[i]:
                run.log_metrics(dict(zip(metrics, values[i].tolist(), strict=True)), step)


def loss_plateau_update(
    loss: torch.Tensor,
    ema: torch.Tensor | None,
    best: torch.Tensor | None,
    since: torch.Tensor | None,
    decay: float,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the loss-plateau test, per pair: every tensor is ``(B,)``.

    ``ema = decay * ema + (1 - decay) * loss`` (the first loss starts it). ``best`` is the EMA when it last
    improved, i.e. fell below ``best - tolerance * |best|``, and ``since`` counts the steps since then (0 at
    the first step): a pair whose ``since`` reaches the patience has not improved by more than ``tolerance``
    (relative) over that many steps.

    Returns:
        ``(ema, best, since)`` after this step.
    """
    loss = loss.detach().float()
    if ema is None or best is None or since is None:
        return loss.clone(), loss.clone(), torch.zeros_like(loss, dtype=torch.long)
    ema = decay * ema + (1.0 - decay) * loss
    improved = ema < best - tolerance * best.abs()
    return ema, torch.where(improved, ema, best), torch.where(improved, torch.zeros_like(since), since + 1)


class StableMaskStop(Callback):
    """Early stopping, pair by pair. A pair stops after a step once (a) its binary mask has flipped at most
    ``tolerance`` of its pixels per step for ``patience`` consecutive steps, (b) with ``loss_tolerance`` set,
    the EMA of its dream loss has not improved by more than ``loss_tolerance`` (relative) for ``patience``
    steps (:func:`loss_plateau_update`), and (c) at least ``min_steps`` steps were taken.

    A stopped pair is frozen (:meth:`PeekabooModule.stop_pairs`) while the batch's other pairs go on; the fit
    ends once every pair has stopped or failed. Each pair's test reads only its own mask and loss, so a pair
    stops at the same step in any batch.
    """

    def __init__(self, cfg: EarlyStopConfig, threshold: float):
        self.cfg, self.threshold = cfg, threshold
        self.previous: torch.Tensor | None = None  # (B, S*S) bool: the last step's binary masks
        self.calm: torch.Tensor | None = None  # (B,) long: consecutive steps each mask has been settled
        self.ema: torch.Tensor | None = None  # (B,) float: the dream-loss EMA (with loss_tolerance)
        self.best: torch.Tensor | None = None  # (B,) float: its value when it last improved
        self.since: torch.Tensor | None = None  # (B,) long: steps since then
        self.stopped: torch.Tensor | None = None  # (B,) bool: pairs this callback has stopped

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        cfg = self.cfg
        # The mask of the step just taken (one update old): enough to tell whether it has stopped changing.
        binary = (pl_module.last_alpha > self.threshold).flatten(1)  # (B, S*S)
        if self.calm is None:
            self.calm = torch.zeros(binary.shape[0], dtype=torch.long, device=binary.device)
        if self.stopped is None:
            self.stopped = torch.zeros(binary.shape[0], dtype=torch.bool, device=binary.device)
        if self.previous is not None:
            flipped = (binary != self.previous).float().mean(1)  # (B,)
            self.calm = torch.where(flipped <= cfg.tolerance, self.calm + 1, torch.zeros_like(self.calm))
        self.previous = binary
        settled = self.calm >= cfg.patience  # (B,)
        if cfg.loss_tolerance is not None:
            self.ema, self.best, self.since = loss_plateau_update(
                pl_module.last_losses["loss/dream"], self.ema, self.best, self.since, cfg.loss_ema,
                cfg.loss_tolerance)
            settled &= self.since >= cfg.patience
        done = self.stopped | pl_module.failed.to(binary.device)  # failed pairs count as finished
        stopped_at = getattr(pl_module, "stopped_at", None)  # pairs stopped by other means count too
        if stopped_at is not None:
            done = done | (stopped_at.to(binary.device) >= 0)
        new = settled & ~done if trainer.global_step >= cfg.min_steps else torch.zeros_like(settled)
        if bool(new.any()):
            self.stopped = self.stopped | new
            stop_pairs = getattr(pl_module, "stop_pairs", None)  # a stand-in module (a replay) may lack it
            if stop_pairs is not None:
                stop_pairs(new, trainer.global_step)
        if bool((done | new).all()):
            trainer.should_stop = True
            # Lightning writes the logged values of the step it stops at: make them this step's.
            if pl_module.loggers and not pl_module.logged_this_step:
                pl_module.log_step_metrics()

    # Saved in checkpoints, so a resumed pair stops exactly where an uninterrupted one would.
    def state_dict(self) -> dict[str, Any]:
        return {"calm": self.calm, "previous": self.previous, "ema": self.ema, "best": self.best,
                "since": self.since, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = state_dict["previous"]
        if "calm" not in state_dict:  # a checkpoint from before pairs stopped one by one: one batch-wide count
            pairs = None if self.previous is None else self.previous.shape[0]
            self.calm = None if pairs is None else torch.full((pairs,), state_dict["calm_steps"], dtype=torch.long)
            return
        self.calm, self.ema, self.best = state_dict["calm"], state_dict["ema"], state_dict["best"]
        self.since, self.stopped = state_dict["since"], state_dict["stopped"]


class LossCurves(Callback):
    """Each pair's losses every ``ceil(max_steps / CURVE_POINTS)`` steps and at the last step, whatever the
    logger (or none); saved in checkpoints, so a resumed pair's curve is whole."""

    def __init__(self, max_steps: int):
        self.every = max(1, math.ceil(max_steps / CURVE_POINTS))
        self.steps: list[int] = []
        self.values: list[list[list[float]]] = []  # per recorded step: (K, B) for the K = len(CURVE_KEYS) terms

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stopped_now = bool((pl_module.stopped_at == step).any()) if pl_module.can_stop else False
        if step % self.every and step != trainer.max_steps and not trainer.should_stop and not stopped_now:
            return
        self.steps.append(step)
        self.values.append(torch.stack([pl_module.last_losses[k] for k in CURVE_KEYS]).float().cpu().tolist())

    def curve(self, i: int, last_step: int | None = None) -> dict[str, list]:
        """Pair ``i``'s curve up to ``last_step`` (its stop, if it stopped early; None: all of it):
        ``{"step": [...], "loss/dream": [...], ...}`` (non-finite values as None)."""
        kept = [j for j, step in enumerate(self.steps) if last_step is None or step <= last_step]
        out: dict[str, list] = {"step": [self.steps[j] for j in kept]}
        for k, key in enumerate(CURVE_KEYS):
            values = [self.values[j][k][i] for j in kept]
            out[key] = [float(f"{v:.{CURVE_DIGITS}g}") if math.isfinite(v) else None for v in values]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "values": self.values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.values = state_dict["steps"], state_dict["values"]


@dataclass
class PairResult:
    """What one pair's optimization produced."""

    alpha: torch.Tensor  # (S, S) float32 in [0, 1], on CPU
    steps: int  # the steps this pair took: fewer than the batch's when early stopping froze it sooner
    seconds: float  # wall time of the batch it was optimized in, divided by the batch size
    losses: dict[str, float] = field(default_factory=dict)
    failed: bool = False  # its loss or mask went non-finite (its alpha is then meaningless)
    curve: dict[str, list] = field(default_factory=dict)  # LossCurves.curve: losses at a few steps


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
        deterministic=False,
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
    tb_dir: str | Path | None = None,
    callbacks: list[Callback] | None = None,
    ckpt_path: str | Path | None = None,
    enable_progress_bar: bool | None = None,
    devices: Any = 1,
    run_name: str | None = None,
    pair_run_names: list[str] | None = None,
    logger_kind: str = "tensorboard",
) -> list[PairResult]:
    """Optimize the masks of B independent pairs together with one Lightning Trainer.

    With ``opt_cfg.restarts.count = K > 1``, each pair's K candidates (:mod:`peekaboo.optim.restarts`; candidate k
    starts from ``restarts.mask_inits``' init, cycled) are optimized together as ``K * B`` pairs (their
    TensorBoard runs are the pair's run name with ``#restart<k>`` for ``k >= 1``; their means go to ``run_name``,
    or ``<first name>+<K*B-1>`` where that is a candidate's run), and each pair's result is its
    kept candidate, with the losses ``restart/kept`` (its index) and ``restart/fit`` (its
    :func:`~peekaboo.optim.restarts.prompt_fit`). Arguments and return as for one optimization:

    Args:
        images: ``(B, 3, S, S)`` working images in [0, 1].
        tb_dir: the logger's root; each pair's curves (and, for TensorBoard, images) go to the run
            ``<tb_dir>/<pair run name>`` and, for B > 1, the batch's means to ``<tb_dir>/<run_name>`` (default
            ``<first name>+<B-1>``). None: no logging.
        callbacks: extra callbacks (e.g. checkpointing in dataset runs).
        ckpt_path: resume from this checkpoint.
        devices: which device of the accelerator this process uses (e.g. ``[local_rank]``).
        run_name: the TensorBoard run of the whole batch (for B = 1, the pair's run).
        pair_run_names: each pair's TensorBoard run name (default: its id).
        logger_kind: which Lightning logger writes the runs (:func:`peekaboo.optim.loggers.make_logger`).

    Returns:
        One result per pair, in order.
    """
    count = opt_cfg.restarts.count
    if count == 1:
        return _optimize(images, prompts, pair_ids, opt_cfg, trainer_cfg, backbone, tb_dir, callbacks, ckpt_path,
                         enable_progress_bar, devices, run_name, pair_run_names, logger_kind, None)
    start = time.perf_counter()
    names = candidate_ids(pair_run_names or pair_ids, count)
    images_k = images.repeat_interleave(count, dim=0)  # (K*B, 3, S, S), pair by pair
    prompts_k = [p for p in prompts for _ in range(count)]
    # The candidates' means go to a run of their own (None: _optimize's batch name), not to a candidate's run:
    # a one-pair run's name is its candidate 0's.
    means_run = None if run_name in names else run_name
    results = _optimize(images_k, prompts_k, candidate_ids(pair_ids, count), opt_cfg, trainer_cfg, backbone, tb_dir,
                        callbacks, ckpt_path, enable_progress_bar, devices, means_run, names, logger_kind,
                        candidate_inits(opt_cfg.restarts, opt_cfg.mask.init) * len(pair_ids))
    alphas = torch.stack([r.alpha for r in results])[:, None]  # (K*B, 1, S, S)
    failed = torch.tensor([r.failed for r in results])
    # Candidates of a pair share their scoring draws: seeded by the pair's id, not the candidate's.
    fit = prompt_fit(backbone, images_k.float(), alphas.float(), prompts_k,
                     [p for p in pair_ids for _ in range(count)], opt_cfg.restarts, opt_cfg.seed, opt_cfg.background)
    kept = choose(fit, failed, count).tolist()
    seconds = (time.perf_counter() - start) / len(pair_ids)
    out = []
    for i, k in enumerate(kept):
        best = results[i * count + k]
        losses = {**best.losses, "restart/kept": float(k), "restart/fit": float(fit[i * count + k])}
        out.append(PairResult(alpha=best.alpha, steps=best.steps, seconds=seconds, losses=losses,
                              failed=best.failed, curve=best.curve))
    return out


def _optimize(
    images: torch.Tensor,
    prompts: list[str],
    pair_ids: list[str],
    opt_cfg: OptimizationConfig,
    trainer_cfg: TrainerConfig,
    backbone: Backbone,
    tb_dir: str | Path | None,
    callbacks: list[Callback] | None,
    ckpt_path: str | Path | None,
    enable_progress_bar: bool | None,
    devices: Any,
    run_name: str | None,
    pair_run_names: list[str] | None,
    logger_kind: str,
    mask_inits: list[str] | None,
) -> list[PairResult]:
    """One optimization of each of B pairs (:func:`optimize_pairs` without restarts); ``mask_inits``: each
    pair's mask init (None: ``opt_cfg.mask.init``)."""
    logger: Any = False
    cbs = list(callbacks or [])
    if opt_cfg.early_stop.enabled:
        cbs.append(StableMaskStop(opt_cfg.early_stop, opt_cfg.threshold))
    curves = LossCurves(trainer_cfg.max_steps)  # after StableMaskStop: it records the step a pair stops at
    cbs.append(curves)
    pair_runs: list[Any] = []
    if tb_dir is not None:
        names = pair_run_names or pair_ids
        name = run_name or (names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}")
        resume_step = checkpoint_step(ckpt_path)
        logger = make_logger(logger_kind, tb_dir, name, resume_step)
        # A batch logs its means to its own run and each pair's curves and images to the pair's run.
        pair_runs = [logger] if len(names) == 1 else [make_logger(logger_kind, tb_dir, n, resume_step)
                                                      for n in names]
        # Both after StableMaskStop, which may end the run (and log its curves) at this step.
        if isinstance(logger, TensorBoardLogger):  # the other loggers have no common image call
            cbs.append(MaskImages(max(1, trainer_cfg.max_steps // IMAGE_SNAPSHOTS), pair_runs))
        if len(names) > 1:
            cbs.append(PairCurves(pair_runs))
    witness = _Witness()
    cbs.append(witness)
    has_ckpt = any(isinstance(cb, Checkpoint) for cb in cbs)
    trainer = build_trainer(trainer_cfg, logger, cbs, enable_progress_bar, has_ckpt, devices)
    module = PeekabooModule(images, prompts, pair_ids, opt_cfg, backbone, trainer_cfg.max_steps, mask_inits)
    loader = DataLoader(_Steps(trainer_cfg.max_steps), batch_size=None, shuffle=False, num_workers=0)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The loader yields step indices only: worker processes would add cost and nothing else.
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            # log_every_n_steps is chosen for 300-step pairs; shorter smoke runs need no reminder.
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            # weights_only: a checkpoint is data (tensors, numbers, strings); never unpickle code from it.
            trainer.fit(module, loader, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except SIGTERMException:  # Lightning's own stop on SIGTERM: SaveOnPreemption saved the checkpoint
        raise Preempted(f"signal {PREEMPTION.signal or signal.SIGTERM} at step {trainer.global_step}") from None
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
    with torch.no_grad():
        alphas = module().detach().float().cpu()[:, 0]  # (B, S, S)
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
                                  losses=losses, curve=curves.curve(i, steps[i] if stopped[i] else None)))
    return results


def split_on_oom(items: list[T], run: Callable[[list[T]], list[Any]], what: str = "pairs") -> list[Any]:
    """``run(items)``, and when the accelerator runs out of memory, ``run`` on each half in turn, down to one.

    Every pair keeps its own random stream whatever batch it runs in, so the results are those of the whole
    batch. One item that still does not fit is a user error with the knobs that shrink it.
    """
    try:
        return run(items)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(items) == 1:
            raise PeekabooError(f"One of the {what} alone does not fit in accelerator memory; lower "
                                "optimization.mask.size or model.resolution, or use model.dtype=bfloat16 with "
                                "trainer.precision=bf16-mixed.") from None
        half = len(items) // 2
        log.warning("out of accelerator memory for %d %s in one batch; retrying as %d + %d.", len(items), what,
                    half, len(items) - half)
        return split_on_oom(items[:half], run, what) + split_on_oom(items[half:], run, what)
