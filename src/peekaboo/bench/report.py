"""The ablation benchmark's markdown (either scene set): the results table, the docs/ report and the README's
marked block, all returned as strings (``benchmarks/ablation.py`` or the command line writes them where they go)."""

from __future__ import annotations

from typing import Any

from peekaboo.bench import breakdown, goals
from peekaboo.bench.common import fmt
from peekaboo.bench.common import markdown_table as _table
from peekaboo.bench.methods import MAIN_ROWS, SCENE_PRESETS
from peekaboo.data.seeds import TUNE_SPLITS
from peekaboo.data.synthetic import GENERATORS

# How each scene set's prompts read, for the reports.
PROMPT_FORMS = {"shapes": "\"a <colour> <shape>\"", "objects": "naming the object (\"a dog\", \"an apple\")"}
# Precision columns of the table (the paper's ablation table reports these four).
TABLE_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
#: The README's one generated block: the main rows (:data:`~peekaboo.bench.methods.MAIN_ROWS`) of this scene
#: set's ``eval`` table go between these lines; every other report of the benchmarks goes to docs/ only.
README_SCENES = "objects"
README_SPLIT = "eval"
README_START = f"<!-- bench:{README_SCENES}:start -->"
README_END = f"<!-- bench:{README_SCENES}:end -->"


def _fmt(x: float | None, digits: int = 3) -> str:
    """A figure of the benchmark tables: "-" where there is none."""
    return fmt(x, digits, missing="-")


def _scenes_option(scenes: str) -> str:
    """The ``--scenes`` option of a command quoted in a report ("" for the default, :data:`README_SCENES`)."""
    return "" if scenes == README_SCENES else f" --scenes {scenes}"


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a markdown table, one row per method."""
    head = ["Method", "steps", *(f"P@{t}" for t in TABLE_THRESHOLDS), "mIoU", "oIoU", "wrong obj.", "s/pair"]
    rows = []
    for row in result["methods"].values():
        s = row["summary"]
        prec = s.get("precision") or {}
        wrong = s.get("wrong_object_rate")
        steps = (row.get("settings") or {}).get("max_steps")  # 0 for a start scored alone; none for a baseline
        rows.append([row["label"], "-" if steps is None else steps,
                     *(_fmt(prec.get(f"P@{t}"), 2) for t in TABLE_THRESHOLDS), _fmt(s["miou"]),
                     _fmt(s["overall_iou"]), "-" if wrong is None else f"{100 * wrong:.1f}%",
                     _fmt(s["seconds_per_pair"], 2)])
    return _table(head, rows, right_from=1)


def readme_rows_pending(report: dict[str, Any]) -> list[str]:
    """The main rows (:data:`~peekaboo.bench.methods.MAIN_ROWS`) some process of ``report``'s table still has
    to finish: the README's block waits for them."""
    return [name for name in report.get("rows_pending", ()) if name in MAIN_ROWS]


def readme_block(report: dict[str, Any], full_report: str | None = None) -> str:
    """What goes between the README's markers: the headline, the table of the main rows, where the full table is
    (``full_report``, a path relative to the README, when given) and how it was made."""
    main = {"methods": {name: row for name, row in report["methods"].items() if name in MAIN_ROWS}}
    link = []
    if full_report is not None:
        so_far = " finished so far" if report.get("rows_pending") else ""
        rows = (f"The main {len(main['methods'])} rows of the {len(report['methods'])}{so_far}; every row"
                if len(main["methods"]) < len(report["methods"]) else "What each row measures")
        link = [f"{rows}: [{full_report}]({full_report}).", ""]
    return "\n".join([*([headline(report), ""] if headline(report) else []), markdown_table(main), "", *link,
                      *provenance_lines(report)])


