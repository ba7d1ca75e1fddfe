"""The synthetic-shapes benchmark: Peekaboo, its ablations and training-free baselines on held-out scenes.

``python -m peekaboo.bench.shapes [--split eval|tune] [--pairs 200] [--methods ...] [--out FILE]
[--readme README.md] [--set key=value ...]`` scores every method on the first ``--pairs`` pairs of
:func:`peekaboo.data.synthetic.synthetic_pairs` (scenes whose seeds are disjoint from the bundled model's
training scenes), prints a markdown table shaped like the paper's ablation table, and writes the per-pair
results, the table, the command and the machine to JSON and to ``docs/BENCHMARK.md``.

``python -m peekaboo.bench.shapes --split tune --sweep`` is the tuning sweep that chose the settings: a
coordinate search over the default's knobs, the learning rate of each mask kind and the cross-attention
threshold, on the ``tune`` split only (:func:`sweep`).

Every Peekaboo row starts from the project's config (``configs/train.yaml`` + ``configs/model/shapes.yaml``,
read with :func:`peekaboo.config.load_config`); a row only lists what it changes.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from peekaboo import io, ops
from peekaboo.backbone import Backbone, shared_backbone
from peekaboo.baselines import cross_attention_map, random_mask, whole_image
from peekaboo.bench import cpu_name
from peekaboo.config import MASK_KINDS, TrainConfig, load_config
from peekaboo.data.shapes import eval_pairs
from peekaboo.data.synthetic import SPLIT_NAMES, synthetic_pairs
from peekaboo.engine import optimize_pairs
from peekaboo.errors import NonFiniteError, PeekabooError
from peekaboo.metrics import DONE, pair_scores, summarize

log = logging.getLogger("peekaboo.bench")

BENCH_SPLITS = ("eval", "tune")
DEFAULT_PAIRS = 200
TUNE_PAIRS = 48
# Pairs optimized together (one VAE and one UNet call per step); each pair still gets the mask it gets alone.
DEFAULT_BATCH = 16
# Untimed optimization steps before the first row (see _warm_up).
WARM_UP_STEPS = 2
# The model config group every row starts from: configs/model/<MODEL_GROUP>.yaml.
MODEL_GROUP = "shapes"
# The dataset-run task: configs/train.yaml, whose validation needs no image (a predict config would).
CONFIG_TASK = "train"
# The bench writes no run folder, but a dataset-run config requires a run name.
_RUN_NAME = "run.name=shapes-bench"
# Precision columns of the table (the paper's ablation table reports these four).
TABLE_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
README_START = "<!-- bench:shapes:start -->"
README_END = "<!-- bench:shapes:end -->"
DEFAULT_OUT = {"eval": Path("benchmarks/results/shapes_eval.json"), "tune": Path("benchmarks/results/shapes_tune.json")}
SWEEP_OUT = Path("benchmarks/results/shapes_sweep.json")
SWEEP_CACHE = Path("work/bench_sweep_cache.json")
DOCS = Path("docs/BENCHMARK.md")

# -- settings chosen by the sweep on the tune split (see docs/BENCHMARK.md, "How the settings were chosen") --
#: Optimizer of each mask kind in the mask-kind rows: a learning rate suits one parameterization only (a
#: raster's logits and an MLP's weights live on different scales). A kind equal to the default's adds nothing.
KIND_OPTIM: dict[str, tuple[str, ...]] = {
    "raster": ("optimization.optim.name=adam", "optimization.optim.lr=0.05"),
    "fourier": ("optimization.optim.name=adam", "optimization.optim.lr=0.003"),
    "raster_bilateral": ("optimization.optim.name=adam", "optimization.optim.lr=0.05"),
    "fourier_bilateral": ("optimization.optim.name=adam", "optimization.optim.lr=0.003"),
}
#: Settings of a mask kind's row that are fixed, not tuned. The Fourier MLP is 64 wide over 64 frequencies
#: instead of the paper's 256 over 128: at 256 the MLP alone costs ~3x the VAE and UNet per step on a CPU,
#: and a 64x64 mask needs far less capacity than the paper's 256x256 one.
_SMALL_FOURIER = ("optimization.mask.fourier.hidden=64", "optimization.mask.fourier.num_features=64")
KIND_EXTRA: dict[str, tuple[str, ...]] = {"fourier": _SMALL_FOURIER, "fourier_bilateral": _SMALL_FOURIER}
#: The cross-attention baseline's mask is ``map > threshold`` (the map is min-max normalized per pair).
#: Chosen on the first 48 ``tune`` pairs with the bundled model: mIoU 0.107 / 0.117 / 0.133 / 0.150 / 0.163 /
#: 0.164 / 0.141 / 0.070 at thresholds 0.2 .. 0.9 (``--split tune --methods cross_attention
#: --cross-attention-threshold T``).
CROSS_ATTENTION_THRESHOLD = 0.7

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


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        name: the ``--methods`` name.
        label: the row's label.
        kind: ``"peekaboo"``, ``"cross_attention"``, ``"random"`` or ``"whole_image"``.
        overrides: config overrides on top of the project's config (Peekaboo rows only).
        about: what the row measures (written to docs/BENCHMARK.md).
    """

    name: str
    label: str
    kind: str
    overrides: tuple[str, ...] = ()
    about: str = ""


