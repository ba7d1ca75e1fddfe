"""Command-line entry points: parse ``key=value`` arguments, run, and return the exit status.

``predict.py`` / ``peekaboo-predict`` and ``train.py`` / ``peekaboo-train`` call these; they behave the same
from any folder, since the presets ship inside the package (:func:`peekaboo.config.preset_dir`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peekaboo.config import help_text, load_config, preset_dir
from peekaboo.errors import exit_status
from peekaboo.utils.console import setup_logging

USAGE = {
    "predict": "python predict.py image=PATH prompt=\"a red circle\" [prompt=...] [model=sd15] [key=value ...]",
    "train": "python train.py data=objects run.name=NAME [trainer.devices=N] [key=value ...]",
}
HELP_FLAGS = ("-h", "--help", "help=true", "help")


def run_cli(task: str, schema: type, body: Callable[[Any, list[str]], int | None], argv: Sequence[str] | None,
            config_dir: Path | None = None) -> int:
    """Parse the config of ``task`` and run ``body(cfg, command line)``; returns the exit status
    (:func:`peekaboo.errors.exit_status` maps user errors and Ctrl-C)."""
    args = list(sys.argv[1:] if argv is None else argv)
    presets = config_dir or preset_dir()
    if any(a in HELP_FLAGS for a in args):
        return exit_status(lambda: _print_help(task, schema, [a for a in args if a not in HELP_FLAGS], presets))
    setup_logging()
    return exit_status(lambda: body(load_config(schema, args, presets, task), [Path(sys.argv[0]).name, *args]))


def _print_help(task: str, schema: type, args: list[str], presets: Path) -> None:
    """``--help``: every config key with the value this command line would run with (the presets, the groups it
    selects and its ``key=value`` overrides merged), and the schema's default beside each value they change."""
    cfg = load_config(schema, args, presets, task, inputs=False, check=False)
    text = (f"usage: {USAGE[task]}\n\nConfig keys, with the values this command runs with ({presets / f'{task}.yaml'}, "
            f"the groups it selects, such as model=sd15, and its key=value overrides; the schema's default is shown "
            f"where they change it):\n{help_text(schema, cfg)}")
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not raise


def predict_main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """``predict.py``: segment one image."""
    from peekaboo.app.predict import predict
    from peekaboo.config import PredictConfig

    def body(cfg, cmd) -> None:
        for out in predict(cfg, cmd):
            names = " ".join(p.name for p in out.files())
            print(f"{out.prompt!r}: {out.folder}  ({names}; mask covers {100 * out.area:.1f}%)")

    return run_cli("predict", PredictConfig, body, argv, config_dir)


def train_main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """``train.py``: optimize every pair of a dataset (resumes when rerun)."""
    from peekaboo.config import TrainConfig
    from peekaboo.runs.layout import SUMMARY_FILE
    from peekaboo.runs.outputs import miou_text
    from peekaboo.runs.runner import run

    def body(cfg, cmd) -> int:
        outcome = run(cfg, cmd)
        summary, root = outcome.summary, outcome.root
        print(f"{root}: {summary['done']} done, {summary['failed']} failed of {summary['pairs']} pairs; "
              f"mIoU {miou_text(summary)}; summary in {root / SUMMARY_FILE}")
        return outcome.status

    return run_cli("train", TrainConfig, body, argv, config_dir)
