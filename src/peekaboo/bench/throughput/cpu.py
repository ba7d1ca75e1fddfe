"""The throughput benchmark's CPU sections: pairs per step through the Trainer, the Trainer's overhead over a bare
loop, the paper-style loop against the project's default path, and end to end at the paper's quality."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from peekaboo.bench.common import SECONDS_PER_HOUR, fmt, ms, synchronize
from peekaboo.bench.common import markdown_table as table
from peekaboo.bench.methods import PAPER_SETTINGS, PAPER_STEPS
from peekaboo.bench.reference_loop import REFERENCE_KINDS, ReferenceLoop
from peekaboo.bench.steps import FAST, PAPER
from peekaboo.bench.throughput.harness import (
    REFERENCE_SETTINGS,
    SPLIT,
    Bench,
    Item,
    Report,
    binary_mask,
    ious,
    load_items,
    wall_s,
)
from peekaboo.diffusion.backbone import Backbone
from peekaboo.optim.masks import build_mask

BATCH_SIZES = (1, 4, 16)
OVERHEAD_ROUNDS = 4  # Trainer and bare loop alternate this many times, so drifting load hits both alike
REFERENCE_ROUNDS = 2  # alternating rounds of the speed comparison, as for the overhead
QUALITY_KIND = "raster_bilateral"  # the bilateral kind the shapes preset's optimizer settings suit
QUALITY_PAIRS = 16  # one batch of the preset's data.pairs_per_step
MASK_REPEATS = 20  # mask render + backward repetitions of the filter-only comparison
END_TO_END_SPLIT = "eval"  # held-out pairs: the fast settings were chosen on the tune split
END_TO_END_PAIRS = 16
#: The paper-style loop's seeds in the end-to-end section: its spread over them is what "equal quality" allows.
REFERENCE_SEEDS = (0, 1)
#: The fewer-steps settings each scene set's `tune` split chose (:data:`peekaboo.bench.steps.FAST`); the end-to-end
#: section times the scene set's beside the default.
FAST_SETTINGS = FAST
STEPS_DOCS = {"shapes": "docs/STEPS.md", "objects": "docs/STEPS_OBJECTS.md"}  # mIoU against steps, by scene set
OVERHEAD_GOAL_PCT = 10.0  # the goals, quoted in the report
SPEEDUP_GOAL = 3.0
BATCH_GOAL = 2.0  # B=16 vs B=1 pairs per hour
PERCENT = 100.0


def section_batch(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """B = 1, 4, 16 through the Trainer, at the benchmark's thread count and on every core (a batch has B times
    more work per operator to split between threads, so whether batching pays depends on the thread count)."""
    cfg = bench.config()
    backbone = bench.backbone(cfg)
    max_steps = cfg.trainer.max_steps
    rows = []
    main_threads = torch.get_num_threads()
    for threads in dict.fromkeys((main_threads, os.cpu_count() or 1)):
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
    """Bare PyTorch loop vs the Trainer (without and with TensorBoard logging), B = 1, alternating rounds."""
    cfg = bench.config()
    backbone = bench.backbone(cfg)
    steps: dict[str, list[float]] = {"bare": [], "trainer": [], "logged": []}
    fixed: dict[str, list[float]] = {k: [] for k in steps}
    with tempfile.TemporaryDirectory() as tb_dir:
        for r in range(OVERHEAD_ROUNDS):
            runs = {"trainer": bench.trainer_run(f"trainer#{r}", cfg, items[:1], backbone)[0],
                    "bare": bench.bare_run(f"bare#{r}", cfg, items[:1], backbone),
                    "logged": bench.trainer_run(f"trainer+tb#{r}", cfg, items[:1], backbone, tb_dir=tb_dir)[0]}
            for key, t in runs.items():
                steps[key] += t.steps[t.warmup :]
                fixed[key].append(t.fixed_s)
    med = {k: statistics.median(v) for k, v in steps.items()}
    pct = {k: (med[k] - med["bare"]) / med[k] * PERCENT for k in ("trainer", "logged")}
    report.summary["trainer_overhead_pct"] = pct["trainer"]
    report.summary["trainer_tensorboard_overhead_pct"] = pct["logged"]
    labels = {"bare": "bare PyTorch loop", "trainer": "Lightning Trainer (`optimize_pairs`)",
              "logged": f"the same, logging to TensorBoard (every {cfg.trainer.log_every_n_steps} steps, mask "
                        "images 4 times)"}
    rows = [[labels[k], ms(med[k]), fmt(statistics.median(fixed[k]), 2), f"{pct[k]:+.1f}%" if k in pct else "-"]
            for k in labels]
    verdict = "met" if pct["trainer"] <= OVERHEAD_GOAL_PCT else "NOT met"
    body = (f"B=1, same module, same config; {OVERHEAD_ROUNDS} alternating rounds of {bench.warmup}+{bench.steps} "
            "steps each, medians over the pooled timed steps. The bare loop subclasses `PeekabooModule` only to "
            "advance the step counter its generators read; `training_step`, `backward`, `step`, `zero_grad`. "
            "Neither logs: the module builds its curves only on the steps a logger writes. Overhead = (Trainer - "
            f"bare) / Trainer step time: **{pct['trainer']:+.1f}%** (goal <= {OVERHEAD_GOAL_PCT:.0f}%: {verdict}). "
            "The third row adds what a dataset run also does, TensorBoard logging, for its cost.\n\n")
    report.add("Trainer overhead vs a bare PyTorch loop", body + table(
        ["loop", "ms/step", "fixed s/run", "overhead"], rows))


def mask_render_ms(make: Callable[[], torch.nn.Module], device: torch.device, renders: int) -> float:
    """Median milliseconds of ``renders`` mask renders plus one backward through them (the filter's cost)."""
    mask = make().to(device)
    times = []
    for _ in range(MASK_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        sum(mask().sum() for _ in range(renders)).backward()
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
    """The paper-style loop vs the project's default path, speed per kind, then quality.

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
            reference, _ = bench.reference_run(f"reference {kind}", cfg, item, backbone)
            steps["reference"] += reference.steps[reference.warmup :]
        median = {k: statistics.median(v) if v else float("nan") for k, v in steps.items()}
        reference_s = median["reference"]
        speedup, speedup_b1 = reference_s / median["default"], reference_s / median["b1"]
        ref_mask, proj_mask = mask_costs(cfg, backbone, item, bench.device)
        # Amdahl's bound at B=1: the speedup the project would reach if its mask cost nothing at all.
        bound = reference_s / max(median["b1"] - proj_mask / 1000.0, 1e-9)
        report.summary |= {f"speedup_{kind}": speedup, f"speedup_b1_{kind}": speedup_b1,
                           f"reference_step_s_{kind}": reference_s, f"speedup_bound_{kind}": bound}
        rows.append([f"`{kind}`", ms(reference_s), ms(median["default"]), f"**{speedup:.2f}x**", ms(median["b1"]),
                     f"{speedup_b1:.2f}x", fmt(ref_mask, 1), fmt(proj_mask, 1), f"{bound:.2f}x", "; ".join(notes)])
    report.summary["default_pairs_per_step"] = default_b
    body = (f"fp32, same model, same settings (preset `{bench.preset}` with the mask kind switched and "
            f"`{' '.join(REFERENCE_SETTINGS)}`, the reference loop's start and estimator); "
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
    """Both loops on the first :data:`QUALITY_PAIRS` tune pairs at ``max_steps``: the project's pairs as one batch
    (each pair's mask is independent of its batch), the reference's one at a time."""
    cfg = bench.reference_config(QUALITY_KIND)
    backbone = bench.backbone(cfg)
    chosen = items[:QUALITY_PAIRS]
    steps, threshold = cfg.trainer.max_steps, cfg.optimization.threshold
    timing, results = bench.trainer_run("project quality", cfg, chosen, backbone, warmup=0, steps=steps)
    refs = [bench.reference_run("reference quality", cfg, item, backbone, warmup=0, steps=steps) for item in chosen]
    ref_seconds, proj_seconds = sum(wall_s(t) for t, _ in refs), wall_s(timing)
    ref_ious = ious([a for _, a in refs], chosen, threshold)
    proj_ious = ious([r.alpha for r in results], chosen, threshold)
    agree = [iou(binary_mask(r.alpha, it, threshold), binary_mask(a, it, threshold))
             for r, (_, a), it in zip(results, refs, chosen, strict=True)]
    rows = [[it.id, it.prompt, fmt(r), fmt(p), fmt(a)]
            for it, r, p, a in zip(chosen, ref_ious, proj_ious, agree, strict=True)]
    ref_miou, proj_miou, agreement = (float(np.mean(x)) for x in (ref_ious, proj_ious, agree))
    rows.append(["**mean**", "", f"**{fmt(ref_miou)}**", f"**{fmt(proj_miou)}**", fmt(agreement)])
    report.summary["quality"] = {"kind": QUALITY_KIND, "pairs": len(chosen), "reference_miou": ref_miou,
                                 "project_miou": proj_miou, "agreement_iou": agreement,
                                 "end_to_end_speedup": ref_seconds / proj_seconds}
    return (f"Quality, `{QUALITY_KIND}`, {len(chosen)} synthetic `{SPLIT}` pairs, {steps} steps each, threshold "
            f"{threshold}: IoU against the ground truth, and the IoU between the two loops' masks. The project ran "
            f"the {len(chosen)} pairs as one batch ({proj_seconds:.0f} s in all); the reference one pair at a time "
            f"({ref_seconds:.0f} s in all): **{ref_seconds / proj_seconds:.1f}x** end to end. Both loops draw their "
            "own random numbers, so masks differ pixel-wise even where both are right.\n\n"
            + table(["pair", "prompt", "reference IoU", "project IoU", "reference vs project IoU"], rows))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def section_end_to_end(bench: Bench, report: Report, items: Sequence[Item]) -> None:
    """Pairs per hour and mIoU of the paper-style loop with the paper's settings against the project's default
    (and fast settings, where :data:`FAST_SETTINGS` has the scene set's), on :data:`END_TO_END_PAIRS` held-out pairs,
    each path as a user runs it. The paper-style loop runs once per seed of :data:`REFERENCE_SEEDS`: a project row
    is at the paper's quality when its mIoU reaches the lower of the two (equal within the loop's own spread)."""
    paper_cfgs = [bench.config(*PAPER_SETTINGS, f"optimization.seed={seed}")
                  for seed in REFERENCE_SEEDS]
    chosen = load_items(END_TO_END_PAIRS, paper_cfgs[0].optimization.mask.size, paper_cfgs[0].image_options.fit,
                        END_TO_END_SPLIT, bench.scenes)
    backbone = bench.backbone(paper_cfgs[0])
    threshold = paper_cfgs[0].optimization.threshold

    def row(label: str, about: str, alphas: Sequence[torch.Tensor], steps: Sequence[int], wall: float) -> dict:
        return {"label": label, "about": about, "miou": float(np.mean(ious(alphas, chosen, threshold))),
                "mean_steps": float(np.mean(steps)), "wall_s": wall,
                "pairs_per_hour": SECONDS_PER_HOUR * len(chosen) / wall}

    paper = " ".join(PAPER.overrides)
    references = []
    for seed, paper_cfg in zip(REFERENCE_SEEDS, paper_cfgs, strict=True):
        refs = [bench.reference_run("end to end, reference", paper_cfg, item, backbone, warmup=0, steps=PAPER_STEPS)
                for item in chosen]  # the paper's loop: one pair at a time
        references.append(row(f"paper-style loop, paper settings, seed {seed}",
                              f"`peekaboo.bench.reference_loop`, one pair at a time, {PAPER_STEPS} steps, `{paper}`",
                              [a for _, a in refs], [PAPER_STEPS] * len(chosen), sum(wall_s(t) for t, _ in refs)))
    project = [("project, paper settings", f"{PAPER_STEPS} steps, `{paper}`",
                list(PAPER_SETTINGS)),
               ("project default", "the preset", [])]
    if (fast := FAST_SETTINGS.get(bench.scenes)) is not None:
        project.append(("project fast", f"`{' '.join(fast.overrides)}` (chosen on the tune split)",
                        list(fast.overrides)))
    rows = list(references)
    for label, about, overrides in project:
        cfg = bench.config(*overrides)
        per_module = cfg.data.pairs_per_step
        wall, alphas, steps = 0.0, [], []
        for first in range(0, len(chosen), per_module):  # a dataset run's batches
            batch = chosen[first : first + per_module]
            timing, results = bench.trainer_run(label, cfg, batch, backbone, warmup=0, steps=cfg.trainer.max_steps)
            wall += wall_s(timing)
            alphas += [r.alpha for r in results]
            steps += [r.steps for r in results]
        rows.append(row(label, about, alphas, steps, wall))
    # The paper-style loop's pairs per hour: all its seeds' pairs over all their time; its quality bar: the lower
    # seed's mIoU (a row within the loop's own spread over seeds is at its quality).
    base_pph = SECONDS_PER_HOUR * len(chosen) * len(references) / sum(r["wall_s"] for r in references)
    bar = min(r["miou"] for r in references)
    for r in rows:
        r["vs_paper"] = r["pairs_per_hour"] / base_pph
        r["paper_quality"] = r["miou"] >= bar
    report.summary["end_to_end"] = {"split": END_TO_END_SPLIT, "pairs": len(chosen), "rows": rows,
                                    "reference_seeds": len(references), "reference_pairs_per_hour": base_pph,
                                    "quality_bar": bar}
    body = (f"{len(chosen)} synthetic {bench.scenes} `{END_TO_END_SPLIT}` pairs (held out: settings are chosen on "
            f"`tune`), fp32, {torch.get_num_threads()} torch thread(s). Each path runs as a user runs it: the "
            "paper-style loop one pair at a time, the project in a dataset run's batches of `data.pairs_per_step` "
            "pairs through the Trainer; wall time includes every fixed cost. The paper-style loop runs with "
            f"{len(references)} seeds: \"vs paper-style\" compares with its pairs per hour over both "
            f"({base_pph:,.0f}), and a row is at the paper's quality when its mIoU (threshold {threshold}) reaches "
            f"the lower seed's ({bar:.3f}), that is, within the loop's own spread over seeds; "
            f"{STEPS_DOCS[bench.scenes]} has mIoU against steps.\n\n")
    body += table(["path", "settings", "mean steps", "s/pair", "pairs/hour", "vs paper-style", "mIoU",
                   "at the paper's quality"],
                  [[r["label"], r["about"], f"{r['mean_steps']:.0f}", f"{r['wall_s'] / len(chosen):.2f}",
                    f"{r['pairs_per_hour']:,.0f}", f"**{r['vs_paper']:.1f}x**", fmt(r["miou"]),
                    "yes" if r["paper_quality"] else "no"] for r in rows])
    report.add("End to end: pairs per hour at the paper's quality", body)


SECTIONS: dict[str, Callable[[Bench, Report, Sequence[Item]], None]] = {
    "batch": section_batch, "overhead": section_overhead, "reference": section_reference,
    "end_to_end": section_end_to_end,
}