def _kind_method(kind: str, optim: Sequence[str]) -> Method:
    label = kind.replace("_", " + ")
    overrides = (f"optimization.mask.kind={kind}", *KIND_EXTRA.get(kind, ()), *optim)
    return Method(kind, f"mask: {label}", "peekaboo", overrides,
                  f"The default with the `{kind}` mask parameterization and the optimizer chosen for it on the "
                  "tune split.")


def build_methods(kind_optim: dict[str, Sequence[str]] | None = None) -> tuple[Method, ...]:
    """The table's rows, in order; ``kind_optim`` replaces :data:`KIND_OPTIM` (e.g. a sweep's choice)."""
    kind_optim = {**KIND_OPTIM, **(kind_optim or {})}
    return (
        Method("peekaboo", "Peekaboo (default)", "peekaboo", (),
               "Peekaboo with the settings of `configs/model/shapes.yaml` (plus any `--set` of the command)."),
        Method("no_gravity", "no gravity", "peekaboo", ("optimization.loss.gravity=0",),
               "The default without the alpha regularizer: nothing pulls the mask towards empty, so keeping the "
               "whole image is as good an answer as keeping the object."),
        *(_kind_method(kind, kind_optim[kind]) for kind in MASK_KINDS),
        Method("guidance_7.5", "guidance 7.5", "peekaboo", ("optimization.guidance.guidance_scale=7.5",),
               "The default with the guidance scale of ordinary sampling."),
        Method("guidance_30", "guidance 30", "peekaboo", ("optimization.guidance.guidance_scale=30",),
               "The default with the guidance scale chosen on the tune split for the first-round bundled model "
               "(the shipped model's tune split chose 15)."),
        Method("guidance_100", "guidance 100", "peekaboo", ("optimization.guidance.guidance_scale=100",),
               "The default with the paper's guidance scale for Stable Diffusion."),
        Method("cross_attention", "cross-attention map", "cross_attention", (),
               "No optimization: the UNet's cross-attention to the prompt's content words on the VAE-encoded image "
               "noised at a few timesteps, averaged over heads, layers and timesteps, normalized to [0, 1] and "
               "thresholded (threshold chosen on the tune split)."),
        Method("random", "random disc", "random", (),
               "Chance level: a disc of a typical object's size at a random position (seeded by the pair id)."),
        Method("whole_image", "whole image", "whole_image", (),
               "Every pixel selected: the IoU is the object's share of the image."),
    )


METHODS = build_methods()
METHOD_NAMES = tuple(m.name for m in METHODS)


# -- pairs and scores -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchPair:
    """One evaluation pair with everything scoring needs.

    Attributes:
        image: the scene, ``(H, W, 3)`` uint8 RGB as a PIL image.
        target: ``(H, W)`` uint8 0/1 mask of the named object.
        others: ``(H, W)`` bool masks of the scene's other objects.
    """

    id: str
    prompt: str
    image: Any
    target: np.ndarray
    others: tuple[np.ndarray, ...]
    meta: dict = field(default_factory=dict)


def load_pairs(split: str, n: int) -> list[BenchPair]:
    """The first ``n`` pairs of ``split`` from :func:`synthetic_pairs`, with the other objects' masks.

    Raises:
        PeekabooError: an unknown split or ``n < 1``.
    """
    if split not in BENCH_SPLITS:
        raise PeekabooError(f"--split {split}: use one of {', '.join(BENCH_SPLITS)}.")
    pairs = synthetic_pairs(split, n)
    # synthetic_pairs lists eval_pairs in order; the scenes give the masks of the objects not named.
    scenes = eval_pairs(SPLIT_NAMES[split], n)
    out = []
    for pair, sp in zip(pairs, scenes, strict=True):
        if pair.id != sp.id:
            raise AssertionError(f"pair order differs: {pair.id} vs {sp.id}")
        others = tuple(o.mask for k, o in enumerate(sp.scene.objects) if k != sp.target)
        out.append(BenchPair(pair.id, pair.prompt, pair.load_image(), pair.load_target(), others, pair.meta or {}))
    return out


