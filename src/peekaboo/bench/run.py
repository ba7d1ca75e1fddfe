"""Running the benchmark's rows over the synthetic pairs (either scene set).

:func:`run_benchmark` scores every chosen row of :mod:`peekaboo.bench.methods` on the first pairs of a split of
:func:`peekaboo.data.synthetic.synthetic_pairs` (scenes whose seeds are disjoint from the bundled model's
training scenes) with :mod:`peekaboo.bench.scoring`: IoU terms, whether the mask took another object of the
scene, and seconds per pair.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from peekaboo import ops
from peekaboo.bench.baselines import attention_mask, random_mask, whole_image
from peekaboo.bench.methods import (
    CROSS_ATTENTION_THRESHOLD,
    METHOD_NAMES,
    METHODS,
    Method,
    build_methods,
    canonical_key,
    method_config,
    resolve_config_dir,
    row_max_steps,
    settings_key,
)
from peekaboo.bench.report import markdown_table
from peekaboo.bench.scoring import BenchPair, load_pairs, score, summarize_method
from peekaboo.diffusion.attention import cross_attention_map
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.errors import NonFiniteError, PeekabooError
from peekaboo.optim.engine import optimize_pairs
from peekaboo.optim.module import PeekabooModule
from peekaboo.runs.metrics import DONE
from peekaboo.utils import images

log = logging.getLogger("peekaboo.bench")

DEFAULT_PAIRS = 200
# Pairs optimized together (one VAE and one UNet call per step); each pair still gets the mask it gets alone.
DEFAULT_BATCH = 16
# Untimed optimization steps before the first row (see _warm_up).
WARM_UP_STEPS = 2
# Row kinds that run the model (the others are trivial masks).
MODEL_KINDS = ("peekaboo", "start_only", "cross_attention")


# -- running methods ------------------------------------------------------------------------------------------
class AlphaSnapshots(Callback):
    """Keeps the soft masks ``(B, S, S)`` after each of ``steps`` optimizer steps: one long run then scores
    every shorter step count too. Step ``k`` of a long run is exactly the end of a run of ``k`` steps only
    when nothing depends on the run's length (:func:`peekaboo.bench.steps.horizon_free`)."""

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
    done: dict[str, dict] | None = None,
    on_batch: Callable[[list[dict]], None] | None = None,
) -> dict[int, list[dict]]:
    """Optimize every pair's mask with ``cfg`` in batches and score it.

    Args:
        cfg: a resolved config (optimization, trainer, image options).
        snapshot_steps: also score the masks after these step counts (each <= ``trainer.max_steps``).
        progress: called after each batch with (pairs done, pairs in all, seconds so far).
        done: records by pair id from an interrupted run of the same settings: those pairs are kept, not
            optimized again (each pair's mask does not depend on its batch). Not with ``snapshot_steps``.
        on_batch: called after each batch with the records finished so far (``done``'s included), so that a
            long row can be saved as it goes.

    Returns:
        ``{steps: records}`` for ``trainer.max_steps`` and each snapshot step; one record per pair.
    """
    opt, trainer = cfg.optimization, cfg.trainer
    steps_scored = sorted({*snapshot_steps, trainer.max_steps})
    if opt.restarts.count > 1 and len(steps_scored) > 1:
        # A snapshot holds every candidate's mask; only the end of the run chooses among them.
        raise PeekabooError("Snapshots of shorter runs cannot score optimization.restarts.count > 1; score each "
                            "step count as a run of its own.")
    done = done or {}
    if done and len(steps_scored) > 1:
        raise PeekabooError("Records of an interrupted run hold only its last step count; no snapshots with them.")
    todo = [p for p in pairs if p.id not in done]
    out: dict[int, list[dict]] = {s: [] for s in steps_scored}
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        fitted = [images.fit_square(p.image, opt.mask.size, cfg.image_options.fit) for p in batch]
        snaps = AlphaSnapshots(steps_scored)
        t0 = time.perf_counter()
        try:
            results = optimize_pairs(torch.stack([f[0] for f in fitted]), [p.prompt for p in batch],
                                     [p.id for p in batch], opt, trainer, backbone, callbacks=[snaps],
                                     enable_progress_bar=False)
            failed = [r.failed for r in results]
            taken = [r.steps for r in results]
            # The run's end is each pair's result (with restarts, its kept candidate; else the last snapshot).
            snaps.alphas[trainer.max_steps] = torch.stack([r.alpha for r in results])
        except NonFiniteError:
            failed, taken = [True] * len(batch), [trainer.max_steps] * len(batch)
        per_pair = (time.perf_counter() - t0) / len(batch)
        for steps in steps_scored:
            alphas = snaps.alphas.get(steps)
            for i, (pair, (_, placement)) in enumerate(zip(batch, fitted, strict=True)):
                # steps_used: fewer than steps when early stopping froze the pair sooner (its mask then stays).
                record: dict[str, Any] = {"id": pair.id, "prompt": pair.prompt, "steps": steps,
                                          "steps_used": min(steps, taken[i]),
                                          "seconds": round(per_pair * steps / trainer.max_steps, 4)}
                if failed[i] or alphas is None:
                    record["status"] = "failed: non-finite"
                else:
                    final = images.finalize_mask(alphas[i], placement, opt.threshold)
                    record.update(status=DONE, **score(final.mask, pair))
                out[steps].append(record)
        if on_batch is not None:
            on_batch([*done.values(), *out[trainer.max_steps]])
        if progress is not None:
            progress(first + len(batch), len(todo), time.perf_counter() - start)
    if done:
        # In the pairs' order, as a run that was never interrupted returns them.
        mine = {r["id"]: r for r in out[trainer.max_steps]} | done
        out[trainer.max_steps] = [mine[p.id] for p in pairs]
    return out


