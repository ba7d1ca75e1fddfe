"""The ablation benchmark's command line: Peekaboo, its ablations and training-free baselines on held-out
synthetic scenes (``--scenes shapes`` or ``objects``, each with its bundled model and preset).

``python -m peekaboo.bench.ablation [--scenes shapes|objects] [--split eval|tune] [--pairs 200] [--methods ...]
[--out FILE] [--docs FILE] [--readme FILE] [--set key=value ...]`` scores every method on the first ``--pairs``
pairs of the split (:func:`peekaboo.bench.run.run_benchmark`) and prints a markdown table shaped like the paper's
ablation table; it writes the per-pair results, the table, the command and the machine to ``--out`` (JSON),
the report to ``--docs`` and, for the README's scene set and split only, the main rows' table between the markers
of ``--readme``, each only when given.

``--split tune --sweep`` is the tuning sweep that chose the settings (:func:`peekaboo.bench.sweep.sweep`).

``benchmarks/ablation.py`` runs this with the repository's paths (results, docs/BENCHMARK.md) as defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peekaboo.bench.common import machine_info, update_marked, write_json
from peekaboo.bench.methods import CROSS_ATTENTION_THRESHOLD, MAIN_ROWS, METHOD_NAMES, SCENE_PRESETS
from peekaboo.bench.report import (
    README_END,
    README_SCENES,
    README_SPLIT,
    README_START,
    readme_block,
    readme_rows_pending,
    render_docs,
)
from peekaboo.bench.run import DEFAULT_BATCH, DEFAULT_PAIRS, merge_saved, run_benchmark
from peekaboo.bench.scoring import BENCH_SPLITS
from peekaboo.bench.sweep import SWEEP_STAGES, TUNE_PAIRS, sweep
from peekaboo.errors import PeekabooError, exit_status
from peekaboo.utils import files
from peekaboo.utils.console import setup_logging

log = logging.getLogger("peekaboo.bench")

#: The ``robust`` split's defaults: the main rows on fewer pairs (its scenes are slower to score and it measures
#: how the method holds up, not every ablation).
ROBUST_PAIRS = 100


def parser(prog: str = "python -m peekaboo.bench.ablation") -> argparse.ArgumentParser:
    """The command line's options; every output path defaults to none (nothing written)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--scenes", choices=tuple(SCENE_PRESETS), default=README_SCENES,
                   help=f"the synthetic scene set (each runs with its bundled model's preset; default {README_SCENES}, "
                   "the README's)")
    p.add_argument("--split", choices=BENCH_SPLITS, default="eval")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"how many pairs (default {DEFAULT_PAIRS}; {ROBUST_PAIRS} on robust; {TUNE_PAIRS} with "
                   "--sweep)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"rows to run (default every row; on robust the main rows, {' '.join(MAIN_ROWS)}; with "
                   f"--resume also the rows --out has), from: {' '.join(METHOD_NAMES)}")
    p.add_argument("--out", type=Path, default=None, help="results JSON (the sweep's report with --sweep)")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also put the main rows' table between the bench markers here ({README_SCENES} "
                   f"{README_SPLIT} only)")
    p.add_argument("--docs", type=Path, default=None, help="markdown report")
    p.add_argument("--sweep-report", type=Path, default=None, metavar="SWEEP_JSON",
                   help="a sweep's report whose trials --docs shows under \"How the settings were chosen\"")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="pairs optimized together")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every Peekaboo row (repeatable), e.g. --set model.pretrained=PATH")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="a folder of presets (default: the packaged ones, or $PEEKABOO_CONFIG_DIR)")
    p.add_argument("--cross-attention-threshold", type=float, default=None,
                   help=f"default {CROSS_ATTENTION_THRESHOLD} (or the --tuned sweep's choice)")
    p.add_argument("--tuned", type=Path, default=None, metavar="SWEEP_JSON",
                   help="start every row from a sweep's choices (its default overrides, each kind's optimizer, the "
                   "cross-attention threshold): the --out of a --sweep run")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier (interrupted) run in --out whose settings are unchanged, and "
                   "the finished pairs of a row it was interrupted in")
    p.add_argument("--merge", action="store_true",
                   help="share --out with other processes of the same table (one per core, each with its own "
                   "--methods): each save re-reads --out under a lock and keeps the rows the others saved; implies "
                   "--resume")
    p.add_argument("--sweep", action="store_true", help="run the tuning sweep (tune split only)")
    p.add_argument("--sweep-knobs", nargs="+", default=None, metavar="KEY",
                   help="search only these knobs of the default (from: "
                   f"{' '.join(k for k, _ in SWEEP_STAGES)}) and skip the other mask kinds' learning rates; "
                   "for a quick re-choice after a model change")
    p.add_argument("--sweep-cache", type=Path, default=None,
                   help="finished sweep trials, reused when the sweep is rerun (delete it to start afresh); "
                   "several sweep processes given one cache (one per core or GPU) split the trials between them")
    return p


def read_sweep(path: Path, flag: str = "--tuned") -> dict[str, Any]:
    """A sweep report written by ``--sweep`` (``flag`` names the option it came from, for the error).

    Raises:
        PeekabooError: the file is missing or is not a sweep report.
    """
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeekabooError(f"{flag} {path}: cannot read it ({err}); run the sweep first.") from None
    if not isinstance(report, dict) or "default_overrides" not in report or report.get("split") != "tune":
        raise PeekabooError(f"{flag} {path} is not a tune-split sweep report; pass the --out of a --sweep run.")
    return report


