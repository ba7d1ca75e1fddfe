"""Sample a labelled grid from the bundled shapes model and run its sanity checks.

Computation is :mod:`model_training.samples`; this script loads the pipeline with
``StableDiffusionPipeline.from_pretrained`` (as users will), owns where the grid goes (``docs/samples.png``)
and prints the checks' report (``--checks``, on scenes of the ``eval`` split, or ``--check-split robust``).

Example::

    python scripts/sample_grid.py --checks
    python scripts/sample_grid.py --no-grid --checks --check-split robust
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from model_training.samples import CHECK_STYLES, run_checks, sample_grid

from peekaboo.diffusion.checks import BUNDLED_PATHS

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Parse the command line, save the grid, print the checks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_PATHS["bundled-shapes"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "samples.png")
    parser.add_argument("--checks", action="store_true", help="also run the VAE and conditioning checks")
    parser.add_argument("--check-split", choices=sorted(CHECK_STYLES), default="eval",
                        help="the split whose scenes the checks use")
    parser.add_argument("--no-grid", action="store_true", help="skip sampling the grid")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if not args.no_grid:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(pipe).save(args.out)
        print(f"saved {args.out}")
    if args.checks:
        print(*run_checks(pipe, args.check_split), sep="\n")


if __name__ == "__main__":
    main()
