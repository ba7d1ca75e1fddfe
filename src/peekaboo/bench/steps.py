"""Quality against optimization steps: the mIoU of Peekaboo settings after 5 .. 300 steps on the synthetic pairs.

``python -m peekaboo.bench.steps [--scenes shapes|objects] [--split tune] [--pairs 24]
[--candidate 'label: key=value ...'] [--out JSON] [--docs MD] [--plot PNG]`` runs the paper's settings, the
project's and any candidates, and scores each at every step count of ``--steps``: one mIoU-vs-steps curve per
setting (a table, and a PNG with matplotlib).

A setting whose run does not depend on its length (:func:`horizon_free`) runs once, for the largest step count,
and is scored on snapshots of that run; a setting with a learning-rate schedule over the run, an annealed
timestep schedule or early stopping runs once per step count (its step ``k`` of a long run is not a run of
``k`` steps). With early stopping the x value is the mean number of steps the pairs took.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from peekaboo.bench.common import fmt, machine_info, markdown_table, run_cli, write_json
from peekaboo.bench.methods import (
    PAPER_OVERRIDES,
    SCENE_PRESETS,
    canonical_key,
    method_config,
    resolve_config_dir,
    settings_key,
)
from peekaboo.bench.run import DEFAULT_BATCH, progress_logger, run_peekaboo
from peekaboo.bench.scoring import BENCH_SPLITS, load_pairs, summarize_method
from peekaboo.data.synthetic import GENERATORS
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.errors import PeekabooError
from peekaboo.utils import files

log = logging.getLogger("peekaboo.bench")

STEP_COUNTS = (5, 10, 25, 50, 75, 100, 150, 200, 250, 300)
DEFAULT_PAIRS = 24


@dataclass(frozen=True)
class Setting:
    """One curve: a label, what it is, and its overrides of the scene set's model preset."""

    label: str
    about: str
    overrides: tuple[str, ...] = ()


#: The paper's settings where they carry over to a bundled model (:data:`~peekaboo.bench.methods.PAPER_OVERRIDES`).
PAPER = Setting("paper", "the paper's score distillation, guidance 100, posterior sampling and alpha-0.5 start",
                PAPER_OVERRIDES)
PROJECT = Setting("project", "the scene set's model preset (configs/model/shapes.yaml or objects.yaml)")
#: Fewer steps at better than the paper's quality, by scene set, each chosen on its own tune split.
#: Shapes: 50 steps, the first count where the curves there flatten, at the best rate and timestep schedule tried
#: (benchmarks/results/steps_tune*.json hold the tune curves of the rates, schedules, mask starts and estimators);
#: docs/STEPS.md, docs/STEPS_ROBUST.md and the end-to-end rows of docs/PERFORMANCE.md measure it on held-out pairs.
#: Objects: the preset for 50 steps, the fewest of its tune curve (benchmarks/results/steps_objects_tune.json) at
#: the paper's settings' quality at their 300 steps; the end-to-end rows of docs/PERFORMANCE_OBJECTS.md measure it.
FAST: dict[str, Setting] = {
    "shapes": Setting("fast", "the preset at learning rate 0.3 with stratified timesteps for 50 steps",
                      ("trainer.max_steps=50", "optimization.optim.lr=0.3",
                       "optimization.guidance.t_schedule=stratified")),
    "objects": Setting("fast", "the preset for 50 steps", ("trainer.max_steps=50",)),
}
BUILTIN_LABELS = (PAPER.label, PROJECT.label, "fast")


def builtin_settings(scenes: str) -> tuple[Setting, ...]:
    """The built-in settings of a scene set: the paper's, the preset, and its fast setting where one was chosen."""
    return (PAPER, PROJECT, *((FAST[scenes],) if scenes in FAST else ()))


def builtins_of(args: argparse.Namespace) -> list[str]:
    """The built-in settings ``args`` draws: ``--builtins``, else every built-in setting of its scene set.

    Raises:
        PeekabooError: ``--builtins fast`` on a scene set with no fast setting.
    """
    if args.builtins is None:
        return [s.label for s in builtin_settings(args.scenes)]
    known = {s.label for s in builtin_settings(args.scenes)}
    if missing := [label for label in args.builtins if label not in known]:
        raise PeekabooError(f"--builtins {missing[0]}: the {args.scenes} scenes have no such setting chosen yet; "
                            f"draw {' '.join(sorted(known))}, or a --candidate.")
    return list(args.builtins)