def _read_results(path: Path) -> dict[str, Any] | None:
    """The results JSON at ``path``; None when there is none yet.

    Raises:
        PeekabooError: the file exists but is not a results JSON.
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeekabooError(f"--out {path}: cannot read it as a results file ({err}); move it aside or pass "
                            "another --out.") from None


def update_readme(path: Path, block: str) -> bool:
    """Replace the text between the README's markers (:data:`~peekaboo.bench.report.README_START` ...) in
    ``path`` with ``block``.

    Returns:
        False (with a warning, and nothing written) when the file or a marker is missing.
    """
    return update_marked(path, block, (README_START, README_END))


def run(args: argparse.Namespace, command: str) -> int:
    """Run what ``args`` (from :func:`parser`) asks for, writing only the paths it names.

    Args:
        command: the command line, recorded in the results.

    Returns:
        The exit status: 0, or 2 after a user error (printed as one line).
    """
    setup_logging()
    return exit_status(lambda: _run(args, command),
                       rerun_hint="the finished rows and pairs are saved; rerun with --resume to go on")


def _run(args: argparse.Namespace, command: str) -> int:
    """:func:`run`'s body; user errors propagate as :class:`PeekabooError`."""
    started = dt.datetime.now(dt.UTC)

    def stamp() -> dict[str, Any]:
        return {"command": command, "date": started.isoformat(timespec="seconds"), "machine": machine_info(),
                "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)}

    out, docs = args.out, args.docs
    if args.readme is not None and (args.sweep or args.split != README_SPLIT or args.scenes != README_SCENES):
        raise PeekabooError(f"--readme: the README carries the {README_SCENES} {README_SPLIT} table only; write the "
                            f"{'sweep' if args.sweep else args.split + ' table'} to --out / --docs.")
    if args.sweep:
        if args.split != "tune":
            raise PeekabooError("--sweep tunes on the tune split only; pass --split tune.")
        knobs = {}
        if args.sweep_knobs is not None:
            known = dict(SWEEP_STAGES)
            unknown = [k for k in args.sweep_knobs if k not in known]
            if unknown:
                raise PeekabooError(f"--sweep-knobs: unknown knob {unknown[0]!r}; choose from {' '.join(known)}.")
            knobs = {"stages": [(k, v) for k, v in SWEEP_STAGES if k in args.sweep_knobs], "kind_lrs": {}}
        report = sweep(args.pairs or TUNE_PAIRS, args.batch_size, args.overrides, args.config_dir,
                       cache_path=args.sweep_cache, scenes=args.scenes, **knobs) | stamp()
        if out is not None:
            write_json(report, out)
        print(report["markdown"])
        if out is not None:
            print(f"\nwrote {out}")
        return 0
    if (args.resume or args.merge) and out is None:
        raise PeekabooError(f"{'--merge' if args.merge else '--resume'} keeps the rows of an earlier run's --out; "
                            "pass --out.")
    previous = _read_results(out) if (args.resume or args.merge) else None
    sweep_report = read_sweep(args.sweep_report, "--sweep-report") if args.sweep_report is not None else None

    def save(result: dict[str, Any], partial: bool = True) -> dict[str, Any]:
        report = {"benchmark": args.scenes, **stamp(), "out": None if out is None else str(out), "partial": partial,
                  **result}
        def write(report: dict[str, Any]) -> None:
            if out is not None:
                write_json(report, out)
            if docs is not None:
                docs.parent.mkdir(parents=True, exist_ok=True)
                files.write_text(render_docs(report, sweep_report), docs)

        if out is not None and args.merge:
            # The report and the docs from the merged table, both under the lock: a process that merged earlier
            # cannot write an older table over a newer one.
            with files.locked(out):
                report = merge_saved(report, _read_results(out))
                report["partial"] = "rows_pending" in report or "rows_in_progress" in report
                write(report)
        else:
            write(report)
        return report

    tuned = read_sweep(args.tuned) if args.tuned is not None else {}
    threshold = args.cross_attention_threshold
    if threshold is None:
        threshold = tuned.get("cross_attention_threshold", CROSS_ATTENTION_THRESHOLD)
    robust = args.split == "robust"
    methods = args.methods
    if methods is None:
        wanted = {*(MAIN_ROWS if robust else METHOD_NAMES)}
        if previous is not None:  # a resumed table keeps the rows it has, and those it had still to compute
            wanted |= {*previous.get("methods", {}), *previous.get("rows_pending", ())}
        methods = [name for name in METHOD_NAMES if name in wanted]
    pairs = args.pairs or (ROBUST_PAIRS if robust else DEFAULT_PAIRS)
    result = run_benchmark(args.split, pairs, methods, args.overrides,
                           args.batch_size, args.config_dir, threshold, previous, save,
                           tuned.get("default_overrides", ()), tuned.get("kind_optim"), args.scenes,
                           tuned.get("step_counts"))
    report = save(result, partial=False)
    print(report["table"])
    if out is not None:
        print(f"\nwrote {out}")
    if docs is not None:
        print(f"wrote {docs}")
    waiting = readme_rows_pending(report)
    if args.readme is not None and waiting:
        # With --merge: another process's main rows are still to come; the last one to finish updates the README.
        print(f"{args.readme} left as it was: main rows still to come ({' '.join(waiting)}).")
    elif args.readme is not None and update_readme(args.readme, readme_block(report, _link(docs, args.readme))):
        print(f"updated {args.readme}")
    return 0


def _link(docs: Path | None, readme: Path) -> str | None:
    """``docs`` as a link from ``readme`` (None without docs)."""
    if docs is None:
        return None
    return Path(os.path.relpath(docs.resolve(), readme.resolve().parent)).as_posix()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peekaboo.bench.ablation``: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parser().parse_args(argv), shlex.join(["python", "-m", "peekaboo.bench.ablation", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
