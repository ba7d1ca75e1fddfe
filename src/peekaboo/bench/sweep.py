"""The tuning sweep that chooses a scene set's benchmark settings, on the ``tune`` split only (:func:`sweep`): a
coordinate search over the default's knobs, the learning rate of each mask kind and the cross-attention
threshold."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from peekaboo.bench.methods import KIND_EXTRA, canonical_key, method_config, resolve_config_dir, settings_key
from peekaboo.bench.report import sweep_markdown
from peekaboo.bench.run import (
    DEFAULT_BATCH,
    Progress,
    attention_maps,
    progress_logger,
    run_peekaboo,
    score_attention,
)
from peekaboo.bench.scoring import load_pairs, summarize_method
from peekaboo.bench.trial_cache import TrialCache
from peekaboo.config import MASK_KINDS
from peekaboo.diffusion.loading import shared_backbone

log = logging.getLogger("peekaboo.bench")

# Pairs of the tune split the sweep scores each trial on (--pairs).
TUNE_PAIRS = 48

# -- the sweep's search space ---------------------------------------------------------------------------------
#: Knobs of the default, searched one at a time in this order, each starting from the best so far.
#: The mask kind comes first: an unfiltered raster mask picks up the VAE encoder's high-frequency gradients
#: (speckled masks), which the bilateral filter removes. The Fourier kinds cost more and are left to their rows.
SWEEP_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimization.mask.kind", ("raster", "raster_bilateral")),
    ("optimization.loss.gravity", ("0.006", "0.0125", "0.025", "0.05")),
    ("optimization.optim.lr", ("0.05", "0.1")),
    ("optimization.guidance.guidance_scale", ("7.5", "15", "30", "60")),
    ("optimization.guidance.latent_mode", ("mean", "sample")),
)
#: A numeric knob whose best value is the largest or smallest tried is extended past that edge by the same
#: ratio as its last step (gravity 0.025 -> 0.05 -> 0.1), at most this many times, so the search does not stop
#: at the edge of a range that was a guess.
SWEEP_EDGE_EXTENSIONS = 2
#: Step counts every trial is also scored at (snapshots of the same run, so they cost nothing extra).
SWEEP_STEPS = (50, 100, 150, 200)
#: The fewest steps whose tune mIoU is within this of the best step count's are chosen (time is per step).
SWEEP_STEPS_TOLERANCE = 0.01
#: Learning rates tried for a mask kind's row (Adam; the paper's SGD at 1e-5 barely moves a 64x64 mask). The
#: default's kind keeps the default's tuned rate.
SWEEP_KIND_LRS: dict[str, tuple[str, ...]] = {"fourier": ("0.003", "0.01")}
#: A kind whose rate is not searched takes its partner's (the same parameters with or without the bilateral
#: filter: the filter averages logits, so it does not change the parameters' scale; a search costs hours here).
SWEEP_KIND_PARTNER: dict[str, str] = {"raster": "raster_bilateral", "raster_bilateral": "raster",
                                      "fourier": "fourier_bilateral", "fourier_bilateral": "fourier"}
SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: The mask starts whose own step count the sweep chooses (on top of the chosen default), so that the benchmark
#: runs each row at the count chosen for its start and mask kind, not at the default's: a start nearer the object
#: may be done sooner, one farther away later.
SWEEP_STARTS = ("constant", "cross_attention", "region")


def sweep(
    num_pairs: int = TUNE_PAIRS,
    batch_size: int = DEFAULT_BATCH,
    extra: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    stages: Sequence[tuple[str, Sequence[str]]] = SWEEP_STAGES,
    steps: Sequence[int] = SWEEP_STEPS,
    kind_lrs: dict[str, Sequence[str]] | None = None,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
    cache_path: Path | None = None,
    partner: dict[str, str] | None = None,
    scenes: str = "shapes",
    starts: Sequence[str] = SWEEP_STARTS,
    edge_extensions: int = SWEEP_EDGE_EXTENSIONS,
) -> dict[str, Any]:
    """Choose the settings on the ``tune`` split (never ``eval``) of the ``scenes`` set by a coordinate search.

    1. The default's knobs (:data:`SWEEP_STAGES`), one at a time in order, each value tried on top of the best
       so far (ties: lower wrong-object rate, then the current value). A numeric knob whose best value lies on
       the edge of those tried is extended past it, up to ``edge_extensions`` times (:func:`past_the_edge`).
       Every trial also scores its masks after each of ``steps`` (snapshots of the same run) and counts at its
       best step count: the fewest steps whose mIoU is within :data:`SWEEP_STEPS_TOLERANCE` of its best snapshot
       (time is per step).
    2. The step count: the winner's, chosen the same way.
    3. The learning rate of each other mask kind (:data:`SWEEP_KIND_LRS`, Adam) on top of the chosen default,
       each trial run to the largest of ``steps`` and scored at its own best step count, which becomes the kind's.
    4. The step count of each other start (:data:`SWEEP_STARTS`) on top of the chosen default, the same way.
    5. The cross-attention threshold (:data:`SWEEP_THRESHOLDS`): maps computed once, thresholds compared.

    Args:
        cache_path: a JSON file of finished trials: a rerun after an interruption skips them.

    Returns:
        ``{"trials": [...], "default_overrides": [...], "kind_optim": {...}, "step_counts": {...},
        "cross_attention_threshold", "markdown", ...}``; each trial holds its stage, overrides, step count and
        summary. ``step_counts`` maps ``"default"``, ``"kind:<mask kind>"`` and ``"start:<mask.init>"`` to the
        step count chosen for it (:func:`peekaboo.bench.methods.row_max_steps` reads it).
    """
    kind_lrs = SWEEP_KIND_LRS if kind_lrs is None else kind_lrs
    partner = SWEEP_KIND_PARTNER if partner is None else partner
    cdir = resolve_config_dir(config_dir)
    pairs = load_pairs("tune", num_pairs, scenes)
    base = method_config((), extra, cdir, scenes=scenes)
    backbone = shared_backbone(base.model)
    cache = TrialCache(cache_path, normalize=trial_key)
    if finished := len(cache.load()):
        log.info("sweep: %d finished trials read from %s", finished, cache_path)
    trials: list[dict[str, Any]] = []

    def config(overrides: dict[str, str]) -> Any:
        return method_config([f"{k}={v}" for k, v in overrides.items()], extra, cdir, scenes=scenes)

    def summaries(stage: str, overrides: dict[str, str], block: bool) -> dict[str, dict] | None:
        """Summaries by step count (as stored) of one setting, from the cache or run here; None when another
        process is running it and ``block`` is False."""
        cfg = config(overrides)
        snaps = [s for s in steps if s <= cfg.trainer.max_steps]
        key = trial_key(settings_key(cfg) + json.dumps({"snapshots": snaps, "pairs": len(pairs)}))
        while True:
            found = cache.get(key)
            if found is not None:
                return found
            if not cache.claim(key):
                if not block:
                    return None
                log.info("sweep %s: waiting for another process's trial", stage)
                found = cache.wait(key)
                if found is not None:
                    return found
                continue  # its process stopped without finishing: run it here
            argv = " ".join(f"{k}={v}" for k, v in overrides.items())
            log.info("sweep %s: %s", stage, argv or "(project config)")
            t0 = time.perf_counter()
            try:
                runs = run_peekaboo(cfg, pairs, backbone, batch_size, snaps,
                                    _touching(cache, key, progress_logger(stage)))
                found = {str(s): summarize_method(r) for s, r in runs.items()}
                cache.put(key, found)
            finally:
                cache.release(key)  # after a failure, so that another process may run it (after put: nothing)
            final = found[str(cfg.trainer.max_steps)]
            log.info("  -> mIoU %.3f, wrong %.1f%% (%.0f s)", final["miou"] or 0.0,
                     100 * (final["wrong_object_rate"] or 0.0), time.perf_counter() - t0)
            return found

    def evaluate_all(items: Sequence[tuple[str, dict[str, str], str]]) -> list[dict[int, dict]]:
        """Summaries by step count of each ``(stage, overrides, value)`` setting (snapshots at ``steps`` up to
        its max_steps); ``value`` is what the stage tries (for the report). The settings are independent: a
        trial another process is running is passed over and waited for at the end."""
        found = [summaries(stage, over, block=False) for stage, over, _ in items]
        found = [f if f is not None else summaries(stage, over, block=True)
                 for f, (stage, over, _) in zip(found, items, strict=True)]
        results = []
        for f, (stage, over, value) in zip(found, items, strict=True):
            assert f is not None
            result = {int(s): summ for s, summ in f.items()}
            argv = [f"{k}={v}" for k, v in over.items()]
            if not any(t["stage"] == stage and t["overrides"] == argv for t in trials):
                # The largest step count scored is the run's length (every run is scored at its end).
                trials.append({"stage": stage, "value": value, "overrides": argv, "max_steps": max(result),
                               "by_steps": dict(sorted(result.items()))})
            results.append(result)
        return results

    def evaluate(stage: str, overrides: dict[str, str], value: str) -> dict[int, dict]:
        return evaluate_all([(stage, overrides, value)])[0]

    def rank(summary: dict) -> tuple[float, float]:
        return (summary["miou"] or 0.0, -(summary["wrong_object_rate"] or 0.0))

    def best_steps_of(result: dict[int, dict]) -> int:
        """The fewest steps whose mIoU is within SWEEP_STEPS_TOLERANCE of the trial's best snapshot."""
        top = max(result[s]["miou"] or 0.0 for s in result)
        return min(s for s in result if (result[s]["miou"] or 0.0) >= top - SWEEP_STEPS_TOLERANCE)

    def trial_score(result: dict[int, dict]) -> tuple[float, float]:
        return rank(result[best_steps_of(result)])

    # 1. The default's knobs; each trial is scored at its own best step count (the step count is a knob too,
    #    and a larger learning rate or gravity reaches its best mask sooner).
    chosen: dict[str, str] = {}
    for key, values in stages:
        cfg = config(chosen)
        current = str(OmegaConf.select(cfg, key))
        tried = [current]
        for value in values:
            if not any(value == t or _same_number(value, t) for t in tried):
                tried.append(value)
        items = [(key, chosen, f"{current} (current)"), *((key, {**chosen, key: v}, v) for v in tried[1:])]
        best_value, best = current, (-1.0, 0.0)
        for value, result in zip(tried, evaluate_all(items), strict=True):
            if trial_score(result) > best:
                best_value, best = value, trial_score(result)
        for _ in range(edge_extensions):
            beyond = past_the_edge(tried, best_value)
            if beyond is None:
                break
            tried.append(beyond)
            result = evaluate(key, {**chosen, key: beyond}, beyond)
            if trial_score(result) > best:
                best_value, best = beyond, trial_score(result)
        if best_value != current:
            chosen[key] = best_value
        log.info("sweep %s: best %s (mIoU %.3f)", key, best_value, best[0])

    # 2. The step count, from the winner's snapshots.
    runs = evaluate("trainer.max_steps", chosen, "snapshots of the winner")
    best_steps = best_steps_of(runs)
    if best_steps != config(chosen).trainer.max_steps:
        chosen["trainer.max_steps"] = str(best_steps)
    default_cfg = config(chosen)
    default_summary = runs[best_steps]

    # 3. Each other mask kind: its learning rate on top of the chosen default, and its own step count.
    longest = {"trainer.max_steps": str(max(steps))}
    step_counts: dict[str, int] = {"default": best_steps}
    kind_optim: dict[str, list[str]] = {}
    kind_scores: dict[str, float | None] = {}
    default_kind = default_cfg.optimization.mask.kind
    kind_optim[default_kind] = [f"optimization.optim.name={default_cfg.optimization.optim.name}",
                                f"optimization.optim.lr={default_cfg.optimization.optim.lr}"]
    kind_scores[default_kind] = default_summary["miou"]
    # Stages 3 and 4 depend only on the chosen default: their trials go to evaluate_all together, so that several
    # processes sharing the cache run them side by side.
    kind_items = {(kind, lr): (f"{kind} lr", {**chosen, **longest, "optimization.mask.kind": kind,
                                              **dict(o.split("=", 1) for o in KIND_EXTRA.get(kind, ())),
                                              "optimization.optim.name": "adam", "optimization.optim.lr": lr}, lr)
                  for kind, lrs in kind_lrs.items() if kind != default_kind for lr in lrs}
    other_starts = [init for init in starts if init != default_cfg.optimization.mask.init]
    start_items = {init: ("start steps", {**chosen, **longest, "optimization.mask.init": init}, init)
                   for init in other_starts}
    found = evaluate_all([*kind_items.values(), *start_items.values()])
    kind_results = dict(zip(kind_items, found[: len(kind_items)], strict=True))
    start_results = dict(zip(start_items, found[len(kind_items):], strict=True))
    for kind, lrs in kind_lrs.items():
        if kind == default_kind:
            continue
        best_lr, best_kind, best_result = lrs[0], (-1.0, 0.0), {}
        for lr in lrs:
            result = kind_results[(kind, lr)]
            if trial_score(result) > best_kind:
                best_lr, best_kind, best_result = lr, trial_score(result), result
        kind_optim[kind] = ["optimization.optim.name=adam", f"optimization.optim.lr={best_lr}"]
        kind_scores[kind] = best_kind[0]
        step_counts[f"kind:{kind}"] = best_steps_of(best_result)
    for kind in MASK_KINDS:
        if kind not in kind_optim and partner.get(kind) in kind_optim:
            kind_optim[kind] = kind_optim[partner[kind]]
            kind_scores[kind] = None  # not measured on the tune split
            if f"kind:{partner[kind]}" in step_counts:
                step_counts[f"kind:{kind}"] = step_counts[f"kind:{partner[kind]}"]
    kind_optim = {k: kind_optim[k] for k in MASK_KINDS if k in kind_optim}

    # 4. Each other start's step count, on top of the chosen default.
    start_scores: dict[str, float | None] = {}
    for init, result in start_results.items():
        step_counts[f"start:{init}"] = best_steps_of(result)
        start_scores[init] = result[step_counts[f"start:{init}"]]["miou"]

    # 5. The cross-attention threshold.
    log.info("sweep cross-attention threshold")
    maps = attention_maps(base, pairs, backbone, progress_logger("cross_attention"))
    ca = {t: summarize_method(score_attention(maps, pairs, t)) for t in thresholds}
    best_t = max(thresholds, key=lambda t: rank(ca[t]))
    trials.extend({"stage": "cross-attention threshold", "value": str(t), "overrides": [], "max_steps": None,
                   "by_steps": {0: ca[t]}} for t in thresholds)

    report = {
        "scenes": scenes, "split": "tune", "pairs": len(pairs), "extra_overrides": list(extra),
        "default_overrides": [f"{k}={v}" for k, v in chosen.items()],
        "default_miou": default_summary["miou"], "default_wrong_object_rate": default_summary["wrong_object_rate"],
        "kind_optim": kind_optim, "kind_miou": kind_scores, "step_counts": step_counts,
        "start_miou": start_scores,
        "cross_attention_threshold": best_t, "cross_attention_miou": ca[best_t]["miou"],
        "trials": trials,
    }
    report["markdown"] = sweep_markdown(report, SWEEP_STEPS_TOLERANCE)
    return report