def parse_candidate(text: str) -> Setting:
    """``"label: key=value key=value"`` as a :class:`Setting` (the label must not be a built-in one).

    Raises:
        PeekabooError: no label, or a label already taken.
    """
    label, sep, rest = text.partition(":")
    label = label.strip()
    if not sep or not label:
        raise PeekabooError(f"--candidate {text!r}: write it as 'label: key=value ...'.")
    if label in BUILTIN_LABELS:
        raise PeekabooError(f"--candidate {text!r}: the label {label!r} is a built-in setting's; choose another.")
    overrides = tuple(shlex.split(rest))
    return Setting(label, " ".join(overrides) or "the preset", overrides)


def horizon_free(cfg: Any) -> bool:
    """Whether step ``k`` of a long run of ``cfg`` equals the end of a run of ``k`` steps: no learning-rate
    schedule or warm-up, no annealed timesteps (both follow the run's length) and no early stopping (a stop
    depends on the steps that follow the check only through the cap)."""
    opt = cfg.optimization
    return (opt.optim.schedule == "constant" and opt.optim.warmup_steps == 0
            and opt.guidance.t_schedule != "annealed" and not opt.early_stop.enabled)


def curve_key(cfg: Any) -> str:
    """What a curve depends on: the settings key, less the setting's own ``trainer.max_steps`` where the run is
    :func:`horizon_free` (every point is then a snapshot of one run to the largest step count, whatever that
    count), so two settings that differ only in it share one curve."""
    if horizon_free(cfg):
        cfg = OmegaConf.merge(cfg, {"trainer": {"max_steps": 1}})
    return settings_key(cfg)


