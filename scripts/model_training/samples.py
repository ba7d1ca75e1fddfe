"""A labelled sample grid from the bundled shapes model, and its sanity checks.

:func:`sample_grid` samples a few captions with a fixed generator (64x64, DDIM, classifier-free guidance) from
a ``StableDiffusionPipeline`` (loaded as users will) and returns a labelled grid; ``scripts/sample_grid.py``
saves it to ``docs/samples.png``. :func:`run_checks` reports, on scenes of the ``eval`` split:

* the VAE round trip (posterior mean -> decoder) PSNR and the posterior std vs the latent spread;
* the text-conditioning check, per caption word kind: the UNet's denoising loss at moderate timesteps with
  the scene's true caption vs the caption with one object's colour word swapped, vs one with one object's
  shape word swapped, vs the empty caption, on identical noise. The true caption must give the lower loss
  against both wrong ones, otherwise the model ignores that kind of word (a segmenter built on it cannot
  tell a red square from a yellow one, or a square from a circle of the same colour).

The checks return their report as lines of text; the script prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from model_training.denoising import denoising_errors, embed
from model_training.scenes import to_tensor
from peekaboo.data.shapes import COLOURS, SHAPES, STYLES, ShapeObject, caption_for, make_scene, scene_seed


@dataclass(frozen=True)
class GridConfig:
    """Sampling and check settings."""

    captions: tuple[str, ...] = (
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle",
        "a purple square",
        "a blue square and a green triangle",
        "a red triangle and a yellow square",
        "a purple circle and a red circle and a blue triangle",
    )
    samples_per_caption: int = 4
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    size: int = 64
    cell: int = 128  # pixels per sample in the saved grid (nearest-neighbour upscaled)
    label_width: int = 200
    # checks
    n_check_scenes: int = 64
    check_timesteps: tuple[int, ...] = (300, 500, 700)
    noise_draws: int = 4


#: The caption word kinds the conditioning check swaps, one at a time.
WORD_KINDS: tuple[str, ...] = ("colour", "shape")

#: The scene style of each split the checks can run on (the splits' own styles, see peekaboo.data.shapes).
CHECK_STYLES: dict[str, str] = {"eval": "classic", "robust": "wide"}


GRID = GridConfig()


def sample_grid(pipe: StableDiffusionPipeline) -> Image.Image:
    """Sample ``samples_per_caption`` images per caption, as one labelled grid (a row per caption)."""
    rows = []
    for i, caption in enumerate(GRID.captions):
        generator = torch.Generator().manual_seed(GRID.seed + i)
        images = pipe(
            [caption] * GRID.samples_per_caption,
            height=GRID.size,
            width=GRID.size,
            num_inference_steps=GRID.steps,
            guidance_scale=GRID.guidance,
            generator=generator,
        ).images
        rows.append((caption, images))
    n = GRID.samples_per_caption
    grid = Image.new("RGB", (GRID.label_width + n * GRID.cell, len(rows) * GRID.cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (caption, images) in enumerate(rows):
        # Wrap long captions at " and " so they fit the label column.
        label = caption.replace(" and ", "\nand ")
        draw.multiline_text((6, r * GRID.cell + 6), label, fill="black", spacing=4)
        for c, image in enumerate(images):
            cell = image.resize((GRID.cell, GRID.cell), Image.NEAREST)
            grid.paste(cell, (GRID.label_width + c * GRID.cell, r * GRID.cell))
    return grid


def swap_word(objects: tuple[ShapeObject, ...], kind: str, rng: np.random.Generator) -> tuple[ShapeObject, ...]:
    """``objects`` with one object's colour (``kind="colour"``) or shape (``kind="shape"``) replaced by one
    that no object of the scene has in that combination, so the swapped caption describes another scene."""
    k = int(rng.integers(len(objects)))
    taken = {(o.shape, o.colour) for o in objects}
    old = objects[k]
    if kind == "colour":
        choices = [c for c in COLOURS if c != old.colour and (old.shape, c) not in taken]
        new = ShapeObject(shape=old.shape, colour=str(rng.choice(choices)), mask=old.mask)
    elif kind == "shape":
        choices = [sh for sh in SHAPES if sh != old.shape and (sh, old.colour) not in taken]
        new = ShapeObject(shape=str(rng.choice(choices)), colour=old.colour, mask=old.mask)
    else:
        raise ValueError(f"unknown word kind {kind!r}; expected one of {WORD_KINDS}")
    return tuple(new if i == k else o for i, o in enumerate(objects))


def wrong_caption(objects: tuple[ShapeObject, ...], rng: np.random.Generator, kind: str = "colour") -> str:
    """The ``"and"`` caption of ``objects`` with one word of ``kind`` swapped (see :func:`swap_word`)."""
    return caption_for(swap_word(objects, kind, rng))


@torch.no_grad()
def run_checks(pipe: StableDiffusionPipeline, split: str = "eval") -> list[str]:
    """The VAE round-trip numbers and the per-word-kind conditioning table, as lines of a report (markdown)."""
    style = STYLES[CHECK_STYLES[split]]
    scenes = [make_scene(scene_seed(split, i), style=style) for i in range(GRID.n_check_scenes)]
    x = to_tensor(np.stack([s.image for s in scenes]))
    posterior = pipe.vae.encode(x).latent_dist
    recon = pipe.vae.decode(posterior.mean).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(1 / mse)
    lines = [
        f"VAE posterior-mean round trip on {len(scenes)} {split} scenes: PSNR mean {psnr.mean():.2f} dB, "
        f"min {psnr.min():.2f} dB; posterior std {posterior.std.mean():.4f} vs latent-mean std "
        f"{posterior.mean.std():.4f} (ratio {posterior.std.mean() / posterior.mean.std():.3f})",
        "",
    ]
    z0 = posterior.mean * pipe.vae.config.scaling_factor  # [N,4,h,w]
    # Every caption in the one "and" form and in the scene's object order, so the true and the swapped
    # captions differ in exactly one word.
    captions = {"true": [caption_for(s.objects) for s in scenes]}
    for kind in WORD_KINDS:
        rng = np.random.default_rng([GRID.seed, WORD_KINDS.index(kind)])
        captions[kind] = [wrong_caption(s.objects, rng, kind) for s in scenes]
    captions["empty"] = [""] * len(scenes)
    table = conditioning_table(pipe, z0, captions)
    lines += [f"Denoising MSE per timestep, mean over {len(scenes)} {split} scenes x {GRID.noise_draws} noise draws; "
              "a wrong word's cost is its loss over the true caption's, minus 1:", "", *table]
    examples = [f"{captions['true'][i]!r} -> {captions['colour'][i]!r} / {captions['shape'][i]!r}" for i in range(3)]
    lines += ["", "\n  ".join(["example wrong captions (colour / shape):", *examples])]
    return lines


def conditioning_table(pipe: StableDiffusionPipeline, z0: torch.Tensor, captions: dict[str, list[str]]) -> list[str]:
    """Markdown rows: per timestep, the denoising MSE of each caption set on identical noise, the relative cost
    of each wrong word kind and how often the true caption wins against it. ``z0``: [N,4,h,w] scaled latents;
    ``captions``: ``"true"``, one list per :data:`WORD_KINDS` entry and ``"empty"``, N captions each."""

    emb = {name: embed(pipe, texts) for name, texts in captions.items()}
    gen = torch.Generator().manual_seed(GRID.seed)
    n = z0.shape[0]
    kinds = " | ".join(f"wrong {k}" for k in WORD_KINDS)
    costs = " | ".join(f"{k} cost | true < wrong {k}" for k in WORD_KINDS)
    rows = [f"| t | true caption | {kinds} | empty caption | {costs} |",
            "|" + "---|" * (3 + 3 * len(WORD_KINDS))]
    wins_total = dict.fromkeys(WORD_KINDS, 0)
    for t_val in GRID.check_timesteps:
        loss = {name: torch.zeros(n) for name in emb}  # per scene, mean over draws
        wins = dict.fromkeys(WORD_KINDS, 0)
        for _ in range(GRID.noise_draws):
            per = dict(zip(emb, denoising_errors(pipe, z0, list(emb.values()), t_val, gen), strict=True))
            for name in emb:
                loss[name] += per[name] / GRID.noise_draws
            for kind in WORD_KINDS:
                wins[kind] += int((per["true"] < per[kind]).sum())
        count = n * GRID.noise_draws
        mean = {name: v.mean().item() for name, v in loss.items()}
        wrong = " | ".join(f"{mean[k]:.4f}" for k in WORD_KINDS)
        cost = " | ".join(f"{mean[k] / mean['true'] - 1:+.1%} | {wins[k]}/{count}" for k in WORD_KINDS)
        rows.append(f"| {t_val} | {mean['true']:.4f} | {wrong} | {mean['empty']:.4f} | {cost} |")
        for kind in WORD_KINDS:
            wins_total[kind] += wins[kind]
    total = n * GRID.noise_draws * len(GRID.check_timesteps)
    rows.append("")
    rows.append("True caption beats the wrong one: " + ", ".join(
        f"{k} {wins_total[k]}/{total} ({wins_total[k] / total:.0%})" for k in WORD_KINDS) + ".")
    return rows
