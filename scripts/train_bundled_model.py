"""Train one of peekaboo's bundled text-to-image models; see docs/MODEL.md.

``--preset objects`` (the default) is the objects model (src/peekaboo/assets/objects-ldm), ``--preset shapes``
the small shapes model the fastest tests use (src/peekaboo/assets/shapes-ldm). The training itself is
:func:`model_training.pipeline.train`; this script parses the command line and owns the repository paths.
Rerunning the same command resumes from the progress checkpoints in --work (work/bundled_model/<preset>).

Examples::

    python scripts/train_bundled_model.py --stage all --vae-minutes 20 --unet-minutes 240 --workers 2
    python scripts/train_bundled_model.py --preset shapes --stage unet \\
        --continue-from src/peekaboo/assets/shapes-ldm --unet-minutes 100 --out /tmp/train/shapes-ldm-robust
    python scripts/train_bundled_model.py --stage unet --device cuda --workers 16 \\
        --set n_scenes=200000 unet_batch=512 --unet-minutes 6
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from model_training.config import PRESETS, STAGES, config_with
from model_training.pipeline import train

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_ROOT = REPO_ROOT / "work" / "bundled_model"
ASSETS = REPO_ROOT / "src" / "peekaboo" / "assets"
OUTPUTS = {"objects": ASSETS / "objects-ldm", "shapes": ASSETS / "shapes-ldm"}


def main() -> None:
    """Parse the command line and train."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="objects", help="which model")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--vae-minutes", type=float, default=12.0, help="wall-clock budget of stage 1")
    parser.add_argument("--unet-minutes", type=float, default=43.0, help="wall-clock budget of stage 2")
    parser.add_argument("--vae-steps", type=int, default=None, help="exact step count (overrides minutes)")
    parser.add_argument("--unet-steps", type=int, default=None, help="exact step count (overrides minutes)")
    parser.add_argument("--work", type=Path, default=None,
                        help="checkpoints and caches, rerun to resume (default work/bundled_model/<preset>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the finished pipeline folder, replaced (default: the preset's shipped folder)")
    parser.add_argument("--n-scenes", type=int, default=None, help="override Config.n_scenes (quick tests)")
    parser.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="a finished pipeline (e.g. the bundled one): keep its VAE, and train its text encoder + UNet "
        "further for --unet-minutes / --unet-steps (a warm restart of the lr schedule)",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="a finished pipeline whose VAE is kept while a new text encoder + UNet are trained from scratch",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the UNet stage, e.g. cuda")
    parser.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="override Config fields, e.g. unet_batch=256"
    )
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    work = args.work or WORK_ROOT / args.preset
    out = args.out or OUTPUTS[args.preset]
    if args.n_scenes is not None:
        cfg = replace(cfg, n_scenes=args.n_scenes)
    try:
        cfg = config_with(cfg, args.set)
    except ValueError as err:
        parser.error(str(err))
    train(cfg, work, out, args.stage, args.vae_minutes, args.unet_minutes, args.vae_steps,
          args.unet_steps, args.continue_from, command=shlex.join(["python", *sys.argv]),
          vae_from=args.vae_from, device=args.device, workers=args.workers)


if __name__ == "__main__":
    main()
