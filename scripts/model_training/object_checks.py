"""The objects model's sample grid (every object word) and its per-word conditioning check.

The check asks, for each object kind, whether the model reads its word: on scenes of that one object over a plain
colour (what Peekaboo's composites look like) and over a photograph, the UNet's denoising error under "a <kind>"
must be lower than under "a <partner>" for each of its look-alike partners, on identical noise and timesteps. A
kind whose word loses to a partner's is a word Peekaboo cannot ground: it would settle on either object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from model_training.denoising import denoising_errors, embed, encode
from peekaboo.data import objects
from peekaboo.data.atlas import load_atlas
from peekaboo.data.captions import article

__all__ = ["ObjectChecks", "conditioning_by_kind", "object_sample_grid", "omission_check", "ranking_check"]


@dataclass(frozen=True)
class ObjectChecks:
    """Sampling and check settings."""

    samples_per_kind: int = 2
    steps: int = 40
    guidance: float = 5.0
    seed: int = 0
    size: int = 64
    cell: int = 96  # pixels per sample in the saved grid (nearest-neighbour upscaled)
    columns: int = 8  # samples per grid row
    label_height: int = 16
    # check: scenes per kind and background, timesteps and noise draws per scene
    scenes_per_background: int = 4
    backgrounds: tuple[str, ...] = ("plain", "photo")
    timesteps: tuple[int, ...] = (300, 500, 700)
    noise_draws: int = 2
    omission_scenes: int = 16  # two-object scenes per background of the omission check
    ranking_scenes: int = 24  # photo scenes of 2 to 3 objects in the ranking check
    ranking_guidance: float = 15.0  # the guidance scale of the ranking check's dream objective
    ranking_backgrounds: int = 4  # random plain colours each object is composited over


CHECKS = ObjectChecks()
# Scene seeds of the checks: the eval split's seed block, far past the indices eval_pairs uses.
_CHECK_OFFSET = 50_000
_OMISSION_OFFSET = 90_000
_RANKING_OFFSET = 95_000


def object_sample_grid(pipe: StableDiffusionPipeline, checks: ObjectChecks = CHECKS) -> Image.Image:
    """``samples_per_kind`` samples of ``"a <kind>"`` for every kind of the atlas, labelled, ``columns`` a row."""
    names = load_atlas().names
    cells: list[tuple[str, Image.Image]] = []
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(checks.seed + i)
        prompt = f"{article(name)} {name}"
        images = pipe([prompt] * checks.samples_per_kind, height=checks.size, width=checks.size,
                      num_inference_steps=checks.steps, guidance_scale=checks.guidance, generator=generator).images
        cells += [(name, image) for image in images]
    rows = -(-len(cells) // checks.columns)
    height = checks.cell + checks.label_height
    grid = Image.new("RGB", (checks.columns * checks.cell, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for k, (name, image) in enumerate(cells):
        x, y = (k % checks.columns) * checks.cell, (k // checks.columns) * height
        grid.paste(image.resize((checks.cell, checks.cell), Image.NEAREST), (x, y))
        draw.text((x + 4, y + checks.cell + 2), name, fill="black")
    return grid


def _check_scenes(name: str, checks: ObjectChecks) -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 scenes holding one ``name`` object, for each background of the check."""
    out = []
    kind_index = load_atlas().names.index(name)
    for b, background in enumerate(checks.backgrounds):
        for j in range(checks.scenes_per_background):
            # Scenes of one object are drawn until one holds this kind (the kind is the seed's own draw).
            for attempt in range(1000):
                seed = objects.scene_seed("eval", _CHECK_OFFSET + ((kind_index * 7 + b) * 97 + j) * 1000 + attempt)
                scene = objects.make_scene(seed, checks.size, n_objects=1, background=background)
                if scene.objects[0].kind == name:
                    out.append(scene.image)
                    break
            else:
                raise RuntimeError(f"no single-{name} scene in 1000 seeds")
    return out


@torch.no_grad()
def conditioning_by_kind(pipe: StableDiffusionPipeline,
                         checks: ObjectChecks = CHECKS) -> tuple[list[str], dict[str, float]]:
    """Per kind, how often the right word's denoising error is below each look-alike partner's.

    Returns:
        Markdown lines (one table row per kind: the right caption's error, the worst partner's relative cost, and
        the share of (scene, partner, timestep, draw) checks the right word wins) and ``{kind: win share}``.
    """
    atlas = load_atlas()
    gen = torch.Generator().manual_seed(checks.seed)
    rows = ["| object | look-alike partners | error, right word | closest partner's extra error | right word wins |",
            "|---|---|---|---|---|"]
    shares: dict[str, float] = {}
    for kind in atlas.kinds:
        z0 = encode(pipe, np.stack(_check_scenes(kind.name, checks)))  # (N, 4, h, w)
        n = len(z0)
        texts = [f"{article(kind.name)} {kind.name}", *(f"{article(p)} {p}" for p in kind.lookalikes)]
        emb = [embed(pipe, [text] * n) for text in texts]
        errors = torch.zeros(len(texts), n)  # mean over timesteps and draws
        wins = total = 0
        for t_val in checks.timesteps:
            for _ in range(checks.noise_draws):
                per = denoising_errors(pipe, z0, emb, t_val, gen)  # (T, N)
                errors += per / (len(checks.timesteps) * checks.noise_draws)
                wins += int((per[0] < per[1:]).sum())
                total += per[1:].numel()
        shares[kind.name] = wins / total
        mean = errors.mean(1)
        worst = (mean[1:] / mean[0] - 1).min().item()
        rows.append(f"| {kind.name} | {', '.join(kind.lookalikes)} | {mean[0]:.4f} | {worst:+.1%} | "
                    f"{wins}/{total} ({shares[kind.name]:.0%}) |")
    return rows, shares


