"""The objects model's sample grid and per-word conditioning check, written to docs/.

Computation is :mod:`model_training.object_checks`; this script loads the pipeline with
``StableDiffusionPipeline.from_pretrained`` (as users will) and owns where its outputs go: the grid
(``docs/samples_objects.png``) and the report (``docs/MODEL_CHECKS.md``, rewritten whole). ``--out-dir`` writes
both somewhere else instead (a model still in training, say).

Example::

    python scripts/object_model_report.py --model /work/bundled_model_work/objects-ldm --out-dir /tmp/check
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from model_training.object_checks import (
    CHECKS,
    conditioning_by_kind,
    object_sample_grid,
    omission_check,
    ranking_check,
)
from model_training.scenes import to_tensor

from peekaboo.data import objects
from peekaboo.diffusion.checks import BUNDLED_PATHS

REPO_ROOT = Path(__file__).resolve().parents[1]
# The share of checks the right word must win for each kind (issue: "every object word is read").
GOAL = 0.8


@torch.no_grad()
def vae_psnr(pipe: StableDiffusionPipeline, n: int = 64) -> float:
    """Mean posterior-mean round-trip PSNR (dB) on the first ``n`` eval scenes."""
    scenes = [objects.make_scene(objects.scene_seed("eval", i), CHECKS.size).image for i in range(n)]
    x = to_tensor(np.stack(scenes))
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def main() -> None:
    """Parse the command line, write the grid and the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_PATHS["bundled"])
    parser.add_argument("--out-dir", type=Path, default=None, help="instead of docs/ (grid and report)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out_dir = args.out_dir or REPO_ROOT / "docs"
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    grid_path = out_dir / "samples_objects.png"
    object_sample_grid(pipe).save(grid_path)
    rows, shares = conditioning_by_kind(pipe)
    omission_wins, omission_cost = omission_check(pipe)
    ranking = ranking_check(pipe)
    read = sum(share >= GOAL for share in shares.values())
    command = shlex.join(["python", "scripts/object_model_report.py", *sys.argv[1:]])
    report = [
        "# The objects model's checks", "",
        f"Written by `{command}` (model `{args.model.name}`); every figure below comes from that run.", "",
        f"![a sample of every object word]({grid_path.name})", "",
        f"VAE posterior-mean round trip on 64 eval scenes: PSNR {vae_psnr(pipe):.2f} dB.", "",
        "Per-word conditioning: the denoising error under \"a <object>\" against each look-alike partner's, on "
        f"{CHECKS.scenes_per_background} scenes of the one object over each of {', '.join(CHECKS.backgrounds)} "
        f"backgrounds, timesteps {', '.join(map(str, CHECKS.timesteps))}, {CHECKS.noise_draws} noise draws each "
        "(identical noise for every caption).", "",
        *rows, "",
        f"The right word wins in at least {GOAL:.0%} of its checks for {read} of {len(shares)} object kinds.", "",
        f"Omissions: on two-object scenes ({CHECKS.omission_scenes} over each of {' and '.join(CHECKS.backgrounds)} "
        "backgrounds, the same timesteps and draws), the caption naming both objects against each caption naming one "
        f"of them. The full caption denoises better in {omission_wins:.0%} of the checks, and a one-object caption's "
        f"error is {omission_cost:+.1%} on average. A model that wins these has learnt that an object the caption "
        "leaves out should not be there, which is what lets the dream loss take the objects a prompt does not name "
        "out of the mask.", "",
        f"Ranking: on {CHECKS.ranking_scenes} scenes of 2 to 3 objects over photographs, each object's true cut-out "
        f"over {CHECKS.ranking_backgrounds} random plain colours, scored under a prompt naming one object by the "
        f"guided dream objective (guidance {CHECKS.ranking_guidance:g}): the named object's cut-out scores best in "
        f"{ranking:.0%} of the cases. That is the ceiling of a start that ranks object-shaped proposals by the model.",
    ]
    (out_dir / "MODEL_CHECKS.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out_dir / 'MODEL_CHECKS.md'} and {grid_path}; {read}/{len(shares)} kinds read")


if __name__ == "__main__":
    main()
