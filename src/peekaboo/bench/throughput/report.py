"""The throughput report's markdown: the header (the one machine every section ran on), the Summary derived from
the sections' figures, then the sections."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peekaboo.bench.common import machine_info, ms, package_version, replace_marked
from peekaboo.bench.methods import SCENE_PRESETS
from peekaboo.bench.reference_loop import REFERENCE_KINDS
from peekaboo.bench.throughput.cpu import BATCH_GOAL, BATCH_SIZES, OVERHEAD_GOAL_PCT, SPEEDUP_GOAL
from peekaboo.bench.throughput.harness import Report
from peekaboo.utils import files

LOADED = tuple[float, float, float]

#: The sections of docs/PERFORMANCE.md that other scripts write, each between its two markers, with what stands
#: there until they have run: a run of this benchmark that rewrites the file keeps them (:func:`keep_blocks`).
SD15_CPU_BLOCK = ("<!-- performance:sd15-cpu:start (written by benchmarks/sd15_size.py) -->",
                  "<!-- performance:sd15-cpu:end -->")
GPU_BLOCK = ("<!-- performance:gpu:start (written by benchmarks/gpu.py) -->", "<!-- performance:gpu:end -->")
BLOCKS = {
    SD15_CPU_BLOCK: "## Stable Diffusion 1.5 size on this CPU\n\nnot measured: run `python benchmarks/sd15_size.py`.",
    GPU_BLOCK: "## On a GPU\n\nnot measured: run `python benchmarks/gpu.py` on a machine with a GPU (the `gpu` tests, "
               "Stable Diffusion 1.5 size, bf16 vs fp32 masks).",
}


def header_lines(args: argparse.Namespace, load_before: LOADED, command: str) -> list[str]:
    """Where and how the figures were taken: this process's machine, which every section of the report ran on."""
    m = machine_info()
    versions = ", ".join(f"{name} {package_version(name)}" for name in ("lightning", "diffusers", "transformers"))
    load_after = os.getloadavg()
    return [
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Machine: {m['processor']}, {m['cpu_count']} cores; GPU: {m['cuda'] or 'none'}; Python {m['python']}; "
        f"torch {m['torch']}, {versions}",
        f"- CPU threads used by torch: {m['torch_threads']} (`--threads`)",
        f"- Model: {f'`{args.model}`' if args.model else 'the preset' + chr(39) + 's own'} "
        f"(preset `{SCENE_PRESETS[args.scenes]}`, {args.scenes} scenes), "
        f"{args.warmup} warm-up + {args.steps} timed steps per run",
        f"- Load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}",
    ]


def load_note(before: LOADED, after: LOADED, threads: int = 1) -> str:
    """How far to trust the absolute times: whether other jobs shared the cores while the benchmark ran.

    ``threads``: the benchmark's own torch threads, which keep about that many cores busy."""
    # A 1-minute load above the benchmark's own threads (plus half a core of slack) means other work ran too.
    limit = threads + 0.5
    if max(before[0], after[0]) <= limit:
        return (f"Nothing else ran on the machine (1-minute load average at most {limit:g}, the benchmark's own): "
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
        lines.append(f"- Project default path (B={b} pairs per module) vs the paper-style loop, per pair-step, both at "
                     "the loop's start and estimator (alpha 0.5, score distillation): "
                     + ", ".join(f"`{k}` {v:.2f}x" for k, v in speedups.items())
                     + f" (goal >= {SPEEDUP_GOAL:.0f}x: {'met' if met else 'NOT met'}); one pair per module (B=1): "
                     + ", ".join(f"`{k}` {summary[f'speedup_b1_{k}']:.2f}x (at most "
                                 f"{summary[f'speedup_bound_{k}']:.2f}x with a free mask)" for k in speedups) + ".")
    if "quality" in summary:
        q = summary["quality"]
        lines.append(f"- Same masks? `{q['kind']}` on {q['pairs']} pairs: mIoU {q['reference_miou']:.3f} (reference) "
                     f"vs {q['project_miou']:.3f} (project); end to end {q['end_to_end_speedup']:.1f}x faster "
                     "(the project batches the pairs).")
    if "end_to_end" in summary:
        e = summary["end_to_end"]
        seeds = e.get("reference_seeds", 1)  # reports made before the second seed ran the loop once
        base = e.get("reference_pairs_per_hour", e["rows"][0]["pairs_per_hour"])
        bar = e.get("quality_bar", e["rows"][0]["miou"])
        for row in e["rows"][seeds:]:
            verdict = "at" if row["miou"] >= bar else "below"
            lines.append(f"- End to end on {e['pairs']} `{e['split']}` pairs, {row['label']} vs the paper-style loop: "
                         f"{row['pairs_per_hour'] / base:.1f}x the pairs per hour ({row['pairs_per_hour']:,.0f} vs "
                         f"{base:,.0f}), mean {row['mean_steps']:.0f} steps per pair, mIoU {row['miou']:.3f}, "
                         f"{verdict} the paper's quality (the loop's lower seed: {bar:.3f}).")
    return lines


def render(report: Report, header: Sequence[str], note: str, scenes: str = "shapes") -> str:
    """The whole report: title, ``header`` lines (:func:`header_lines`), ``note`` (:func:`load_note`), the
    Summary and the sections. The shapes report (docs/PERFORMANCE.md) also holds the sections other scripts write
    (:func:`keep_blocks`)."""
    if scenes == "shapes":
        made = ("Generated by `benchmarks/throughput.py`, all but the last two sections, which "
                "`benchmarks/sd15_size.py` and `benchmarks/gpu.py` write (a run of `throughput.py` keeps them); rerun "
                "each to refresh its figures.")
    else:
        made = f"Generated by `benchmarks/throughput.py --scenes {scenes}`; rerun it to refresh the figures."
    lines = [f"# Performance{'' if scenes == 'shapes' else ' on the ' + scenes + ' scenes'}", "", made, "",
             *header, "", note, ""]
    if headline := summary_lines(report.summary):
        lines += ["## Summary", "", *headline, ""]
    for title, body in report.sections:
        lines += [f"## {title}", "", body, ""]
    return "\n".join(lines)


def put_block(text: str, markers: tuple[str, str], block: str) -> str:
    """``text`` with ``block`` between ``markers``; the markers and ``block`` are appended where ``text`` lacks
    them."""
    replaced = replace_marked(text, block, markers)
    if replaced is not None:
        return replaced
    return f"{text.rstrip()}\n\n{markers[0]}\n{block}\n{markers[1]}\n"


def write_section(out: Path, report: Path, markers: tuple[str, str], text: str) -> None:
    """Write one section where :func:`peekaboo.bench.common.destination` chose: into ``report`` (the repository's
    docs/PERFORMANCE.md) between ``markers``, every other section kept, or, for any other ``out``, as that file's
    whole text."""
    if out.resolve() == report.resolve():
        files.write_text(put_block(out.read_text() if out.is_file() else "", markers, text), out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(text + "\n", out)


def keep_blocks(new: str, old: str | None) -> str:
    """The report ``new`` followed by every :data:`BLOCKS` section as ``old`` (the file it replaces) holds it, or
    its placeholder where ``old`` has none."""
    text = new
    for markers, placeholder in BLOCKS.items():
        start, end = markers
        kept = None
        if old is not None and start in old and end in old[old.index(start):]:
            kept = old[old.index(start) + len(start): old.index(end, old.index(start))].strip("\n")
        text = put_block(text, markers, placeholder if kept is None else kept)
    return text