@torch.no_grad()
def omission_check(pipe: StableDiffusionPipeline, checks: ObjectChecks = CHECKS) -> tuple[float, float]:
    """How often a two-object scene denoises better under the caption naming both objects than under a caption
    naming one of them, on identical noise and timesteps.

    A model that wins these has learnt that an object the caption leaves out should not be there: the evidence
    the dream loss needs to take such an object out of the mask. The scenes hold two different kinds, over each of
    the check's backgrounds.

    Returns:
        The share of (scene, left-out object, timestep, draw) checks the full caption wins, and the one-object
        captions' mean error relative to the full caption's, minus one.
    """
    gen = torch.Generator().manual_seed(checks.seed)
    scenes, full, single = [], [], []
    for b, background in enumerate(checks.backgrounds):
        for j in range(checks.omission_scenes):
            scene = objects.make_scene(objects.scene_seed("eval", _OMISSION_OFFSET + b * 1000 + j), checks.size,
                                       n_objects=2, background=background)
            names = [o.kind for o in scene.objects]
            scenes.append(scene.image)
            full.append(objects.caption_for(names))
            single.append([f"{article(n)} {n}" for n in names])
    z0 = encode(pipe, np.stack(scenes))
    emb = [embed(pipe, full), embed(pipe, [s[0] for s in single]), embed(pipe, [s[1] for s in single])]
    wins = total = 0
    errors = torch.zeros(3)
    for t_val in checks.timesteps:
        for _ in range(checks.noise_draws):
            per = denoising_errors(pipe, z0, emb, t_val, gen)  # (3, N)
            wins += int((per[0] < per[1:]).sum())
            total += per[1:].numel()
            errors += per.mean(1)
    return wins / total, float((errors[1:].mean() / errors[0]) - 1)


@torch.no_grad()
def ranking_check(pipe: StableDiffusionPipeline, checks: ObjectChecks = CHECKS) -> float:
    """How often the dream objective prefers the named object's cut-out to every other object's.

    For each object of scenes holding 2 to 3 objects over photographs, each object's visible pixels (its true mask)
    are composited over random plain colours, as Peekaboo composites, and scored under a prompt naming one object by
    the objective classifier-free guidance descends, ``s * err_cond - (s - 1) * err_uncond`` (``s`` the guidance
    scale; both errors on one noise draw, at the check's timesteps). A win is the named object's cut-out scoring
    lowest. This is the ceiling of a start that ranks object-shaped proposals by the model; an optimization from
    alpha 0.5 must also find the object.

    Returns:
        The share of (scene, named object) cases won.
    """
    gen = torch.Generator().manual_seed(checks.seed)
    s, k = checks.ranking_guidance, checks.ranking_backgrounds
    wins = total = 0
    for j in range(checks.ranking_scenes):
        scene = objects.make_scene(objects.scene_seed("eval", _RANKING_OFFSET + j), checks.size,
                                   n_objects=2 + j % 2, background="photo")
        masks = np.stack([o.mask for o in scene.objects])[:, :, :, None]  # (M, H, W, 1) bool
        colours = torch.randint(0, 256, (k, 1, 1, 1, 3), generator=gen).numpy().astype(np.uint8)  # (K, 1, 1, 1, 3)
        cutouts = np.where(masks, scene.image, colours).reshape(-1, *scene.image.shape)  # (K * M, H, W, 3)
        z0 = encode(pipe, cutouts)
        uncond = embed(pipe, [""] * len(z0))
        for index, named in enumerate(scene.objects):
            cond = embed(pipe, [f"{article(named.kind)} {named.kind}"] * len(z0))
            score = torch.zeros(len(z0))
            for t_val in checks.timesteps:
                for _ in range(checks.noise_draws):
                    err_c, err_u = denoising_errors(pipe, z0, [cond, uncond], t_val, gen)  # (K * M,) each, colour-major
                    score += s * err_c - (s - 1) * err_u
            per_object = score.view(k, len(masks)).mean(0)  # (M,)
            wins += int(per_object.argmin() == index)
            total += 1
    return wins / total