def headline(report: dict[str, Any]) -> str:
    """One sentence with the default's figures, its ratio to the cross-attention baseline and its margin over the
    best row that runs no optimization ("" without the default's row), so prose around a table never has to copy
    a figure."""
    rows = report["methods"]
    if "peekaboo" not in rows or rows["peekaboo"]["summary"]["miou"] is None:
        return ""
    s = rows["peekaboo"]["summary"]
    text = (f"On {report['pairs']} `{report['split']}` pairs, Peekaboo with the default settings reaches **mIoU "
            f"{s['miou']:.3f}** with {100 * (s['wrong_object_rate'] or 0):.1f}% wrong-object masks")
    ca = rows.get("cross_attention", {}).get("summary", {}).get("miou")
    if ca:
        text += f": {s['miou'] / ca:.1f}x the cross-attention baseline (mIoU {ca:.3f})"
    if (unoptimized := goals.best_unoptimized(report)) is not None:
        best, label = unoptimized
        text += f"{',' if ca else ':'} {s['miou'] - best:+.3f} mIoU over the best row without optimization ({label})"
    return text + "."


def provenance_lines(report: dict[str, Any]) -> list[str]:
    """How and where a table was made: command, model, date, machine, raw results."""
    m = report["machine"]
    cpu = f"{m['processor']}, " if m.get("processor") else ""
    commands = report.get("commands") or [report["command"]]
    ran = (f"- Command: `{commands[0]}`" if len(commands) == 1 else
           "- Commands (processes that filled this table together, `--merge`): "
           + "; ".join(f"`{c}`" for c in commands))
    return [
        ran,
        f"- Model: `{report['model']}`",
        f"- Date: {report['date']}",
        f"- Machine: {cpu}{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}, Python {m['python']}" + (f", GPU {m['cuda']}" if m.get("cuda") else ""),
        *([f"- Raw per-pair results: `{report['out']}`"] if report.get("out") else []),
    ]


def partial_line(report: dict[str, Any]) -> str:
    """The line that marks a report of a run still going: its finished rows, and the pairs done of each row under
    way (``"rows_in_progress"``)."""
    under_way = sorted((len(records) for records in report.get("rows_in_progress", {}).values()), reverse=True)
    more = ""
    if under_way:
        counts = [str(n) for n in under_way]
        done = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} and {counts[-1]}"
        more = f", {len(counts)} under way with {done} of {'its' if len(counts) == 1 else 'their'} " \
               f"{report['pairs']} pairs done"
    return f"**Partial results: {len(report['methods'])} rows finished{more}; the run is still going.**"


def render_docs(report: dict[str, Any], sweep_report: dict[str, Any] | None = None) -> str:
    """docs/BENCHMARK.md: the table, how it was made, what each row means, and how the settings were chosen."""
    rows = report["methods"]
    scenes = report.get("scenes", "shapes")  # results stored before the objects scenes are the shapes benchmark's
    lines = [
        f"# Synthetic {scenes} benchmark",
        "",
        f"Generated by `python benchmarks/ablation.py{_scenes_option(scenes)}` (do not edit by hand; rerun it).",
        "",
        *([partial_line(report), ""] if report.get("partial") else []),
        f"{report['pairs']} pairs of the `{report['split']}` split: "
        f"{GENERATORS[scenes].split_description(report['split'])}; one pair per object, prompt "
        f"{PROMPT_FORMS[scenes]}. Their seeds are disjoint from the bundled model's training scenes"
        + ("." if report["split"] in TUNE_SPLITS else
                    f" and from the {' and '.join(f'`{s}`' for s in TUNE_SPLITS)} splits the settings were chosen on."),
        "",
        *([headline(report), ""] if headline(report) else []),
        report["table"],
        "",
        *provenance_lines(report),
        "",
        *(["## Targets", "", table, ""] if (table := goals.markdown(report)) else []),
        "## Columns",
        "",
        "- **steps**: the step count of each of the row's optimizations (`trainer.max_steps`; a restart row runs "
        "one optimization per candidate; 0: the start scored alone).",
        "- **P@t**: fraction of pairs whose IoU with the ground truth is at least t (the paper's precision).",
        "- **mIoU**: mean of the per-pair IoU. **oIoU**: summed intersections over summed unions.",
        "- **wrong obj.**: fraction of pairs whose mask covers another object of the scene more than the named "
        "one (|pred ∩ other| > |pred ∩ target|); an empty mask is never counted as wrong.",
        "- **s/pair**: wall-clock seconds per pair on the machine above, the median over pairs (batched pairs share "
        "their batch's time equally; the median, so that a batch whose process was paused does not set it). "
        "A process ranks a pair's image regions once (`peekaboo.optim.regions`), so of the rows that start on a "
        "region, the first one a run computes pays the ranking and the later ones do not. A row kept by `--resume` "
        "keeps the time of the run that computed it, and these machines' speed drifts between runs: compare "
        "times within one run.",
        "",
        "## Rows",
        "",
    ]
    for row in rows.values():
        extra = f" Same settings as `{row['same_as']}`, so its masks are reused." if row["same_as"] else ""
        over = f" Overrides: `{' '.join(row['overrides'])}`." if row["overrides"] else ""
        lines.append(f"- **{row['label']}**: {row['about']}{over}{extra}")
    if report.get("base_overrides"):
        lines += ["", f"Every Peekaboo row starts from `configs/model/{SCENE_PRESETS[scenes]}.yaml` plus the tune "
                  f"sweep's choice for the default (`--tuned`): `{' '.join(report['base_overrides'])}`."]
    if report.get("extra_overrides"):
        lines += ["", f"Every Peekaboo row also has the command's `--set {' '.join(report['extra_overrides'])}`."]
    if table := breakdown.markdown(report):
        lines += ["", "## Where it succeeds and fails", "", table]
    if sweep_report is not None:
        lines += ["", "## How the settings were chosen", "", sweep_report.get("markdown", ""), ""]
    return "\n".join(lines).rstrip() + "\n"