def wrong_object(pred: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> bool:
    """Whether the prediction covers some other object more than the named one.

    Args:
        pred: ``(H, W)`` bool predicted mask.
        target: ``(H, W)`` the named object (nonzero = object; 255, ignored, counts as not object).
        others: ``(H, W)`` bool masks of the scene's other objects.

    Returns:
        True when ``|pred & other_k| > |pred & target|`` for some ``k``. An empty prediction is never wrong
        (it chose nothing; its IoU of 0 already counts against it).
    """
    on_target = int(np.count_nonzero(pred & (target == 1)))
    return any(int(np.count_nonzero(pred & other)) > on_target for other in others)


def score(pred: np.ndarray, pair: BenchPair) -> dict[str, Any]:
    """The per-pair record fields of a predicted ``(H, W)`` bool mask: IoU terms, wrong object, area."""
    return {**pair_scores(pred, pair.target), "wrong_object": wrong_object(pred, pair.target, pair.others),
            "area": float(pred.mean())}


def summarize_method(records: Sequence[dict]) -> dict[str, Any]:
    """:func:`peekaboo.metrics.summarize` plus the wrong-object rate and the mean seconds per pair."""
    summary = summarize(records)
    scored = [r for r in records if r.get("status") == DONE]
    summary["wrong_object_rate"] = (sum(bool(r["wrong_object"]) for r in scored) / len(scored)) if scored else None
    summary["seconds_per_pair"] = (sum(float(r["seconds"]) for r in records) / len(records)) if records else None
    return summary


# -- configs --------------------------------------------------------------------------------------------------
def resolve_config_dir(config_dir: str | os.PathLike | None) -> Path:
    """The project's ``configs/`` folder (``--config-dir``, ``$PEEKABOO_CONFIG_DIR``, or ``./configs``).

    Raises:
        PeekabooError: none exists: the benchmark's defaults must come from the project's config.
    """
    if config_dir is not None:
        candidates = [Path(config_dir)]  # an explicit folder must be right: no silent fallback
    else:
        env = os.environ.get("PEEKABOO_CONFIG_DIR")
        candidates = [Path(env)] if env else [Path.cwd() / "configs"]
    for c in candidates:
        if (c / "model" / f"{MODEL_GROUP}.yaml").is_file():
            return c
    raise PeekabooError(f"{candidates[0]} has no model/{MODEL_GROUP}.yaml; run from the repository root or pass "
                        "--config-dir pointing at the project's configs/ folder.")


def method_config(overrides: Sequence[str], extra: Sequence[str], config_dir: Path, base: Sequence[str] = ()) -> Any:
    """The project's dataset-run config (``configs/train.yaml``) with ``model=shapes``, then ``base`` (tuned
    defaults every row starts from), then a row's ``overrides``, then ``extra`` (the command's ``--set``):
    later ones win."""
    argv = [f"model={MODEL_GROUP}", "data=shapes", _RUN_NAME, *base, *overrides, *extra]
    return load_config(TrainConfig, argv, config_dir, CONFIG_TASK)


def _settings_key(cfg: Any) -> str:
    """What decides a Peekaboo row's masks: two rows with the same key produce the same masks."""
    return json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True)
                       for k in ("model", "image_options", "optimization")} | {"steps": cfg.trainer.max_steps},
                      sort_keys=True)


# -- running methods ------------------------------------------------------------------------------------------
class AlphaSnapshots(Callback):
    """Keeps the soft masks ``(B, S, S)`` after each of ``steps`` optimizer steps: one long run then scores
    every shorter step count too (no schedule depends on the total, so step ``k`` of a long run is exactly
    the end of a run of ``k`` steps)."""

    def __init__(self, steps: Sequence[int]):
        self.steps = set(steps)
        self.alphas: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            with torch.no_grad():
                self.alphas[trainer.global_step] = pl_module().detach().float().cpu()[:, 0]


Progress = Callable[[int, int, float], None]


def run_peekaboo(
    cfg: Any,
    pairs: Sequence[BenchPair],
    backbone: Backbone,
    batch_size: int = DEFAULT_BATCH,
    snapshot_steps: Sequence[int] = (),
    progress: Progress | None = None,
) -> dict[int, list[dict]]:
    """Optimize every pair's mask with ``cfg`` in batches and score it.

    Args:
        cfg: a resolved config (optimization, trainer, image options).
        snapshot_steps: also score the masks after these step counts (each <= ``trainer.max_steps``).
        progress: called after each batch with (pairs done, pairs in all, seconds so far).

    Returns:
        ``{steps: records}`` for ``trainer.max_steps`` and each snapshot step; one record per pair.
    """
    opt, trainer = cfg.optimization, cfg.trainer
    steps_scored = sorted({*snapshot_steps, trainer.max_steps})
    out: dict[int, list[dict]] = {s: [] for s in steps_scored}
    start = time.perf_counter()
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first : first + batch_size]
        fitted = [io.fit_square(p.image, opt.mask.size, cfg.image_options.fit) for p in batch]
        snaps = AlphaSnapshots(steps_scored)
        t0 = time.perf_counter()
        try:
            results = optimize_pairs(torch.stack([f[0] for f in fitted]), [p.prompt for p in batch],
                                     [p.id for p in batch], opt, trainer, backbone, callbacks=[snaps],
                                     enable_progress_bar=False)
            failed = [r.failed for r in results]
        except NonFiniteError:
            failed = [True] * len(batch)
        per_pair = (time.perf_counter() - t0) / len(batch)
        for steps in steps_scored:
            alphas = snaps.alphas.get(steps)
            for i, (pair, (_, placement)) in enumerate(zip(batch, fitted, strict=True)):
                record: dict[str, Any] = {"id": pair.id, "prompt": pair.prompt, "steps": steps,
                                          "seconds": round(per_pair * steps / trainer.max_steps, 4)}
                if failed[i] or alphas is None:
                    record["status"] = "failed: non-finite"
                else:
                    alpha_u8 = io.quantize(io.unfit(alphas[i], placement))
                    record.update(status=DONE, **score(io.binarize(alpha_u8, opt.threshold), pair))
                out[steps].append(record)
        if progress is not None:
            progress(first + len(batch), len(pairs), time.perf_counter() - start)
    return out


