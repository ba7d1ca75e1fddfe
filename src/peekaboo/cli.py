"""Command-line entry points: parse ``key=value`` arguments, run, and turn user errors into one line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peekaboo.config import help_text, load_config
from peekaboo.errors import PeekabooError

USAGE = {
    "predict": "python predict.py image=PATH prompt=\"a red circle\" [prompt=...] [model=sd15] [key=value ...]",
    "train": "python train.py data=shapes run.name=NAME [trainer.devices=N] [key=value ...]",
}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Lightning announces hardware for every pair's Trainer; one pair = one Trainer, so keep it quiet.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import diffusers
    import transformers

    # Weight-loading progress bars and deprecation chatter would bury the one line per prompt users read.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def run_cli(task: str, schema: type, run: Callable[[Any, list[str]], Any], argv: Sequence[str] | None,
            config_dir: Path | None) -> int:
    """Parse, run, and map :class:`PeekabooError` to ``error: ...`` on stderr with exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help=true", "help") for a in args):
        print(f"usage: {USAGE[task]}\n\nConfig keys (defaults; configs/{task}.yaml and group files override "
              f"them):\n{help_text(schema)}")
        return 0
    setup_logging()
    try:
        cfg = load_config(schema, args, config_dir, task)
        run(cfg, [Path(sys.argv[0]).name, *args])
    except PeekabooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _default_config_dir() -> Path | None:
    env = os.environ.get("PEEKABOO_CONFIG_DIR")
    if env:
        return Path(env)
    cwd = Path.cwd() / "configs"
    return cwd if cwd.is_dir() else None


def predict_main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """``predict.py``: segment one image."""
    from peekaboo.config import PredictConfig
    from peekaboo.predict import predict

    def run(cfg, cmd):
        for out in predict(cfg, cmd):
            extra = "".join(f" {p.name}" for p in (out.rgba, out.edited, out.edit_compare) if p is not None)
            print(f"{out.prompt!r}: {out.folder}  (mask.png alpha.png overlay.png cutout.png{extra}; "
                  f"mask covers {100 * out.area:.1f}%)")

    return run_cli("predict", PredictConfig, run, argv, config_dir or _default_config_dir())


def train_main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """``train.py``: optimize every pair of a dataset (resumes when rerun)."""
    from peekaboo.config import TrainConfig
    from peekaboo.runner import miou_text, run

    def go(cfg, cmd):
        summary = run(cfg, cmd)
        root = Path(cfg.run.root) / cfg.run.name
        print(f"{root}: {summary['done']} done, {summary['failed']} failed of {summary['pairs']} pairs; "
              f"mIoU {miou_text(summary)}; summary in {root / 'summary.json'}")

    return run_cli("train", TrainConfig, go, argv, config_dir or _default_config_dir())