def sweep_markdown(report: dict[str, Any], steps_tolerance: float) -> str:
    """The sweep's trials and choices as markdown (for docs/BENCHMARK.md).

    Args:
        report: what :func:`peekaboo.bench.sweep.sweep` returns, without its markdown.
        steps_tolerance: the mIoU margin within which the sweep took the fewest steps.
    """
    steps = sorted({int(s) for t in report["trials"] for s in t["by_steps"] if int(s) > 0})
    scenes = report.get("scenes", "shapes")
    preset = f"configs/model/{SCENE_PRESETS[scenes]}.yaml"
    lines = [
        f"Coordinate search on the first {report['pairs']} pairs of the `tune` split (never `eval`), "
        f"`python benchmarks/ablation.py{_scenes_option(scenes)} --split tune --sweep`: "
        "each knob of the default in turn, on top of the "
        "best so far, every trial scored at its own best step count (the fewest steps within "
        f"{steps_tolerance} mIoU of its best snapshot; snapshots of the same run); then each other mask kind's "
        "Adam learning rate and step count; then each other start's step count; then the cross-attention "
        "threshold. Chosen by mIoU (ties: lower wrong-object rate). "
        "With this many pairs, mIoU differences below about 0.05 are within noise.",
        "",
    ]
    rows = []
    for t in report["trials"]:
        by = {int(s): v for s, v in t["by_steps"].items()}
        last = by[max(by)]
        if t["max_steps"] is None:  # the cross-attention baseline has no steps
            cells = [_fmt(last["miou"])] + [""] * (len(steps) - 1)
        else:
            cells = [_fmt(by[s]["miou"]) if s in by else "" for s in steps]
        rows.append([t["stage"], t["value"], *cells, f"{100 * (last['wrong_object_rate'] or 0):.1f}%"])
    lines += [
        _table(["stage", "value", *(f"mIoU@{s}" for s in steps), "wrong obj. (last)"], rows, right_from=2),
        "",
        f"- Default: `{' '.join(report['default_overrides']) or f'({preset} as is)'}` "
        f"on top of {preset} (tune mIoU {_fmt(report['default_miou'])}).",
        *(f"- `{kind}`: `{' '.join(o)}` (" + (f"tune mIoU {_fmt(report['kind_miou'][kind])}"
          if report["kind_miou"].get(kind) is not None else "its partner kind's rate, not searched") + ")."
          for kind, o in report["kind_optim"].items()),
        f"- Cross-attention threshold: {report['cross_attention_threshold']} "
        f"(tune mIoU {_fmt(report['cross_attention_miou'])}).",
    ]
    counts = report.get("step_counts") or {}
    if counts:
        # Sweeps made before per-row step counts ran every row at the default's count.
        lines.append("- Step counts (each benchmark row runs at the count of its mask kind, else of its start): "
                     + ", ".join(f"{name.replace(':', ' ')} {n}" for name, n in counts.items()) + ".")
    return "\n".join(lines)