def attention_maps(cfg: Any, pairs: Sequence[BenchPair], backbone: Backbone,
                   progress: Progress | None = None) -> list[tuple[torch.Tensor, float]]:
    """The cross-attention map of every pair at its original size, ``(H, W)`` in [0, 1], with the seconds
    it took."""
    out = []
    start = time.perf_counter()
    for n, pair in enumerate(pairs, 1):
        t0 = time.perf_counter()
        canvas, placement = io.fit_square(pair.image, cfg.optimization.mask.size, cfg.image_options.fit)
        gen = torch.Generator().manual_seed(ops.pair_seed(cfg.optimization.seed, pair.id))
        heat = cross_attention_map(backbone, canvas, pair.prompt, generator=gen)
        out.append((io.unfit(heat, placement), time.perf_counter() - t0))
        if progress is not None and (n % DEFAULT_BATCH == 0 or n == len(pairs)):
            progress(n, len(pairs), time.perf_counter() - start)
    return out


def score_attention(maps: Sequence[tuple[torch.Tensor, float]], pairs: Sequence[BenchPair],
                    threshold: float) -> list[dict]:
    """Records of the cross-attention baseline: ``map > threshold`` per pair."""
    return [{"id": p.id, "prompt": p.prompt, "status": DONE, "seconds": round(sec, 4),
             **score((heat > threshold).numpy(), p)} for (heat, sec), p in zip(maps, pairs, strict=True)]


def run_trivial(kind: str, pairs: Sequence[BenchPair], seed: int) -> list[dict]:
    """Records of the random-disc or whole-image baseline."""
    records = []
    for pair in pairs:
        t0 = time.perf_counter()
        h, w = pair.target.shape
        if kind == "random":
            pred = random_mask(h, w, torch.Generator().manual_seed(ops.pair_seed(seed, pair.id)))
        else:
            pred = whole_image(h, w)
        records.append({"id": pair.id, "prompt": pair.prompt, "status": DONE,
                        "seconds": round(time.perf_counter() - t0, 4), **score(pred, pair)})
    return records


def _progress(label: str) -> Progress:
    def report(done: int, total: int, seconds: float) -> None:
        eta = seconds / done * (total - done)
        log.info("  %s: %d/%d pairs, %.2f s/pair, %.0f s elapsed, ETA %.0f s", label, done, total,
                 seconds / done, seconds, eta)
    return report


def _warm_up(cfg: Any, pair: BenchPair, backbone: Backbone) -> None:
    """One short optimization, untimed, so the first row's seconds per pair leave out one-time costs (lazy
    initialization of kernels and of Lightning)."""
    canvas, _ = io.fit_square(pair.image, cfg.optimization.mask.size, cfg.image_options.fit)
    trainer = OmegaConf.merge(cfg.trainer, {"max_steps": WARM_UP_STEPS})
    optimize_pairs(canvas[None], [pair.prompt], [pair.id], cfg.optimization, trainer, backbone,
                   enable_progress_bar=False)