def attention_maps(cfg: Any, pairs: Sequence[BenchPair], backbone: Backbone,
                   progress: Progress | None = None) -> list[tuple[torch.Tensor, float]]:
    """The cross-attention map of every pair at its original size, ``(H, W)`` in [0, 1], with the seconds
    it took."""
    out = []
    start = time.perf_counter()
    for n, pair in enumerate(pairs, 1):
        t0 = time.perf_counter()
        canvas, placement = images.fit_square(pair.image, cfg.optimization.mask.size, cfg.image_options.fit)
        gen = ops.pair_generator(cfg.optimization.seed, pair.id)
        heat = cross_attention_map(backbone, canvas, pair.prompt, generator=gen)
        out.append((images.unfit(heat, placement), time.perf_counter() - t0))
        if progress is not None and (n % DEFAULT_BATCH == 0 or n == len(pairs)):
            progress(n, len(pairs), time.perf_counter() - start)
    return out


def score_attention(maps: Sequence[tuple[torch.Tensor, float]], pairs: Sequence[BenchPair],
                    threshold: float) -> list[dict]:
    """Records of the cross-attention baseline: ``map > threshold`` per pair."""
    return [{"id": p.id, "prompt": p.prompt, "status": DONE, "seconds": round(sec, 4),
             **score(attention_mask(heat, threshold), p)} for (heat, sec), p in zip(maps, pairs, strict=True)]


def run_start_only(cfg: Any, pairs: Sequence[BenchPair], backbone: Backbone, batch_size: int = DEFAULT_BATCH,
                   progress: Progress | None = None) -> list[dict]:
    """Records of the no-optimization row: each pair's mask as a run of ``cfg`` starts it (``mask.init``
    through the mask's parameterization, the bilateral filter included), scored before any step."""
    opt = cfg.optimization
    records = []
    start = time.perf_counter()
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first : first + batch_size]
        t0 = time.perf_counter()
        fitted = [images.fit_square(p.image, opt.mask.size, cfg.image_options.fit) for p in batch]
        module = PeekabooModule(torch.stack([f[0] for f in fitted]), [p.prompt for p in batch],
                                [p.id for p in batch], opt, backbone)
        with torch.no_grad():
            module.on_fit_start()  # the starts: cross-attention maps, ranked regions
            alphas = module.mask()[:, 0]  # (B, S, S)
        per_pair = (time.perf_counter() - t0) / len(batch)
        for alpha, pair, (_, placement) in zip(alphas, batch, fitted, strict=True):
            final = images.finalize_mask(alpha, placement, opt.threshold)
            records.append({"id": pair.id, "prompt": pair.prompt, "status": DONE, "seconds": round(per_pair, 4),
                            **score(final.mask, pair)})
        if progress is not None:
            progress(first + len(batch), len(pairs), time.perf_counter() - start)
    return records


def run_trivial(kind: str, pairs: Sequence[BenchPair], seed: int) -> list[dict]:
    """Records of the random-disc or whole-image baseline."""
    records = []
    for pair in pairs:
        t0 = time.perf_counter()
        h, w = pair.target.shape
        pred = random_mask(h, w, ops.pair_generator(seed, pair.id)) if kind == "random" else whole_image(h, w)
        records.append({"id": pair.id, "prompt": pair.prompt, "status": DONE,
                        "seconds": round(time.perf_counter() - t0, 4), **score(pred, pair)})
    return records


