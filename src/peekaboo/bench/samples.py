"""A labelled sample grid from the bundled shapes model, and its sanity checks.

:func:`sample_grid` samples a few captions with a fixed generator (64x64, DDIM, classifier-free guidance) from
a ``StableDiffusionPipeline`` (loaded as users will) and returns a labelled grid; ``scripts/sample_grid.py``
saves it to ``docs/samples.png``. :func:`run_checks` reports, on scenes of the ``eval`` split:

* the VAE round trip (posterior mean -> decoder) PSNR and the posterior std vs the latent spread;
* the text-conditioning check: the UNet's denoising loss at moderate timesteps with the scene's true
  caption vs a wrong caption (one colour word swapped), on identical noise. The true caption must
  give the lower loss, otherwise the model ignores its prompt.

The checks return their report as lines of text; the script prints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from peekaboo.data.shapes import COLOURS, ShapeObject, caption_for, make_scene, scene_seed


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


def wrong_caption(objects: tuple[ShapeObject, ...], rng: np.random.Generator) -> str:
    """The caption with one object's colour replaced by a colour no object of that shape has."""
    k = int(rng.integers(len(objects)))
    taken = {(o.shape, o.colour) for o in objects}
    choices = [c for c in COLOURS if c != objects[k].colour and (objects[k].shape, c) not in taken]
    new = ShapeObject(shape=objects[k].shape, colour=str(rng.choice(choices)), mask=objects[k].mask)
    return caption_for(tuple(new if i == k else o for i, o in enumerate(objects)))


@torch.no_grad()
def run_checks(pipe: StableDiffusionPipeline) -> list[str]:
    """The VAE round-trip numbers and the true-vs-wrong-caption denoising losses, as lines of a report."""
    scenes = [make_scene(scene_seed("eval", i)) for i in range(GRID.n_check_scenes)]
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    posterior = pipe.vae.encode(x).latent_dist
    recon = pipe.vae.decode(posterior.mean).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(1 / mse)
    lines = [
        f"VAE posterior-mean round trip on {len(scenes)} eval scenes: PSNR mean {psnr.mean():.2f} dB, "
        f"min {psnr.min():.2f} dB; posterior std {posterior.std.mean():.4f} vs latent-mean std "
        f"{posterior.mean.std():.4f} (ratio {posterior.std.mean() / posterior.mean.std():.3f})"
    ]

    rng = np.random.default_rng(GRID.seed)
    z0 = posterior.mean * pipe.vae.config.scaling_factor
    captions = [s.caption for s in scenes]
    wrong = [wrong_caption(s.objects, rng) for s in scenes]

    def embed(texts: list[str]) -> torch.Tensor:
        ids = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids)[0]

    emb_true, emb_wrong, emb_empty = embed(captions), embed(wrong), embed([""] * len(scenes))
    abar = pipe.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(GRID.seed)
    lines.append(f"denoising MSE per timestep (mean over {len(scenes)} eval scenes x {GRID.noise_draws} noise draws):")
    wins_total, count_total = 0, 0
    for t_val in GRID.check_timesteps:
        losses = {"true": 0.0, "wrong": 0.0, "empty": 0.0}
        wins = torch.zeros(len(scenes))
        for _ in range(GRID.noise_draws):
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.full((len(scenes),), t_val)
            zt = abar[t_val].sqrt() * z0 + (1 - abar[t_val]).sqrt() * noise
            per = {}
            for name, emb in (("true", emb_true), ("wrong", emb_wrong), ("empty", emb_empty)):
                pred = pipe.unet(zt, t, encoder_hidden_states=emb).sample
                per[name] = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
                losses[name] += per[name].mean().item() / GRID.noise_draws
            wins += (per["true"] < per["wrong"]).float()
        wins_total += int(wins.sum())
        count_total += len(scenes) * GRID.noise_draws
        lines.append(
            f"  t={t_val}: true {losses['true']:.4f}  wrong-colour {losses['wrong']:.4f}  "
            f"empty {losses['empty']:.4f}  (true < wrong in {int(wins.sum())}/{len(scenes) * GRID.noise_draws})"
        )
    lines.append(f"true caption beats wrong caption in {wins_total}/{count_total} (scene, noise, t) cases")
    examples = [f"{c!r} -> {w!r}" for c, w in zip(captions[:3], wrong[:3], strict=True)]
    lines.append("\n  ".join(["example wrong captions:", *examples]))
    return lines
