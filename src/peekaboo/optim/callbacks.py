"""The Lightning callbacks a fit of a batch of pairs runs with, each reading one pair's values as that pair's.

- :class:`MaskImages`: each pair's mask and composite to its TensorBoard run, a few times per fit.
- :class:`PairCurves`: each pair's loss curves to its own run when pairs share a batch.
- :class:`StableMaskStop`: early stopping, pair by pair (a settled mask, optionally a loss plateau).
- :class:`LossCurves`: each pair's losses at a few steps, kept in its result (the run report plots them).

Each is saved in checkpoints where its state matters, so a resumed pair behaves as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from peekaboo.config import EarlyStopConfig
from peekaboo.optim.module import DREAM_LOSS, LOSS_KEYS, PeekabooModule
from peekaboo.optim.restarts import choose, pair_of, prompt_fit

# About how many points of each pair's loss curve its result keeps (the run report plots them), and with how
# many significant digits: enough for a plot, small enough for one results.jsonl line per pair.
CURVE_POINTS = 32
CURVE_DIGITS = 4
CURVE_KEYS = LOSS_KEYS


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

    def on_fit_start(self, trainer: L.Trainer, pl_module: PeekabooModule) -> None:
        # Lightning restores this state from a checkpoint loaded onto the CPU, before this hook and after the
        # module moved to its device: follow the module there, or the first step of a resumed GPU fit mixes devices.
        for name, value in self.state_dict().items():
            if value is not None:
                setattr(self, name, value.to(pl_module.device))

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
                pl_module.last_losses[DREAM_LOSS], self.ema, self.best, self.since, cfg.loss_ema,
                cfg.loss_tolerance)
            settled &= self.since >= cfg.patience
        # Failed pairs, and pairs stopped by other means (an early choice of restarts), count as finished.
        done = self.stopped | pl_module.failed.to(binary.device) | (pl_module.stopped_at.to(binary.device) >= 0)
        new = settled & ~done if trainer.global_step >= cfg.min_steps else torch.zeros_like(settled)
        if bool(new.any()):
            self.stopped = self.stopped | new
            pl_module.stop_pairs(new, trainer.global_step)
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


class EarlyChoice(Callback):
    """Restarts chosen early (``optimization.restarts.choose_at = N``): after step N, each pair's candidates
    (the module's rows, :func:`~peekaboo.optim.restarts.candidate_ids`' order) are scored by
    :func:`~peekaboo.optim.restarts.prompt_fit` on their masks of that step, and all but the best of each pair
    are pruned (:meth:`PeekabooModule.prune`): frozen, so the remaining steps optimize one mask per pair. The
    kept candidate then is the one left running. The pruned rows are in checkpoints, so a run resumed after
    step N does not choose again."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        cfg = pl_module.cfg
        # At or after step N: a run preempted during step N resumes from a checkpoint of that step, unchosen.
        if trainer.global_step < cfg.restarts.choose_at or bool(pl_module.pruned.any()):
            return
        with torch.no_grad():
            alpha = pl_module().float()  # (K*B, 1, S, S): the masks after step N
        # Candidates of a pair are scored on the same draws: seeded by the pair's id, not the candidate's.
        fit = prompt_fit(pl_module.backbone, pl_module.images.cpu(), alpha.cpu(), pl_module.prompts,
                         [pair_of(pid) for pid in pl_module.pair_ids], cfg.restarts, cfg.seed, cfg.background,
                         cfg.guidance.guidance_scale)
        count = cfg.restarts.count
        kept = choose(fit, pl_module.failed.cpu(), count)  # (B,)
        losers = torch.ones(len(pl_module.pair_ids), dtype=torch.bool)
        losers[torch.arange(kept.numel()) * count + kept] = False
        pl_module.prune(losers, trainer.global_step)
        if bool(((pl_module.stopped_at >= 0) | pl_module.failed).all()):
            trainer.should_stop = True  # every kept candidate had stopped early (or failed) before the choice


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
