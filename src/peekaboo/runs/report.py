"""A run's report: ``runs/<name>/report.html``, one self-contained page over the run folder's own files.

It shows the summary (pairs done / failed, mIoU, overall IoU, precision at IoU thresholds, per-class IoU when
the pairs carry classes), two figures written beside it (``report/scores.png``: the per-pair IoU
distribution, or without ground truth the final dream loss's; ``report/losses.png``: the loss terms' mean
curves over the pairs, from each done record's ``curve``), a gallery of overlays, worst first (lowest IoU, or
without ground truth highest final dream loss), and the failed pairs with their errors.

Every image is referenced by a path relative to the run folder, so the folder can be copied or archived and
opened from disk: nothing is fetched from a server. Written at the end of every run and by
``python -m peekaboo.runs.evaluate runs/<name>``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peekaboo.optim.callbacks import CURVE_KEYS
from peekaboo.optim.module import DREAM_LOSS
from peekaboo.runs.layout import COMMAND_FILE, REPORT_FILE, RESULTS_FILE, SUMMARY_FILE
from peekaboo.runs.metrics import DONE, FAILED_PREFIX, curve_points
from peekaboo.utils import files

FIGURES_DIR = "report"
# How many pairs the gallery shows (the worst ones): a page of thousands of images helps nobody.
GALLERY_SIZE = 48
HIST_BINS = 20
FIGURE_DPI = 100
# Figure sizes in inches (at FIGURE_DPI: 560x320 and 960x300 pixels).
SCORES_FIGSIZE = (5.6, 3.2)
LOSSES_FIGSIZE = (9.6, 3.0)
# The band drawn around each mean loss curve: these quantiles over the pairs.
BAND_QUANTILES = (0.25, 0.75)
DIGITS = 3  # decimals of every score shown


def write_report(run_dir: str | Path, gallery_size: int = GALLERY_SIZE) -> Path:
    """Write ``<run_dir>/report.html`` and its figures from ``summary.json`` and ``results.jsonl``.

    Args:
        run_dir: a run folder (``runs/<name>``) that has a ``summary.json``.
        gallery_size: how many pairs the gallery shows, worst first.

    Returns:
        The report's path.
    """
    root = Path(run_dir)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    records = _records(root / RESULTS_FILE)
    done = [r for r in records if r.get("status") == DONE]
    failed = [r for r in records if str(r.get("status", "")).startswith(FAILED_PREFIX)]
    scored = [r for r in done if r.get("iou") is not None]
    figures = [f for f in (_scores_figure(root, done, scored), _losses_figure(root, done)) if f is not None]
    cmd = (root / COMMAND_FILE).read_text().strip() if (root / COMMAND_FILE).is_file() else ""
    body = [
        f"<h1>Run <code>{_e(root.name)}</code></h1>",
        f"<p class='cmd'><code>{_e(cmd)}</code></p>" if cmd else "",
        _summary_section(summary),
        "<h2>Figures</h2>" + "".join(f"<img class='figure' src='{_src(f, root)}' alt='{_e(f.stem)}'>"
                                     for f in figures) if figures else "",
        _gallery_section(root, done, scored, gallery_size),
        _failed_section(failed),
    ]
    page = _PAGE.format(title=_e(f"peekaboo run {root.name}"), style=_STYLE, body="\n".join(b for b in body if b))
    path = root / REPORT_FILE
    files.write_text(page, path)
    return path


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _e(value: Any) -> str:
    """HTML-escaped text (prompts, ids and errors come from users' files)."""
    return html.escape(str(value), quote=True)


def _src(path: Path, root: Path) -> str:
    return quote(path.relative_to(root).as_posix())


def _fmt(value: Any) -> str:
    """A summary value as shown: scores to DIGITS decimals, counts as integers, n/a for None."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{DIGITS}f}"
    return str(value)


def _cell(key: str, value: Any) -> str:
    # data-key names the summary.json entry a number comes from (tests check them against the file).
    return f"<td class='num' data-key='{_e(key)}'>{_fmt(value)}</td>"


def _summary_section(summary: dict) -> str:
    labels = [("pairs", "pairs"), ("done", "done"), ("failed", "failed"), ("remaining", "remaining"),
              ("scored", "scored (with ground truth)"), ("miou", "mIoU"), ("overall_iou", "overall IoU")]
    if "class_miou" in summary:
        labels.append(("class_miou", "class mIoU"))
    rows = [f"<tr><th>{_e(label)}</th>{_cell(key, summary.get(key))}</tr>" for key, label in labels
            if key in summary]
    parts = ["<h2>Summary</h2>", "<div class='tables'>", "<table>", *rows, "</table>"]
    precision = summary.get("precision")
    if precision:
        parts += ["<table><tr><th>IoU &ge;</th><th>share of pairs</th></tr>",
                  *(f"<tr><th>{_e(k.removeprefix('P@'))}</th>{_cell(f'precision.{k}', v)}</tr>"
                    for k, v in precision.items()), "</table>"]
    per_class = summary.get("per_class_iou")
    if per_class:
        parts += ["<table><tr><th>class</th><th>IoU</th></tr>",
                  *(f"<tr><th>{_e(k)}</th>{_cell(f'per_class_iou.{k}', v)}</tr>" for k, v in per_class.items()),
                  "</table>"]
    parts.append("</div>")
    if not summary.get("done"):
        parts.append("<p>No pair has finished yet.</p>")
    elif not summary.get("scored"):
        parts.append("<p>No ground truth: the gallery is ordered by final dream loss, highest first.</p>")
    return "\n".join(parts)


def _final_dream(record: dict) -> float:
    value = (record.get("losses") or {}).get(DREAM_LOSS)
    return float(value) if value is not None and math.isfinite(value) else -math.inf


def _gallery_section(root: Path, done: list[dict], scored: list[dict], size: int) -> str:
    if scored:
        order = sorted(scored, key=lambda r: float(r["iou"]))
        caption = lambda r: f"IoU {float(r['iou']):.{DIGITS}f}"  # noqa: E731
    else:
        order = sorted(done, key=_final_dream, reverse=True)
        caption = lambda r: f"dream loss {_final_dream(r):.4g}"  # noqa: E731
    cards = []
    for record in order[:size]:
        image = _pair_image(root, record)
        picture = f"<img src='{_src(image, root)}' alt='{_e(record['id'])}'>" if image else "<p>(no image)</p>"
        cards.append(f"<figure>{picture}<figcaption><b>{_e(record.get('prompt', ''))}</b><br>{_e(caption(record))}"
                     f"<br><small>{_e(record['id'])}</small></figcaption></figure>")
    if not cards:
        return ""
    shown = f"the {len(cards)} worst of {len(order)}" if len(order) > len(cards) else f"all {len(cards)}"
    return f"<h2>Gallery ({shown}, worst first)</h2>\n<div class='gallery'>{''.join(cards)}</div>"


def _pair_image(root: Path, record: dict) -> Path | None:
    """The pair's overlay, or its mask when overlays were not saved; None when neither file exists."""
    outputs = record.get("outputs") or {}
    for key in ("overlay", "mask"):
        if outputs.get(key) and (root / outputs[key]).is_file():
            return root / outputs[key]
    return None


def _failed_section(failed: list[dict]) -> str:
    if not failed:
        return ""
    rows = "".join(f"<tr><td>{_e(r['id'])}</td><td>{_e(r.get('prompt', ''))}</td><td>{_e(r['status'])}</td>"
                   f"<td>{_e(r.get('error', ''))}</td></tr>" for r in failed)
    return (f"<h2>Failed pairs ({len(failed)})</h2>\n<table class='failed'><tr><th>id</th><th>prompt</th>"
            f"<th>status</th><th>error</th></tr>{rows}</table>")


def _figure(figsize: tuple[float, float], ncols: int = 1):
    # The object-oriented API: no pyplot, so no global backend or figure state in the caller's process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=FIGURE_DPI, layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> Path:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _scores_figure(root: Path, done: list[dict], scored: list[dict]) -> Path | None:
    """Histogram of per-pair IoU (with the mIoU marked), or of the final dream loss without ground truth."""
    if scored:
        values, label, bins = [float(r["iou"]) for r in scored], "IoU per pair", [i / HIST_BINS
                                                                                  for i in range(HIST_BINS + 1)]
    else:
        values = [v for r in done if math.isfinite(v := _final_dream(r))]
        label, bins = "final dream loss per pair", HIST_BINS
    if not values:
        return None
    fig, (ax,) = _figure(SCORES_FIGSIZE)
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    mean = sum(values) / len(values)
    ax.axvline(mean, color="#c44e52", linestyle="--", label=f"mean {mean:.{DIGITS}f}")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of pairs
    ax.set_xlabel(label)
    ax.set_ylabel("pairs")
    ax.legend(frameon=False)
    return _save(fig, root / FIGURES_DIR / "scores.png")


def _losses_figure(root: Path, done: list[dict]) -> Path | None:
    """Per loss term, the mean over the done pairs at every recorded step, and a quantile band."""
    import numpy as np

    curves = [r["curve"] for r in done if r.get("curve", {}).get("step")]
    if not curves:
        return None
    fig, axes = _figure(LOSSES_FIGSIZE, len(CURVE_KEYS))
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        by_step: dict[int, list[float]] = {}
        for curve in curves:
            for step, value in curve_points(curve, key):
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        mean = [float(np.mean(by_step[s])) for s in steps]
        low, high = ([float(np.quantile(by_step[s], q)) for s in steps] for q in BAND_QUANTILES)
        ax.fill_between(steps, low, high, color="#4c72b0", alpha=0.25, linewidth=0)
        ax.plot(steps, mean, color="#4c72b0")
        ax.set_title(f"{key} (mean of {len(curves)})", fontsize="medium")
        ax.set_xlabel("step")
    return _save(fig, root / FIGURES_DIR / "losses.png")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
code { background: #f3f3f3; padding: 0 .2em; }
.cmd { word-break: break-all; font-size: .85em; }
.tables { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: .2em .7em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; margin: .3em 1em .3em 0; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .8em; }
figure { margin: 0; font-size: .8em; }
figure img { width: 100%; border: 1px solid #ccc; }
figcaption small { color: #777; word-break: break-all; }
table.failed td { font-size: .85em; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
</body></html>
"""