def progress_logger(label: str) -> Progress:
    """A :data:`Progress` callback that logs pairs done, seconds per pair and the time left."""

    def report(done: int, total: int, seconds: float) -> None:
        eta = seconds / done * (total - done)
        log.info("  %s: %d/%d pairs, %.2f s/pair, %.0f s elapsed, ETA %.0f s", label, done, total,
                 seconds / done, seconds, eta)
    return report


def _warm_up(cfg: Any, pair: BenchPair, backbone: Backbone) -> None:
    """One short optimization, untimed, so the first row's seconds per pair leave out one-time costs (lazy
    initialization of kernels and of Lightning)."""
    canvas, _ = images.fit_square(pair.image, cfg.optimization.mask.size, cfg.image_options.fit)
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
    scenes: str = "shapes",
    step_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Score ``methods`` on the first ``num_pairs`` pairs of ``split`` of the ``scenes`` set, each Peekaboo row
    starting from that set's model preset (:data:`~peekaboo.bench.methods.SCENE_PRESETS`).

    Args:
        methods: names from :data:`METHOD_NAMES`, in table order.
        extra: ``key=value`` overrides applied to every row's config after its own (e.g. another model).
        previous: an earlier (partial) result of the same split and pairs: its rows whose settings are
            unchanged are kept instead of recomputed (``--resume``), and so are the finished pairs of the Peekaboo
            rows it was interrupted in (its ``"rows_in_progress"``, by row key).
        on_row: called with the result so far after each row and each batch of a Peekaboo row (to save partial
            results; a row being computed is in the result's ``"rows_in_progress"`` until it finishes).
        base_overrides: settings every row starts from, before its own overrides (``--tuned``: the sweep's
            choice for the default).
        kind_optim: the optimizer of each mask kind's row, instead of :data:`KIND_OPTIM`.
        step_counts: a tune sweep's step counts by mask kind and start: each Peekaboo row runs at the count of
            its kind and start (:func:`~peekaboo.bench.methods.row_max_steps`) instead of its config's.

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
    pairs = load_pairs(split, num_pairs, scenes)
    base = method_config((), extra, cdir, base_overrides, scenes)
    chosen = [m for m in build_methods(kind_optim) if m.name in methods]
    # All configs first, so a bad override fails before hours of work.
    configs = {m.name: method_config(m.overrides, extra, cdir, base_overrides, scenes) for m in chosen}
    if step_counts:
        for m in chosen:
            # A row that fixes its own count (the paper's settings) keeps it.
            own = any(o.startswith("trainer.max_steps=") for o in m.overrides)
            n = row_max_steps(configs[m.name], base, step_counts) if m.kind == "peekaboo" and not own else None
            if n is not None and n != configs[m.name].trainer.max_steps:
                configs[m.name] = method_config((*m.overrides, f"trainer.max_steps={n}"), extra, cdir,
                                                base_overrides, scenes)
    log.info("%s benchmark: %d %s pairs, %d methods", scenes, len(pairs), split, len(chosen))
    done_by_key: dict[str, str] = {}
    rows: dict[str, dict] = {}
    result = {"scenes": scenes, "split": split, "pairs": len(pairs), "base_overrides": list(base_overrides),
              "extra_overrides": list(extra), "model": base.model.pretrained, "methods": rows}
    earlier = {}
    # Results stored before the objects scenes existed are the shapes benchmark's.
    same_pairs = previous is not None and previous.get("scenes", "shapes") == scenes
    if same_pairs and previous.get("split") == split and previous.get("pairs") == len(pairs):
        # Canonical keys, so a row stored before a setting was added still counts as the same settings.
        earlier = {canonical_key(row["key"]): row for row in previous.get("methods", {}).values() if "key" in row}
    # Finished pairs of rows interrupted part-way, by canonical row key; kept in every save until their row
    # finishes, even when other rows are computed first.
    in_progress: dict[str, list[dict]] = {
        canonical_key(k): records for k, records in (previous or {}).get("rows_in_progress", {}).items()
    } if same_pairs else {}
    pair_ids = {p.id for p in pairs}
    # The default and the baselines without optimization first: they are what a partial run should show.
    order = sorted(chosen, key=lambda m: 0 if m.name == "peekaboo" else 1 if m.kind != "peekaboo" else 2)
    keys = {m.name: _row_key(m, configs[m.name], cross_attention_threshold) for m in order}
    # Kept rows first, all of them, so the partial results saved after each computed row hold every row of the
    # earlier run still wanted: an interrupted resume loses nothing already finished.
    for method in order:
        kept = earlier.get(canonical_key(keys[method.name]))
        if kept is None:
            continue
        rows[method.name] = {**kept, "key": keys[method.name], "label": method.label, "about": method.about,
                             "overrides": list(method.overrides), "summary": summarize_method(kept["records"])}
        if method.kind == "peekaboo":
            # Rows of equal settings share one key, so which row first claims the settings is decided here
            # again, in this run's order, not taken from whichever row the earlier run stored.
            owner = done_by_key.setdefault(settings_key(configs[method.name]), method.name)
            rows[method.name]["same_as"] = owner if owner != method.name else None
        log.info("%s: kept from the earlier run (same settings)", method.label)
    # Only when a row left to compute runs the model: a resume that keeps every row loads nothing.
    if any(m.name not in rows and m.kind in MODEL_KINDS for m in order):
        _warm_up(base, pairs[0], shared_backbone(base.model))
    for method in order:
        if method.name in rows:
            continue
        cfg = configs[method.name]
        key = keys[method.name]
        same_as = None
        t0 = time.perf_counter()
        log.info("%s", method.label)
        if method.kind == "peekaboo":
            same_as = done_by_key.get(settings_key(cfg))
            if same_as is not None:
                records = copy.deepcopy(rows[same_as]["records"])
                log.info("  same settings as %s: its masks are reused", same_as)
            else:
                backbone = shared_backbone(cfg.model)
                # A row interrupted part-way keeps its finished pairs (a row of 200 pairs takes hours on a CPU).
                ckey = canonical_key(key)
                finished = {r["id"]: r for r in in_progress.get(ckey, []) if r["id"] in pair_ids}
                if finished:
                    log.info("  %d pairs kept from the interrupted run", len(finished))

                def save_partial(records: list[dict], ckey: str = ckey) -> None:
                    in_progress[ckey] = records
                    _publish(result, rows, chosen, in_progress)
                    if on_row is not None:
                        on_row(result)

                records = run_peekaboo(cfg, pairs, backbone, batch_size, progress=progress_logger(method.name),
                                       done=finished, on_batch=save_partial)[cfg.trainer.max_steps]
                in_progress.pop(ckey, None)
                done_by_key[settings_key(cfg)] = method.name
        elif method.kind == "start_only":
            records = run_start_only(cfg, pairs, shared_backbone(cfg.model), batch_size,
                                     progress_logger(method.name))
        elif method.kind == "cross_attention":
            maps = attention_maps(cfg, pairs, shared_backbone(cfg.model), progress_logger(method.name))
            records = score_attention(maps, pairs, cross_attention_threshold)
        else:
            records = run_trivial(method.kind, pairs, base.optimization.seed)
        summary = summarize_method(records)
        log.info("  mIoU %.3f, wrong object %.1f%%, %.0f s", summary["miou"] or 0.0,
                 100 * (summary["wrong_object_rate"] or 0.0), time.perf_counter() - t0)
        settings = _row_settings(method, cfg, cross_attention_threshold)
        rows[method.name] = {"label": method.label, "kind": method.kind, "overrides": list(method.overrides),
                             "about": method.about, "same_as": same_as, "settings": settings, "key": key,
                             "summary": summary, "records": records}
        _publish(result, rows, chosen, in_progress)
        if on_row is not None:
            on_row(result)
    _publish(result, rows, chosen, in_progress)  # also when every row was kept
    return result


def _publish(result: dict[str, Any], rows: dict[str, dict], chosen: Sequence[Method],
             in_progress: dict[str, list[dict]]) -> None:
    """Put the finished rows into ``result`` in table order, with their markdown table, the finished pairs of
    rows under way and the chosen rows not finished yet (none: no entry)."""
    result["methods"] = {m.name: rows[m.name] for m in chosen if m.name in rows}
    result["table"] = markdown_table(result)
    _set_or_drop(result, rows_in_progress=dict(in_progress),
                 rows_pending=[m.name for m in chosen if m.name not in rows])


def _set_or_drop(result: dict[str, Any], **fields: Any) -> None:
    """Set each of ``fields`` in ``result``, or drop it where its value is empty (a finished run has no entry)."""
    for field, value in fields.items():
        if value:
            result[field] = value
        else:
            result.pop(field, None)


#: What two results files must share for one's rows to join the other's table (:func:`merge_saved`).
MERGE_FIELDS = ("scenes", "split", "pairs", "model", "base_overrides", "extra_overrides")


def merge_saved(result: dict[str, Any], saved: dict[str, Any] | None) -> dict[str, Any]:
    """``result`` joined with what other processes saved to the same results file (``saved``, as read from it),
    so that processes given disjoint ``--methods`` fill one table.

    - Rows: ``saved``'s finished rows join, except those ``result`` has or still has to compute (its
      ``"rows_pending"``: a saved row of the same name may be of older settings), each summarized from its
      records as the code summarizes now, with its method's current label and description where its settings are
      still the method's (:func:`_refreshed`).
    - Rows under way (``"rows_in_progress"``, finished pairs by row key): the union by pair id of both files'
      pairs (this process's copy of another's row may be older than the file's), dropped once the row is finished.
    - Rows pending: both files' (a process that stopped left its rows to do), less the finished ones; the merged
      table is partial while any remain.
    - Commands (``"commands"``): every command that wrote to either file, once each.

    ``saved`` of another setup (:data:`MERGE_FIELDS`) adds nothing. Rows come in table order; the table is rebuilt.
    """
    if saved is None or any(saved.get(k, "shapes" if k == "scenes" else None) != result.get(k)
                            for k in MERGE_FIELDS):
        return result
    mine_pending = set(result.get("rows_pending", ()))
    rows = ({n: _refreshed(n, r) for n, r in saved.get("methods", {}).items() if n not in mine_pending}
            | result["methods"])
    finished = {canonical_key(row["key"]) for row in rows.values() if "key" in row}
    in_progress: dict[str, list[dict]] = {}
    for source in (saved.get("rows_in_progress", {}), result.get("rows_in_progress", {})):
        for key, records in source.items():
            ckey = canonical_key(key)
            if ckey not in finished:
                by_id = {r["id"]: r for r in in_progress.get(ckey, [])} | {r["id"]: r for r in records}
                in_progress[ckey] = list(by_id.values())
    pending = sorted({*saved.get("rows_pending", ()), *mine_pending} - set(rows), key=_table_position)
    merged = {**result, "methods": {n: rows[n] for n in sorted(rows, key=_table_position)}}
    merged["table"] = markdown_table(merged)
    # Every command that wrote to the table, for its provenance (each process's own "command" is its last saver's).
    merged["commands"] = list(dict.fromkeys([*_commands(saved), *_commands(result)]))
    _set_or_drop(merged, rows_in_progress=in_progress, rows_pending=pending)
    return merged


def _refreshed(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """A saved row as the code would write it now, with nothing recomputed: its summary made again from its
    per-pair records, and its method's label and description where the row's overrides are still the method's
    (the text describes the setting, not the measurement). A row of other settings, or of a method no longer
    known, keeps its text."""
    row = {**row, "summary": summarize_method(row["records"])} if "records" in row else row
    method = next((m for m in METHODS if m.name == name), None)
    if method is None or list(row.get("overrides", ())) != list(method.overrides):
        return row
    return {**row, "label": method.label, "about": method.about}


def _commands(report: dict[str, Any]) -> list[str]:
    """The commands that wrote a results report: its ``"commands"`` where merged, else its own ``"command"``."""
    return list(report.get("commands") or ([report["command"]] if report.get("command") else []))


def _table_position(name: str) -> int:
    """A row's place in the table (:data:`METHOD_NAMES`' order; unknown names, from an older version, last)."""
    return METHOD_NAMES.index(name) if name in METHOD_NAMES else len(METHOD_NAMES)


def _row_settings(method: Method, cfg: Any, threshold: float) -> dict[str, Any]:
    """The settings a row's masks came from, stored with the row for readers of the results JSON."""
    if method.kind in ("peekaboo", "start_only"):
        steps = cfg.trainer.max_steps if method.kind == "peekaboo" else 0  # a start-only row takes no step
        return OmegaConf.to_container(cfg.optimization, resolve=True) | {"max_steps": steps}
    if method.kind == "cross_attention":
        return {"threshold": threshold}
    return {}


def _row_key(method: Method, cfg: Any, threshold: float) -> str:
    """Everything a row's numbers depend on, so ``--resume`` keeps a row only when nothing changed."""
    if method.kind == "peekaboo":
        return "peekaboo " + settings_key(cfg)
    if method.kind == "cross_attention":
        return f"cross_attention {threshold} " + settings_key(cfg)
    if method.kind == "start_only":
        return "start_only " + settings_key(cfg)
    return f"{method.kind} seed={cfg.optimization.seed}"