def curve(setting: Setting, cfg: Any, pairs: Sequence[Any], steps: Sequence[int],
          batch_size: int) -> list[dict[str, Any]]:
    """The points of ``setting`` (resolved as ``cfg``): for each step count, the summary of its pairs (mIoU,
    wrong-object rate, ...), the mean steps the pairs took, the wall seconds per pair of reaching that step count,
    and each pair's IoU and wrong-object flag (``per_pair``, in pair order), so that a result can be broken down
    afterwards."""
    backbone = shared_backbone(cfg.model, "cpu")
    runs: dict[int, list[dict]] = {}
    if horizon_free(cfg):
        long = OmegaConf.merge(cfg, {"trainer": {"max_steps": max(steps)}})
        runs = run_peekaboo(long, pairs, backbone, batch_size, snapshot_steps=steps,
                            progress=progress_logger(f"{setting.label} ({max(steps)} steps, snapshots)"))
    else:
        for n in steps:
            one = OmegaConf.merge(cfg, {"trainer": {"max_steps": n}})
            runs[n] = run_peekaboo(one, pairs, backbone, batch_size,
                                   progress=progress_logger(f"{setting.label} ({n} steps)"))[n]
    points = []
    for n in steps:
        records = runs[n]
        summary = summarize_method(records)
        used = [r["steps_used"] for r in records]
        per_pair = [{"id": r["id"], "iou": r.get("iou"), "wrong_object": bool(r.get("wrong_object"))}
                    for r in records]
        points.append({"steps": n, "mean_steps": float(np.mean(used)), **summary, "per_pair": per_pair})
    return points


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every setting's curve on the chosen pairs; writes ``--out``, ``--docs`` and ``--plot`` when given."""
    steps = sorted(set(args.steps))
    if steps[0] < 1:
        raise PeekabooError(f"--steps {' '.join(map(str, args.steps))}: step counts must be at least 1.")
    drawn = builtins_of(args)
    settings = [s for s in builtin_settings(args.scenes) if s.label in drawn]
    settings += [parse_candidate(c) for c in args.candidate]
    if not settings:
        raise PeekabooError("an empty --builtins and no --candidate: there is nothing to run; name a setting.")
    if args.resume and args.out is None:
        raise PeekabooError("--resume keeps the curves of an earlier run's --out; pass --out.")
    config_dir = resolve_config_dir(args.config_dir)
    # Every setting's config first, so a bad override fails before hours of work.
    configs = {s.label: method_config(s.overrides, args.set, config_dir, scenes=args.scenes) for s in settings}
    keys = {label: settings_key(cfg) for label, cfg in configs.items()}
    curve_keys = {label: curve_key(cfg) for label, cfg in configs.items()}
    pairs = load_pairs(args.split, args.pairs, args.scenes)
    result: dict[str, Any] = {"scenes": args.scenes, "split": args.split, "pairs": len(pairs), "steps": steps,
                              "command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "machine": machine_info(), "settings": {}}
    earlier = finished_curves(result, args.out) if args.resume else {}
    for setting in settings:
        # A run already in the table first: a curve kept from an earlier run may be one another setting has.
        same = next((label for label in result["settings"] if curve_keys[label] == curve_keys[setting.label]), None)
        if same is not None:  # e.g. the fast setting: the preset's run, fewer steps of it
            log.info("%s: the same run as %s (they differ only in their own step count): its curve",
                     setting.label, same)
            result["settings"][setting.label] = {"about": setting.about, "overrides": list(setting.overrides),
                                                "key": keys[setting.label], "same_as": same, "seconds": 0.0,
                                                "points": copy.deepcopy(result["settings"][same]["points"])}
            continue
        kept = earlier.get(setting.label)
        # Compared as canonical_key reads them: a curve stored before a setting existed, or under another speed
        # switch, is the same run.
        if kept is not None and canonical_key(kept.get("key", "")) == canonical_key(keys[setting.label]):
            log.info("%s: kept from the earlier run (same settings, pairs and step counts)", setting.label)
            # The words are today's; the figures, and the time they took, the earlier run's.
            result["settings"][setting.label] = kept | {"about": setting.about, "overrides": list(setting.overrides),
                                                        "kept": True}
            continue
        log.info("%s: %s", setting.label, setting.about)
        t0 = time.perf_counter()
        points = curve(setting, configs[setting.label], pairs, steps, args.batch_size)
        result["settings"][setting.label] = {"about": setting.about, "overrides": list(setting.overrides),
                                            "key": keys[setting.label], "points": points,
                                            "seconds": time.perf_counter() - t0}
        if args.out is not None:  # after every setting, so an interrupted run keeps the finished curves
            write_json(result, args.out)
    # Every curve's own time, those kept from earlier runs too (curves stored before it was recorded count 0).
    result["wall_s"] = sum(s.get("seconds", 0.0) for s in result["settings"].values())
    if args.out is not None:
        write_json(result, args.out)
    if args.plot is not None:
        plot(result, args.plot)
    if args.docs is not None:
        files.write_text(render(result, args.plot), args.docs)
    return result


def finished_curves(result: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """The curves an earlier run wrote to ``path`` on the same scenes, split, pairs and step counts as ``result``,
    by label (none where the file is missing or was made otherwise). A curve is kept only where its settings key
    still matches (:func:`run` checks), so a changed preset or model is run again."""
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if not all(previous.get(k) == result[k] for k in ("scenes", "split", "pairs", "steps")):
        return {}
    curves = previous.get("settings", {})
    # Results written before each curve recorded its own time hold the run's: shared by the curves without one.
    untimed = [s for s in curves.values() if "seconds" not in s]
    for s in untimed:
        s["seconds"] = previous.get("wall_s", 0.0) / len(untimed)
    return curves


def fewest_steps(points: Sequence[dict[str, Any]], miou: float, tolerance: float = 0.01) -> dict[str, Any] | None:
    """The first point (fewest steps) whose mIoU is at least ``miou - tolerance``, or None."""
    for point in sorted(points, key=lambda p: p["mean_steps"]):
        if point["miou"] is not None and point["miou"] >= miou - tolerance:
            return point
    return None


def render(result: dict[str, Any], plot_path: Path | None) -> str:
    """The markdown report: one row per setting and step count, and the fewest steps at the paper's quality."""
    settings = result["settings"]
    steps = result["steps"]
    scenes = result.get("scenes", "shapes")  # results stored before the objects scenes are on the shapes
    split_description = GENERATORS[scenes].split_description
    header = ["setting", *(str(s) for s in steps)]
    rows = [[label, *(fmt(p["miou"]) for p in s["points"])] for label, s in settings.items()]
    wrong = [[label, *(f"{p['wrong_object_rate']:.0%}" if p["wrong_object_rate"] is not None else "n/a"
                       for p in s["points"])] for label, s in settings.items()]
    lines = [
        "# Quality against optimization steps", "",
        "Generated by `python benchmarks/steps.py` (do not edit by hand; rerun it).", "",
        f"{result['pairs']} pairs of the `{result['split']}` {scenes} split: {split_description(result['split'])}. "
        f"Command: `{result['command']}`; {result['date']}; {result['machine']['processor']}; "
        f"{result.get('wall_s', 0) / 60:.0f} min.", "",
    ]
    kept = [label for label, s in settings.items() if s.get("kept")]
    if kept:
        lines += [f"Kept from an earlier run of the same settings, pairs and step counts (`--resume`): "
                  f"{', '.join(kept)}; the command, date and machine above are the last run's.", ""]
    if plot_path is not None:
        lines += [f"![mIoU against steps]({plot_path.name})", ""]
    lines += ["## mIoU after each step count", "", markdown_table(header, rows, right_from=1), "",
              "## Wrong-object rate", "", markdown_table(header, wrong, right_from=1), "",
              "## Settings", ""]
    lines += [f"- **{label}**: {s['about']}" + (f" (`{' '.join(s['overrides'])}`)" if s["overrides"] else "")
              + (f"; its curve is {s['same_as']}'s: the two differ only in their own step count, and each point "
                 "is a snapshot of one run" if s.get("same_as") else "")
              for label, s in settings.items()]
    if PAPER.label not in settings:
        return "\n".join(lines) + "\n"
    paper_final = settings[PAPER.label]["points"][-1]
    lines += ["", f"## Fewest steps at the paper's quality ({paper_final['steps']} steps: mIoU "
                  f"{fmt(paper_final['miou'])}, within 0.01)", ""]
    for label, s in settings.items():
        hit = fewest_steps(s["points"], paper_final["miou"])
        lines.append(f"- {label}: " + (f"{hit['mean_steps']:.0f} steps (mIoU {fmt(hit['miou'])})" if hit
                                       else "not reached"))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """mIoU against (mean) steps, one line per setting, as a PNG."""
    from matplotlib.figure import Figure  # a plot only when asked: matplotlib is slow to import

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    for label, s in result["settings"].items():
        xs = [p["mean_steps"] for p in s["points"]]
        ax.plot(xs, [p["miou"] for p in s["points"]], marker="o", label=label)
    ax.set_xlabel("optimization steps per pair (mean)")
    ax.set_ylabel("mIoU")
    scenes = result.get("scenes", "shapes")
    ax.set_title(f"{result['pairs']} {result['split']} pairs, bundled {scenes} model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of :func:`run`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", choices=tuple(SCENE_PRESETS), default="shapes",
                   help="the synthetic scene set (each runs with its bundled model's preset)")
    p.add_argument("--split", choices=BENCH_SPLITS, default="tune")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS), help="step counts to score")
    p.add_argument("--builtins", nargs="*", choices=BUILTIN_LABELS, default=None,
                   help="which built-in settings to draw (default: every one the scene set has; fast only where one "
                   "was chosen on its tune split; give none of them for candidates only)")
    p.add_argument("--candidate", action="append", default=[], metavar="'LABEL: KEY=VALUE ...'",
                   help="another setting to draw (repeatable), overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every setting (repeatable), e.g. --set model.pretrained=PATH")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="pairs optimized together")
    p.add_argument("--config-dir", default=None, help="a folder of presets (default: the packaged ones)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument("--resume", action="store_true",
                   help="keep the curves of --out whose settings, pairs and step counts are unchanged")
    p.add_argument("--docs", type=Path, default=None, help="markdown report")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m peekaboo.bench.steps") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print the report; a user error ends in one sentence and
    exit status 2."""

    def body(args: argparse.Namespace, command: str) -> int:
        print(render(run(args, command), args.plot))
        return 0
    return run_cli(parser, body, argv, prog, rerun_hint="the finished curves are saved; rerun with --resume to go on")


if __name__ == "__main__":
    raise SystemExit(main())