def trial_key(key: str) -> str:
    """A trial's cache key (its settings, then how it is scored) with the settings as
    :func:`~peekaboo.bench.methods.canonical_key` reads them: a trial stored before a setting existed (at what is
    now its default), or under another speed switch, is found under today's key of the same run."""
    try:
        settings, end = json.JSONDecoder().raw_decode(key)
    except json.JSONDecodeError:
        return key
    return canonical_key(json.dumps(settings, sort_keys=True)) + key[end:]


def past_the_edge(tried: Sequence[str], best: str) -> str | None:
    """The next value of a numeric knob beyond the edge of those ``tried`` when ``best`` lies on that edge.

    The step is geometric, the ratio of the edge value to its neighbour: ``("0.0125", "0.025", "0.05")`` with
    best ``"0.05"`` gives ``"0.1"``, best ``"0.0125"`` gives ``"0.00625"``. ``None`` when ``best`` is inside the
    range, fewer than two distinct numbers were tried, a value is not a positive number (a mask kind, zero), or
    the next value rounds to one already tried. An integer knob stays an integer (and at least 1).
    """
    try:
        numbers = sorted({float(v) for v in tried})
        top = float(best)
    except ValueError:
        return None
    if len(numbers) < 2 or numbers[0] <= 0 or top not in (numbers[0], numbers[-1]):
        return None
    beyond = top * top / (numbers[-2] if top == numbers[-1] else numbers[1])
    if all(_is_int(v) for v in tried):
        beyond = round(beyond)  # an integer knob stays an integer
        if beyond < 1:
            return None
        text = str(beyond)
    else:
        text = np.format_float_positional(float(f"{beyond:.3g}"), trim="-")  # 0.1, not 1e-01
    return None if float(text) in numbers else text


def _touching(cache: TrialCache, key: str, report: Progress) -> Progress:
    """``report`` that also touches the claim on trial ``key`` after each batch, so it stays fresh."""

    def progress(done: int, total: int, seconds: float) -> None:
        cache.touch(key)
        report(done, total, seconds)

    return progress


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


