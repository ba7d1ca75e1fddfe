"""The training scenes of a bundled model: rendered once from the ``train`` seed range, cached, and the words and
wrong captions the text conditioning is trained with.

Two scene sets (``Config.scenes``): ``objects`` (:mod:`peekaboo.data.objects`, emoji objects over photographs,
textures and plain colours) and ``shapes`` (:mod:`peekaboo.data.shapes`, flat-coloured shapes). Each scene is a
function of its index alone, so several worker processes render the same scenes as one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from model_training.config import SCENE_SETS, Config
from peekaboo.data import objects, shapes
from peekaboo.data.atlas import load_atlas
from peekaboo.data.captions import CAPTION_FORMS, article

__all__ = ["digest", "load_scenes", "log", "object_negative", "scene_words", "scenes_key", "to_tensor",
           "training_scene"]

# Share of the objects training scenes that hold one object over a plain colour: what Peekaboo's composites look
# like, so the model must know each kind best there.
P_SINGLE_PLAIN = 0.25


def log(msg: str) -> None:
    """Print a timestamped line and flush (the log is tailed while training runs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def digest(obj: object) -> str:
    """A short stable hash of a JSON-able value (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_set(cfg: Config) -> None:
    if cfg.scenes not in SCENE_SETS:
        raise ValueError(f"scenes {cfg.scenes!r}: expected one of {SCENE_SETS}")


def shapes_style(cfg: Config) -> shapes.SceneStyle:
    """The shapes style: ``cfg.train_style`` with ``cfg.caption_forms``, captions within the text encoder's
    positions (less <|startoftext|> and <|endoftext|>)."""
    if cfg.train_style not in shapes.STYLES:
        raise ValueError(f"train_style {cfg.train_style!r}: expected one of {sorted(shapes.STYLES)}")
    return replace(shapes.STYLES[cfg.train_style], caption_forms=cfg.caption_forms,
                   max_caption_words=cfg.max_length - 2)


def training_scene(cfg: Config, index: int) -> tuple[np.ndarray, str]:
    """Training scene ``index``: ``(image (H, W, 3) uint8, caption)``; its layout draws come from its own seed."""
    _check_set(cfg)
    rng = np.random.default_rng([cfg.seed, 0, index])
    seed = shapes.scene_seed("train", index)
    if cfg.scenes == "objects":
        style = replace(objects.STANDARD, max_caption_words=cfg.max_length - 2)
        single = rng.random() < P_SINGLE_PLAIN
        scene = objects.make_scene(seed, cfg.image_size, style, n_objects=1 if single else None,
                                   background="plain" if single else None)
        return scene.image, scene.caption
    counts = np.arange(1, len(cfg.p_objects) + 1)
    n_objects = int(rng.choice(counts, p=cfg.p_objects))
    distractor = None
    if n_objects >= 2 and rng.random() < cfg.p_distractor:
        distractor = ("same_colour", "same_shape")[int(rng.integers(2))]
    scene = shapes.make_scene(seed, cfg.image_size, n_objects, distractor, shapes_style(cfg))
    return scene.image, scene.caption


def scenes_key(cfg: Config) -> dict:
    """Everything the cached training scenes depend on (a cache made with other values is re-rendered)."""
    _check_set(cfg)
    key = {"seed": cfg.seed, "n_scenes": cfg.n_scenes, "image_size": cfg.image_size, "max_length": cfg.max_length}
    if cfg.scenes == "objects":
        atlas = load_atlas()
        return {**key, "scenes": "objects", "p_single_plain": P_SINGLE_PLAIN, "kinds": list(atlas.names),
                "style": repr(objects.STANDARD)}
    # The shapes key is the one the shipped shapes model's cache was made with.
    return {**key, "p_objects": list(cfg.p_objects), "p_distractor": cfg.p_distractor,
            "style": json.loads(json.dumps(asdict(shapes_style(cfg))))}


def _render(args: tuple[Config, int, int]) -> tuple[np.ndarray, list[str]]:
    """Training scenes ``start .. stop - 1``: uint8 images (N, H, W, 3) and captions (one worker's chunk)."""
    cfg, start, stop = args
    scenes = [training_scene(cfg, i) for i in range(start, stop)]
    return np.stack([image for image, _ in scenes]), [caption for _, caption in scenes]


def load_scenes(cfg: Config, work: Path, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Render (or load from the cache in ``work``) the ``n_scenes`` training scenes: uint8 images and captions.

    The cache is reused only when it was rendered with the same settings (:func:`scenes_key`).
    """
    images_path, captions_path = work / "scenes_images.npy", work / "scenes_captions.json"
    key_path = work / "scenes_key.json"
    key = digest(scenes_key(cfg))
    if images_path.exists() and captions_path.exists() and key_path.exists() and key_path.read_text() == key:
        images = np.load(images_path)
        captions = json.loads(captions_path.read_text())
        if len(images) == cfg.n_scenes == len(captions):
            return images, captions
    log(f"rendering {cfg.n_scenes} {cfg.scenes} training scenes (no cache with key {key})")
    t0 = time.time()
    chunk = 2_000
    jobs = [(cfg, start, min(start + chunk, cfg.n_scenes)) for start in range(0, cfg.n_scenes, chunk)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_render, jobs)
    else:
        parts = [_render(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    np.save(images_path, images)
    captions_path.write_text(json.dumps(captions))
    key_path.write_text(key)
    log(f"rendered {cfg.n_scenes} training scenes in {time.time() - t0:.1f}s")
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1], the range diffusers VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def scene_words(cfg: Config) -> list[str]:
    """The words that get one token each, in vocabulary order (later words never renumber earlier ones)."""
    _check_set(cfg)
    if cfg.scenes == "objects":
        name_words = [w for name in load_atlas().names for w in name.split()]
        return list(dict.fromkeys([*cfg.extra_words, *cfg.added_words, "an", *name_words]))
    return list(dict.fromkeys([*cfg.extra_words, *shapes.COLOURS, *shapes.SHAPES, *cfg.added_words]))


def object_negative(caption: str, rng: np.random.Generator, lookalike_share: float,
                    omission_share: float = 0.0) -> str:
    """A wrong caption for the scene ``caption`` describes.

    With probability ``omission_share``, when the caption names two or more objects, one of them is left out (the
    rest listed in a caption form drawn uniformly, so the form says nothing): a caption that does not name everything
    the scene holds. Otherwise one object's name is replaced by a kind the scene does not hold: one of its look-alike
    partners with probability ``lookalike_share`` (when one is free), else any other kind, the article before the
    name following the new name ("a tomato" -> "an apple").

    Raises:
        ValueError: the caption names no object (empty captions get no negative).
    """
    atlas = load_atlas()
    names = objects.parse_caption(caption)
    if not names:
        raise ValueError(f"caption {caption!r} names no object")
    if omission_share > 0 and len(names) >= 2 and rng.random() < omission_share:
        left_out = int(rng.integers(len(names)))
        kept = names[:left_out] + names[left_out + 1:]
        form = CAPTION_FORMS[int(rng.integers(len(CAPTION_FORMS)))]
        return objects.caption_for(kept, form, objects.STANDARD.max_caption_words)
    old = names[int(rng.integers(len(names)))]
    partners = [n for n in atlas.by_name[old].lookalikes if n not in names]
    others = [n for n in atlas.names if n not in names]
    pool = partners if partners and rng.random() < lookalike_share else others
    new = pool[int(rng.integers(len(pool)))]
    words = caption.replace(",", " ,").split()
    old_words = old.split()
    for i in range(len(words) - len(old_words) + 1):  # the name's one occurrence (a scene holds a kind once)
        if words[i:i + len(old_words)] == old_words:
            if i > 0 and words[i - 1] in ("a", "an"):
                words[i - 1] = article(new)
            words[i:i + len(old_words)] = new.split()
            break
    return " ".join(words).replace(" ,", ",")