def run_benchmark(
    split: str = "eval",
    num_pairs: int = DEFAULT_PAIRS,
    methods: Sequence[str] = METHOD_NAMES,
    extra: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
    config_dir: str | os.PathLike | None = None,
    cross_attention_threshold: float = CROSS_ATTENTION_THRESHOLD,
    previous: dict[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    base_overrides: Sequence[str] = (),
    kind_optim: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Score ``methods`` on the first ``num_pairs`` pairs of ``split``.

    Args:
        methods: names from :data:`METHOD_NAMES`, in table order.
        extra: ``key=value`` overrides applied to every row's config after its own (e.g. another model).
        previous: an earlier (partial) result of the same split and pairs: its rows whose settings are
            unchanged are kept instead of recomputed (``--resume``).
        on_row: called with the result so far after each row (to save partial results).
        base_overrides: settings every row starts from, before its own overrides (``--tuned``: the sweep's
            choice for the default).
        kind_optim: the optimizer of each mask kind's row, instead of :data:`KIND_OPTIM`.

    Returns:
        ``{"split", "pairs", "methods": {name: {"label", "kind", "overrides", "about", "same_as",
        "summary", "records"}}, "table"}``.

    Raises:
        PeekabooError: an unknown method or split, bad overrides, or a missing model.
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise PeekabooError(f"--methods {' '.join(unknown) or '(none)'}: choose from {' '.join(METHOD_NAMES)}.")
    if batch_size < 1:
        raise PeekabooError(f"--batch-size {batch_size} must be >= 1.")
    cdir = resolve_config_dir(config_dir)
    pairs = load_pairs(split, num_pairs)
    base = method_config((), extra, cdir, base_overrides)
    chosen = [m for m in build_methods(kind_optim) if m.name in methods]
    # All configs first, so a bad override fails before hours of work.
    configs = {m.name: method_config(m.overrides, extra, cdir, base_overrides) for m in chosen}
    log.info("shapes benchmark: %d %s pairs, %d methods", len(pairs), split, len(chosen))
    if any(m.kind in ("peekaboo", "cross_attention") for m in chosen):
        _warm_up(base, pairs[0], shared_backbone(base.model))
    done_by_key: dict[str, str] = {}
    rows: dict[str, dict] = {}
    result = {"split": split, "pairs": len(pairs), "base_overrides": list(base_overrides),
              "extra_overrides": list(extra), "model": base.model.pretrained, "methods": rows}
    earlier = {}
    if previous is not None and previous.get("split") == split and previous.get("pairs") == len(pairs):
        earlier = {row["key"]: row for row in previous.get("methods", {}).values() if "key" in row}
    # The default and the baselines without optimization first: they are what a partial run should show.
    order = sorted(chosen, key=lambda m: 0 if m.name == "peekaboo" else 1 if m.kind != "peekaboo" else 2)
    for method in order:
        cfg = configs[method.name]
        same_as = None
        t0 = time.perf_counter()
        log.info("%s", method.label)
        key = _row_key(method, cfg, cross_attention_threshold)
        if key in earlier:
            rows[method.name] = {**earlier[key], "label": method.label, "about": method.about,
                                 "overrides": list(method.overrides)}
            if method.kind == "peekaboo":
                # Rows of equal settings share one key, so which row first claims the settings is decided
                # here again, in this run's order, not taken from whichever row the earlier run stored.
                owner = done_by_key.setdefault(_settings_key(cfg), method.name)
                rows[method.name]["same_as"] = owner if owner != method.name else None
            log.info("  kept from the earlier run (same settings)")
            continue
        if method.kind == "peekaboo":
            same_as = done_by_key.get(_settings_key(cfg))
            if same_as is not None:
                records = copy.deepcopy(rows[same_as]["records"])
                log.info("  same settings as %s: its masks are reused", same_as)
            else:
                backbone = shared_backbone(cfg.model)
                records = run_peekaboo(cfg, pairs, backbone, batch_size,
                                       progress=_progress(method.name))[cfg.trainer.max_steps]
                done_by_key[_settings_key(cfg)] = method.name
        elif method.kind == "cross_attention":
            maps = attention_maps(cfg, pairs, shared_backbone(cfg.model), _progress(method.name))
            records = score_attention(maps, pairs, cross_attention_threshold)
        else:
            records = run_trivial(method.kind, pairs, base.optimization.seed)
        summary = summarize_method(records)
        log.info("  mIoU %.3f, wrong object %.1f%%, %.0f s", summary["miou"] or 0.0,
                 100 * (summary["wrong_object_rate"] or 0.0), time.perf_counter() - t0)
        settings = (OmegaConf.to_container(cfg.optimization, resolve=True) | {"max_steps": cfg.trainer.max_steps}
                    if method.kind == "peekaboo" else
                    {"threshold": cross_attention_threshold} if method.kind == "cross_attention" else {})
        rows[method.name] = {"label": method.label, "kind": method.kind, "overrides": list(method.overrides),
                             "about": method.about, "same_as": same_as, "settings": settings, "key": key,
                             "summary": summary, "records": records}
        _publish(result, rows, chosen)
        if on_row is not None:
            on_row(result)
    _publish(result, rows, chosen)  # kept rows (--resume) land here too, wherever they fall in the order
    return result


def _publish(result: dict[str, Any], rows: dict[str, dict], chosen: Sequence[Method]) -> None:
    """Put the finished rows into ``result`` in table order, with their markdown table."""
    result["methods"] = {m.name: rows[m.name] for m in chosen if m.name in rows}
    result["table"] = markdown_table(result)


def _row_key(method: Method, cfg: Any, threshold: float) -> str:
    """Everything a row's numbers depend on, so ``--resume`` keeps a row only when nothing changed."""
    if method.kind == "peekaboo":
        return "peekaboo " + _settings_key(cfg)
    if method.kind == "cross_attention":
        return f"cross_attention {threshold} " + _settings_key(cfg)
    return f"{method.kind} seed={cfg.optimization.seed}"


# -- reporting ------------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one row per method."""
    head = ["Method", *(f"P@{t}" for t in TABLE_THRESHOLDS), "mIoU", "oIoU", "wrong obj.", "s/pair"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in result["methods"].values():
        s = row["summary"]
        prec = s.get("precision") or {}
        wrong = s.get("wrong_object_rate")
        cells = [row["label"], *(_fmt(prec.get(f"P@{t}"), 2) for t in TABLE_THRESHOLDS), _fmt(s["miou"]),
                 _fmt(s["overall_iou"]), "-" if wrong is None else f"{100 * wrong:.1f}%",
                 _fmt(s["seconds_per_pair"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (seconds per pair depend on it)."""
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def update_readme(path: Path, table: str) -> bool:
    """Replace the text between :data:`README_START` and :data:`README_END` in ``path`` with ``table``.

    Returns:
        False (with a warning, and nothing written) when the file or a marker is missing.
    """
    if not path.is_file():
        log.warning("%s does not exist; the table is in %s only.", path, DOCS)
        return False
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        log.warning("%s lacks the markers %s ... %s; the table is in %s only.", path, README_START, README_END,
                    DOCS)
        return False
    new = text[: start + len(README_START)] + "\n" + table + "\n" + text[end:]
    io.write_text(new, path)
    return True


def provenance_lines(report: dict[str, Any]) -> list[str]:
    """How and where a table was made: command, model, date, machine, raw results."""
    m = report["machine"]
    cpu = f"{m['processor']}, " if m.get("processor") else ""
    return [
        f"- Command: `{report['command']}`",
        f"- Model: `{report['model']}`",
        f"- Date: {report['date']}",
        f"- Machine: {cpu}{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}, Python {m['python']}" + (f", GPU {m['cuda']}" if m.get("cuda") else ""),
        f"- Raw per-pair results: `{report['out']}`",
    ]


def render_docs(report: dict[str, Any], sweep_report: dict[str, Any] | None = None) -> str:
    """docs/BENCHMARK.md: the table, how it was made, what each row means, and how the settings were chosen."""
    rows = report["methods"]
    lines = [
        "# Synthetic shapes benchmark",
        "",
        "Generated by `python -m peekaboo.bench.shapes` (do not edit by hand; rerun it).",
        "",
        *([f"**Partial results: {len(rows)} rows so far; the run is still going.**", ""] if report.get("partial")
          else []),
        f"{report['pairs']} pairs of the `{report['split']}` split: scenes of 2 or 3 coloured shapes (half of them "
        "with a hard distractor of the same colour or the same shape), one pair per object, prompt "
        "\"a <colour> <shape>\". Their seeds are disjoint from the bundled model's training scenes and from the "
        "`tune` split the settings were chosen on.",
        "",
        report["table"],
        "",
        *provenance_lines(report),
        "",
        "## Columns",
        "",
        "- **P@t**: fraction of pairs whose IoU with the ground truth is at least t (the paper's precision).",
        "- **mIoU**: mean of the per-pair IoU. **oIoU**: summed intersections over summed unions.",
        "- **wrong obj.**: fraction of pairs whose mask covers another object of the scene more than the named "
        "one (|pred ∩ other| > |pred ∩ target|); an empty mask is never counted as wrong.",
        "- **s/pair**: wall-clock seconds per pair on the machine above (batched pairs share the time equally).",
        "",
        "## Rows",
        "",
    ]
    for row in rows.values():
        extra = f" Same settings as `{row['same_as']}`, so its masks are reused." if row["same_as"] else ""
        over = f" Overrides: `{' '.join(row['overrides'])}`." if row["overrides"] else ""
        lines.append(f"- **{row['label']}**: {row['about']}{over}{extra}")
    if report.get("base_overrides"):
        lines += ["", "Every Peekaboo row starts from `configs/model/shapes.yaml` plus the tune sweep's choice for the "
                  f"default (`--tuned`): `{' '.join(report['base_overrides'])}`."]
    if report.get("extra_overrides"):
        lines += ["", f"Every Peekaboo row also has the command's `--set {' '.join(report['extra_overrides'])}`."]
    if sweep_report is not None:
        lines += ["", "## How the settings were chosen", "", sweep_report.get("markdown", ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(json.dumps(data, indent=1, default=str), path)


# -- the tuning sweep -----------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """Choose the settings on the ``tune`` split (never ``eval``) by a coordinate search.

    1. The default's knobs (:data:`SWEEP_STAGES`), one at a time in order, each value tried on top of the best
       so far (ties: lower wrong-object rate, then the current value). Every trial also scores its masks after
       each of ``steps`` (snapshots of the same run) and counts at its best step count: the fewest steps whose
       mIoU is within :data:`SWEEP_STEPS_TOLERANCE` of its best snapshot (time is per step).
    2. The step count: the winner's, chosen the same way.
    3. The learning rate of each other mask kind (:data:`SWEEP_KIND_LRS`, Adam) on top of the chosen default.
    4. The cross-attention threshold (:data:`SWEEP_THRESHOLDS`): maps computed once, thresholds compared.

    Args:
        cache_path: a JSON file of finished trials: a rerun after an interruption skips them.

    Returns:
        ``{"trials": [...], "default_overrides": [...], "kind_optim": {...}, "cross_attention_threshold",
        "markdown", ...}``; each trial holds its stage, overrides, step count and summary.
    """
    kind_lrs = SWEEP_KIND_LRS if kind_lrs is None else kind_lrs
    partner = SWEEP_KIND_PARTNER if partner is None else partner
    cdir = resolve_config_dir(config_dir)
    pairs = load_pairs("tune", num_pairs)
    base = method_config((), extra, cdir)
    backbone = shared_backbone(base.model)
    cache: dict[str, dict[str, dict]] = {}
    if cache_path is not None and cache_path.is_file():
        cache = json.loads(cache_path.read_text())
        log.info("sweep: %d finished trials read from %s", len(cache), cache_path)
    trials: list[dict[str, Any]] = []

    def config(overrides: dict[str, str]) -> Any:
        return method_config([f"{k}={v}" for k, v in overrides.items()], extra, cdir)

    def evaluate(stage: str, overrides: dict[str, str], value: str) -> dict[int, dict]:
        """Summaries by step count of one setting (snapshots at ``steps`` up to its max_steps); ``value`` is
        what the stage tries (for the report)."""
        cfg = config(overrides)
        snaps = [s for s in steps if s <= cfg.trainer.max_steps]
        key = _settings_key(cfg) + json.dumps({"snapshots": snaps, "pairs": len(pairs)})
        argv = [f"{k}={v}" for k, v in overrides.items()]
        if key not in cache:
            log.info("sweep %s: %s", stage, " ".join(argv) or "(project config)")
            t0 = time.perf_counter()
            runs = run_peekaboo(cfg, pairs, backbone, batch_size, snaps, _progress(stage))
            cache[key] = {str(s): summarize_method(r) for s, r in runs.items()}
            if cache_path is not None:
                _write_json(cache, cache_path)
            final = cache[key][str(cfg.trainer.max_steps)]
            log.info("  -> mIoU %.3f, wrong %.1f%% (%.0f s)", final["miou"] or 0.0,
                     100 * (final["wrong_object_rate"] or 0.0), time.perf_counter() - t0)
        result = {int(s): summ for s, summ in cache[key].items()}
        if not any(t["stage"] == stage and t["overrides"] == argv for t in trials):
            trials.append({"stage": stage, "value": value, "overrides": argv, "max_steps": cfg.trainer.max_steps,
                           "by_steps": dict(sorted(result.items()))})
        return result

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
        best_value, best = current, trial_score(evaluate(key, chosen, f"{current} (current)"))
        for value in values:
            if value == current or _same_number(value, current):
                continue
            score_ = trial_score(evaluate(key, {**chosen, key: value}, value))
            if score_ > best:
                best_value, best = value, score_
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

    # 3. Each other mask kind: its learning rate on top of the chosen default.
    kind_optim: dict[str, list[str]] = {}
    kind_scores: dict[str, float | None] = {}
    default_kind = default_cfg.optimization.mask.kind
    kind_optim[default_kind] = [f"optimization.optim.name={default_cfg.optimization.optim.name}",
                                f"optimization.optim.lr={default_cfg.optimization.optim.lr}"]
    kind_scores[default_kind] = default_summary["miou"]
    for kind, lrs in kind_lrs.items():
        if kind == default_kind:
            continue
        best_lr, best_kind = lrs[0], (-1.0, 0.0)
        for lr in lrs:
            fixed = dict(o.split("=", 1) for o in KIND_EXTRA.get(kind, ()))
            over = {**chosen, "optimization.mask.kind": kind, **fixed, "optimization.optim.name": "adam",
                    "optimization.optim.lr": lr}
            score_ = rank(evaluate(f"{kind} lr", over, lr)[best_steps])
            if score_ > best_kind:
                best_lr, best_kind = lr, score_
        kind_optim[kind] = ["optimization.optim.name=adam", f"optimization.optim.lr={best_lr}"]
        kind_scores[kind] = best_kind[0]
    for kind in MASK_KINDS:
        if kind not in kind_optim and partner.get(kind) in kind_optim:
            kind_optim[kind] = kind_optim[partner[kind]]
            kind_scores[kind] = None  # not measured on the tune split
    kind_optim = {k: kind_optim[k] for k in MASK_KINDS if k in kind_optim}

    # 4. The cross-attention threshold.
    log.info("sweep cross-attention threshold")
    maps = attention_maps(base, pairs, backbone, _progress("cross_attention"))
    ca = {t: summarize_method(score_attention(maps, pairs, t)) for t in thresholds}
    best_t = max(thresholds, key=lambda t: rank(ca[t]))
    trials.extend({"stage": "cross-attention threshold", "value": str(t), "overrides": [], "max_steps": None,
                   "by_steps": {0: ca[t]}} for t in thresholds)

    report = {
        "split": "tune", "pairs": len(pairs), "extra_overrides": list(extra),
        "default_overrides": [f"{k}={v}" for k, v in chosen.items()],
        "default_miou": default_summary["miou"], "default_wrong_object_rate": default_summary["wrong_object_rate"],
        "kind_optim": kind_optim, "kind_miou": kind_scores,
        "cross_attention_threshold": best_t, "cross_attention_miou": ca[best_t]["miou"],
        "trials": trials,
    }
    report["markdown"] = sweep_markdown(report)
    return report


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def sweep_markdown(report: dict[str, Any]) -> str:
    """The sweep's trials and choices as markdown (for docs/BENCHMARK.md)."""
    steps = sorted({int(s) for t in report["trials"] for s in t["by_steps"] if int(s) > 0})
    lines = [
        f"Coordinate search on the first {report['pairs']} pairs of the `tune` split (never `eval`), "
        "`python -m peekaboo.bench.shapes --split tune --sweep`: each knob of the default in turn, on top of the "
        "best so far, every trial scored at its own best step count (the fewest steps within "
        f"{SWEEP_STEPS_TOLERANCE} mIoU of its best snapshot; snapshots of the same run); then each other mask kind's "
        "Adam learning rate; then the cross-attention threshold. Chosen by mIoU (ties: lower wrong-object rate). "
        "With this many pairs, mIoU differences below about 0.05 are within noise.",
        "",
        "| stage | value | " + " | ".join(f"mIoU@{s}" for s in steps) + " | wrong obj. (last) |",
        "|---|---|" + "---:|" * (len(steps) + 1),
    ]
    for t in report["trials"]:
        by = {int(s): v for s, v in t["by_steps"].items()}
        last = by[max(by)]
        if t["max_steps"] is None:  # the cross-attention baseline has no steps
            cells = [_fmt(last["miou"])] + [""] * (len(steps) - 1)
        else:
            cells = [_fmt(by[s]["miou"]) if s in by else "" for s in steps]
        lines.append(f"| {t['stage']} | {t['value']} | " + " | ".join(cells) +
                     f" | {100 * (last['wrong_object_rate'] or 0):.1f}% |")
    lines += [
        "",
        f"- Default: `{' '.join(report['default_overrides']) or '(configs/model/shapes.yaml as is)'}` "
        f"on top of configs/model/shapes.yaml (tune mIoU {_fmt(report['default_miou'])}).",
        *(f"- `{kind}`: `{' '.join(o)}` (" + (f"tune mIoU {_fmt(report['kind_miou'][kind])}"
          if report["kind_miou"].get(kind) is not None else "its partner kind's rate, not searched") + ")."
          for kind, o in report["kind_optim"].items()),
        f"- Cross-attention threshold: {report['cross_attention_threshold']} "
        f"(tune mIoU {_fmt(report['cross_attention_miou'])}).",
    ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peekaboo.bench.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=BENCH_SPLITS, default="eval")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"how many pairs (default {DEFAULT_PAIRS}; {TUNE_PAIRS} with --sweep)")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), metavar="NAME",
                   help=f"rows to run, from: {' '.join(METHOD_NAMES)}")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results JSON (default benchmarks/results/shapes_<split>.json, {SWEEP_OUT} with --sweep)")
    p.add_argument("--readme", type=Path, default=None, help="also put the table between the bench markers here")
    p.add_argument("--docs", type=Path, default=None,
                   help=f"markdown report (default {DOCS} for the eval split; none for tune)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="pairs optimized together")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every Peekaboo row (repeatable), e.g. --set model.pretrained=PATH")
    p.add_argument("--config-dir", type=Path, default=None, help="the project's configs/ folder")
    p.add_argument("--cross-attention-threshold", type=float, default=None,
                   help=f"default {CROSS_ATTENTION_THRESHOLD} (or the --tuned sweep's choice)")
    p.add_argument("--tuned", type=Path, default=None, metavar="SWEEP_JSON",
                   help="start every row from a sweep's choices (its default overrides, each kind's optimizer, the "
                   f"cross-attention threshold), e.g. {SWEEP_OUT}")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier (interrupted) run in --out whose settings are unchanged")
    p.add_argument("--sweep", action="store_true", help="run the tuning sweep (tune split only)")
    p.add_argument("--sweep-cache", type=Path, default=SWEEP_CACHE,
                   help="finished sweep trials, reused when the sweep is rerun (delete it to start afresh)")
    return p


def _read_sweep(path: Path) -> dict[str, Any]:
    """A sweep report written by ``--sweep``.

    Raises:
        PeekabooError: the file is missing or is not a sweep report.
    """
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeekabooError(f"--tuned {path}: cannot read it ({err}); run the sweep first.") from None
    if not isinstance(report, dict) or "default_overrides" not in report or report.get("split") != "tune":
        raise PeekabooError(f"--tuned {path} is not a tune-split sweep report; pass {SWEEP_OUT}.")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from peekaboo.cli import setup_logging

    args = _parser().parse_args(argv)
    setup_logging()
    command = "python -m peekaboo.bench.shapes " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    started = dt.datetime.now(dt.UTC)
    try:
        if args.sweep:
            if args.split != "tune":
                raise PeekabooError("--sweep tunes on the tune split only; pass --split tune.")
            report = sweep(args.pairs or TUNE_PAIRS, args.batch_size, args.overrides, args.config_dir,
                           cache_path=args.sweep_cache)
            out = args.out or SWEEP_OUT
            report |= {"command": command, "date": started.isoformat(timespec="seconds"), "machine": machine_info(),
                       "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)}
            _write_json(report, out)
            print(report["markdown"])
            print(f"\nwrote {out}")
            return 0
        out = args.out or DEFAULT_OUT[args.split]
        previous = json.loads(out.read_text()) if args.resume and out.is_file() else None

        docs = args.docs or (DOCS if args.split == "eval" else None)

        def save(result: dict[str, Any], partial: bool = True) -> dict[str, Any]:
            report = {"benchmark": "shapes", "command": command, "date": started.isoformat(timespec="seconds"),
                      "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
                      "machine": machine_info(), "out": str(out), "partial": partial, **result}
            _write_json(report, out)
            if docs is not None:
                sweep_report = json.loads(SWEEP_OUT.read_text()) if SWEEP_OUT.is_file() else None
                docs.parent.mkdir(parents=True, exist_ok=True)
                io.write_text(render_docs(report, sweep_report), docs)
            return report

        tuned = _read_sweep(args.tuned) if args.tuned is not None else {}
        threshold = args.cross_attention_threshold
        if threshold is None:
            threshold = tuned.get("cross_attention_threshold", CROSS_ATTENTION_THRESHOLD)
        result = run_benchmark(args.split, args.pairs or DEFAULT_PAIRS, args.methods, args.overrides,
                               args.batch_size, args.config_dir, threshold, previous, save,
                               tuned.get("default_overrides", ()), tuned.get("kind_optim"))
    except PeekabooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = save(result, partial=False)
    print(result["table"])
    print(f"\nwrote {out}")
    if docs is not None:
        print(f"wrote {docs}")
    readme_text = "\n".join([result["table"], "", *provenance_lines(report)])
    if args.readme is not None and update_readme(args.readme, readme_text):
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
