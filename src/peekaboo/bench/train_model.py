"""Train peekaboo's small bundled text-to-image latent diffusion model on synthetic shape scenes.

The result is a complete Stable-Diffusion-format pipeline (VAE, CLIP text encoder + tokenizer,
conditional UNet, scheduler) small enough to train and run on a CPU, shipped inside the package so
the demo and the tests need no model hub. ``scripts/train_bundled_model.py`` is the command line; it
owns the repository paths, this module only computes (:func:`train`).

Two stages, each resumable and each with its own wall-clock budget (``scenes`` only renders and caches the
training scenes, e.g. on a many-core machine before a GPU run):

1. ``vae``: an ``AutoencoderKL`` (64x64x3 images <-> 16x16x4 latents) trained with an L1 + MSE
   reconstruction loss and a small KL term; afterwards ``scaling_factor`` = 1 / std of the
   posterior-mean latents of training scenes is written into its config.
2. ``unet``: a CLIP text encoder (from scratch) and a ``UNet2DConditionModel`` trained jointly with
   the epsilon-prediction denoising loss of Stable Diffusion on cached latents of training scenes;
   captions are dropped (replaced by ``""``) some of the time for classifier-free guidance, and a caption
   contrast hinge (:func:`contrast_hinge`) asks a caption with one wrong colour or shape word to denoise
   worse than the true one.

The training scenes come from the ``train`` seed range of :mod:`peekaboo.data.shapes`, in the scene
style ``Config.train_style`` (:data:`~peekaboo.data.shapes.WIDE` by default) with the caption forms
``Config.caption_forms``. Progress checkpoints go to the work folder every few minutes; calling
:func:`train` again with the same folder continues from them. The rendered scenes and their latents are
cached there too, keyed by the settings that made them, so a change of style re-renders them.

Training runs on the CPU by default and on any torch device (``device="cuda"``): the batches and noise are
drawn on the CPU from per-step seeds either way, so a run's data does not depend on where it trains.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import multiprocessing
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from peekaboo.data.shapes import CAPTION_FORMS, COLOURS, SHAPES, STYLES, Scene, SceneStyle, make_scene, scene_seed

__all__ = [
    "STAGES",
    "Config",
    "build_tokenizer",
    "config_with",
    "train",
    "training_scene",
    "training_style",
]

#: What :func:`train` can run: the training scenes only (rendered and cached), the VAE only, the text
#: encoder + UNet only (on a finished VAE), or both.
STAGES: tuple[str, ...] = ("scenes", "vae", "unet", "all")


@dataclass(frozen=True)
class Config:
    """All hyperparameters of the bundled model and its training."""

    seed: int = 0
    threads: int = 2
    image_size: int = 64
    # --- training data (all from the "train" seed range) ---
    n_scenes: int = 24_000  # scenes rendered once and cached (pixels for the VAE, latents for the UNet)
    # Scene style (a name in peekaboo.data.shapes.STYLES) and the caption forms drawn from. The first
    # bundled model was trained on "classic" scenes with the "and" form only; "wide" adds border-crossing,
    # smaller and larger objects, 4-object scenes, colour jitter and textured backgrounds.
    train_style: str = "wide"
    caption_forms: tuple[str, ...] = CAPTION_FORMS
    # Training-scene mix: probability of 1, 2, 3, 4 objects (as many as the style allows), and of forcing a
    # hard distractor when there are 2+ objects. Single objects on plain backgrounds are what Peekaboo's
    # composites look like; distractors teach the model to bind each colour to its own shape.
    p_objects: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    p_distractor: float = 0.5
    # --- VAE ---
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 blocks -> 2 downsamplings -> 4x smaller latents
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    vae_batch: int = 16  # more updates per image seen: the VAE is far from converged in its budget
    vae_lr: float = 1e-3
    vae_warmup_steps: int = 50
    vae_mse_weight: float = 1.0  # added to the L1 term: L1 sharpens edges, MSE fixes colours
    # KL weight per latent element (the reconstruction terms are per-pixel means). A LARGER weight
    # pulls the posterior towards N(0, I), i.e. it makes the posterior std LARGER relative to the
    # spread of the means; the weight is kept small and the log-variance starts low instead, so the
    # posterior is nearly deterministic from the first step.
    vae_kl_weight: float = 1e-5
    vae_logvar_init: float = -7.0
    scale_scenes: int = 512  # scenes used to measure the latent std for scaling_factor
    # --- text encoder ---
    text_width: int = 64
    text_ff: int = 256
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    extra_words: tuple[str, ...] = ("a", "and", "on", "background")
    # Words added after the first bundled model: they come after every earlier word in the vocabulary, so
    # the earlier token ids stay as they were and a pipeline trained before can be continued (its token
    # embedding grows by these rows; see _resize_vocabulary). "," needs no entry: every single character
    # is already a token.
    added_words: tuple[str, ...] = ("the",)
    # --- UNet ---
    unet_channels: tuple[int, ...] = (64, 64, 64)  # wider channels were slower per step on 2 CPU cores
    unet_layers_per_block: int = 2
    unet_heads: int = 4  # diffusers' "attention_head_dim" of SD-1 configs is the number of heads
    # Which resolutions (16x16, 8x8, 4x4 latents for 64x64 images) carry cross-attention to the caption.
    unet_cross_attention: tuple[bool, ...] = (False, True, True)
    unet_norm_groups: int = 32  # GroupNorm groups; must divide every unet_channels entry
    unet_batch: int = 64
    unet_lr: float = 3e-4
    weight_decay: float = 1e-2
    unet_warmup_steps: int = 200
    continue_warmup_steps: int = 50  # warm restart (--continue-from): the fresh optimizer's moments settle first
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak lr
    uncond_prob: float = 0.12
    # Hard-negative captions ("caption contrast"). Trained on the denoising loss alone, the model let a wrong
    # colour or shape word cost about as much as no caption (docs/MODEL.md), and Peekaboo then often settled on
    # the wrong object. On `contrast_fraction` of each batch's captioned scenes the same noisy latent is also
    # denoised under the caption with one colour or shape word swapped, and a hinge asks that error to exceed
    # the true caption's by the relative `contrast_margin`; `contrast_weight` 0 turns it off.
    contrast_fraction: float = 0.5
    # Share of the swaps that change a shape word rather than a colour word: shape words are read less well
    # than colour words (the conditioning check), so they get the larger share.
    contrast_shape_share: float = 0.7
    contrast_margin: float = 0.25
    contrast_weight: float = 1.0
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # --- bookkeeping ---
    checkpoint_every_s: float = 180.0
    log_every: int = 25
    encode_batch: int = 256
    save_fp16_above_mb: float = 25.0  # weights are stored in fp16 if fp32 would exceed this


def config_with(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied (values as Python literals; a bare word is a string).

    Raises:
        ValueError: an unknown key, or a value whose type does not match the field's default.
    """
    known = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    changes: dict[str, object] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        default = known[key]
        if isinstance(default, tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default) or (
            isinstance(default, tuple) and default and any(type(v) is not type(default[0]) for v in value)
        ):
            raise ValueError(f"{item!r}: {key} takes a value like {default!r}")
        changes[key] = value
    return replace(cfg, **changes)


# ----------------------------------------------------------------------------------------------
# Utilities
# ----------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Print a timestamped line and flush (the log is tailed while training runs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def lr_at(cfg: Config, step: int, progress: float, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``base_lr``, then cosine decay to ``final_lr_fraction`` of it.

    ``progress`` in [0, 1] is the fraction of the run done: of the step count when one is given,
    else of the wall-clock budget (runs are budgeted in minutes because CPU speed varies).
    """
    warm = min(1.0, (step + 1) / warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * warm * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine)


def run_progress(step: int, elapsed: float, minutes: float, max_steps: int | None) -> float:
    """Fraction of the run done (by steps if a step count is given, else by wall time)."""
    return step / max_steps if max_steps is not None else elapsed / (minutes * 60.0)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file and rename, so an interrupted save never corrupts a checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def batch_indices(cfg: Config, stage: str, step: int, n: int, batch: int) -> np.ndarray:
    """Indices of the training scenes of one step: a function of (seed, stage, step) only, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([cfg.seed, 1 if stage == "vae" else 2, step])
    return rng.integers(0, n, size=batch)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def training_style(cfg: Config) -> SceneStyle:
    """The scene style of the training scenes: ``cfg.train_style`` with ``cfg.caption_forms``, captions
    kept within the text encoder's positions (less <|startoftext|> and <|endoftext|>)."""
    if cfg.train_style not in STYLES:
        raise ValueError(f"train_style {cfg.train_style!r}: expected one of {sorted(STYLES)}")
    return replace(STYLES[cfg.train_style], caption_forms=cfg.caption_forms, max_caption_words=cfg.max_length - 2)


def training_scene(cfg: Config, index: int) -> Scene:
    """Training scene ``index``: its object count and distractor come from the seed's own stream."""
    style = training_style(cfg)
    rng = np.random.default_rng([cfg.seed, 0, index])
    counts = np.arange(1, len(cfg.p_objects) + 1)
    n_objects = int(rng.choice(counts, p=cfg.p_objects))
    distractor = None
    if n_objects >= 2 and rng.random() < cfg.p_distractor:
        distractor = ("same_colour", "same_shape")[int(rng.integers(2))]
    return make_scene(scene_seed("train", index), cfg.image_size, n_objects, distractor, style)


def scenes_key(cfg: Config) -> dict:
    """Everything the cached training scenes depend on (a cache made with other values is re-rendered)."""
    return {
        "seed": cfg.seed,
        "n_scenes": cfg.n_scenes,
        "image_size": cfg.image_size,
        "p_objects": list(cfg.p_objects),
        "p_distractor": cfg.p_distractor,
        "style": json.loads(json.dumps(asdict(training_style(cfg)))),
    }


def _digest(obj: object) -> str:
    """A short stable hash of a JSON-able value (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _render(args: tuple[Config, int, int]) -> tuple[np.ndarray, list[str]]:
    """Training scenes ``start .. stop - 1``: uint8 images [N, H, W, 3] and captions (one worker's chunk)."""
    cfg, start, stop = args
    scenes = [training_scene(cfg, i) for i in range(start, stop)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def load_scenes(cfg: Config, work: Path, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Render (or load from the cache) the ``n_scenes`` training scenes: uint8 images and captions.

    The cache is reused only when it was rendered with the same settings (:func:`scenes_key`); a cache
    without a key (made before scene styles existed) holds classic scenes and is re-rendered. Each scene is a
    function of its index alone, so ``workers`` processes render the same scenes as one.
    """
    images_path, captions_path = work / "scenes_images.npy", work / "scenes_captions.json"
    key_path = work / "scenes_key.json"
    key = _digest(scenes_key(cfg))
    if images_path.exists() and captions_path.exists() and key_path.exists() and key_path.read_text() == key:
        images = np.load(images_path)
        captions = json.loads(captions_path.read_text())
        if len(images) == cfg.n_scenes == len(captions):
            return images, captions
    log(f"rendering {cfg.n_scenes} training scenes (style {cfg.train_style}; no cache with key {key})")
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
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the range diffusers VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable unicode character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word (the last symbol carries the "</w>" end-of-word mark)."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(symbols)) if p in ranks]
        if not candidates:
            break
        first, second = symbols[min(candidates)[1]], symbols[min(candidates)[1] + 1]
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def scene_words(cfg: Config) -> list[str]:
    """The words that get one token each, in vocabulary order (later words never renumber earlier ones)."""
    return list(dict.fromkeys([*cfg.extra_words, *COLOURS, *SHAPES, *cfg.added_words]))


def build_tokenizer(cfg: Config, folder: Path) -> CLIPTokenizer:
    """Write a CLIP BPE vocabulary for the scene words and return the CLIPTokenizer built from it.

    Every scene word becomes a single token; anything else falls back to single characters. Merges
    are added word by word, each new merge joining the first two symbols the current merges leave;
    a new merge ranks after all earlier ones, so it can never break a word finished before it.
    """
    words = scene_words(cfg)
    first = list(dict.fromkeys([*cfg.extra_words, *COLOURS, *SHAPES]))  # the first bundled model's words
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    n_first = 0  # merges of the first words: their tokens come before the special tokens
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(merges)
            merges.append((symbols[0], symbols[1]))
        if word in first:
            n_first = len(merges)
    alphabet = list(_bytes_to_unicode().values())
    merged = ["".join(m) for m in merges]
    # Tokens of added words go after <|startoftext|> / <|endoftext|>, so no earlier id moves (see added_words).
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *merged[:n_first], "<|startoftext|>", "<|endoftext|>"]
    tokens += merged[n_first:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=cfg.max_length,
    )
    for word in [*words, ","]:  # the property the text encoder relies on: one id per scene word
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"{word!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer


def _resize_vocabulary(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, init: Path) -> None:
    """Grow a continued text encoder's token embedding to the new tokenizer's vocabulary.

    Only appending is allowed: every token of the pipeline's own tokenizer must keep its id, so the
    trained rows keep their meaning; the new rows (e.g. "the") start at the mean of the trained ones
    (transformers' ``mean_resizing``) and are learnt by the continuation.

    Raises:
        ValueError: the new vocabulary renumbers a token of the old one, or the positions differ.
    """
    old_vocab = json.loads((init / "tokenizer" / "vocab.json").read_text())
    new_vocab = tokenizer.get_vocab()
    moved = [t for t, i in old_vocab.items() if new_vocab.get(t) != i]
    if moved:
        raise ValueError(
            f"the tokenizer renumbers {len(moved)} tokens of {init} (e.g. {moved[:3]}); only appending is allowed"
        )
    if text_encoder.config.max_position_embeddings != tokenizer.model_max_length:
        raise ValueError(
            f"{init}: text encoder has {text_encoder.config.max_position_embeddings} positions, "
            f"Config.max_length is {tokenizer.model_max_length}"
        )
    old = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        added = sorted(set(new_vocab) - set(old_vocab), key=new_vocab.get)
        log(f"text encoder vocabulary {old} -> {len(tokenizer)} (new tokens {added}, initialised at the mean row)")


def word_kinds(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the colour words and of the shape words (each scene word is one token)."""
    def ids(words) -> torch.Tensor:
        return torch.tensor([tokenizer.convert_tokens_to_ids(w + "</w>") for w in words])
    return ids(COLOURS), ids(SHAPES)


def swap_one_word(
    ids: torch.Tensor, kinds: tuple[torch.Tensor, ...], gen: torch.Generator, kind_weights: tuple[float, ...]
) -> torch.Tensor:
    """``ids`` [B, L] with, in each row, one colour or shape token replaced by another word of its kind: a
    caption that names an object the scene does not have.

    The word kind is drawn with ``kind_weights`` (one per entry of ``kinds``, renormalised over the kinds the
    row holds), then the position uniformly among that kind's tokens, then the new word uniformly among the
    kind's other words. Rows with no such token are returned unchanged. All rows are drawn at once (this runs
    on every training step).
    """
    if len(kind_weights) != len(kinds) or min(kind_weights) < 0 or sum(kind_weights) <= 0:
        raise ValueError(f"kind_weights {kind_weights} must be {len(kinds)} non-negative weights, not all zero")
    out = ids.clone()
    if len(ids) == 0:
        return out
    # word_of[k]: [B, L], the index of each token in kinds[k] (-1: not a word of that kind)
    matches = [ids[..., None] == kind for kind in kinds]  # each [B, L, words of the kind]
    word_of = [m.to(torch.long).argmax(-1).where(m.any(-1), -1) for m in matches]
    present = torch.stack([(w >= 0).any(1) for w in word_of], dim=1)  # [B, K]
    weights = present * torch.tensor(kind_weights, dtype=torch.float)  # [B, K]
    rows = torch.nonzero(weights.sum(1) > 0).flatten()  # [R] rows with a word to swap
    if len(rows) == 0:
        return out
    kind = torch.multinomial(weights[rows], 1, generator=gen).squeeze(1)  # [R]
    words = torch.stack(word_of)[kind, rows]  # [R, L] word indices in the drawn kind
    # A uniform position among the drawn kind's tokens: the largest of uniform scores over those positions.
    scores = torch.rand(words.shape, generator=gen).where(words >= 0, -1.0)
    pos = scores.argmax(1)  # [R]
    old = words[torch.arange(len(rows)), pos]  # [R]
    sizes = torch.tensor([len(k) for k in kinds])[kind]  # [R]
    # Another word of the same kind, uniformly: shift the old index by 1 .. size - 1 (mod size).
    shift = 1 + (torch.rand(len(rows), generator=gen) * (sizes - 1)).long()
    table = torch.nn.utils.rnn.pad_sequence(list(kinds), batch_first=True)  # [K, max words]
    out[rows, pos] = table[kind, (old + shift) % sizes]
    return out


def contrast_hinge(mse_true: torch.Tensor, mse_wrong: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-scene hinge ``relu(margin * sg(mse_true) + mse_true - mse_wrong)`` [N]: zero once the wrong caption's
    denoising error exceeds the true caption's by the relative margin.

    The two errors get equal and opposite gradients, so the only way down is to tell the captions apart: a
    model that merely grew every error would gain nothing. (Pushing the wrong caption's error alone, against a
    detached target, did exactly that: the denoising loss rose tenfold within 100 steps.)
    """
    return F.relu(margin * mse_true.detach() + mse_true - mse_wrong)


def tokenize(cfg: Config, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, max_length), padded with <|endoftext|> like Stable Diffusion."""
    return tokenizer(
        captions, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def make_vae(cfg: Config) -> AutoencoderKL:
    """The AutoencoderKL: 64x64x3 <-> 16x16x4, its log-variance output starting low (see Config)."""
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
    )
    with torch.no_grad():  # quant_conv outputs [mean, logvar]; bias the logvar half downwards
        vae.quant_conv.bias[cfg.latent_channels :].fill_(cfg.vae_logvar_init)
    return vae


def make_text_encoder(cfg: Config, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer of width 64 sized to the scene vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_ff,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(cfg: Config) -> UNet2DConditionModel:
    """The latent UNet, with cross-attention at the resolutions ``cfg.unet_cross_attention`` names."""
    if len(cfg.unet_cross_attention) != len(cfg.unet_channels):
        raise ValueError(
            f"unet_cross_attention {cfg.unet_cross_attention} needs one flag per level of unet_channels "
            f"{cfg.unet_channels}"
        )
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in cfg.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cfg.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def _schedule(cfg: Config) -> dict:
    """The noise schedule both schedulers share (SD-1's scaled-linear betas, epsilon prediction)."""
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": "scaled_linear",
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "prediction_type": "epsilon",
            "clip_sample": False}


def make_train_scheduler(cfg: Config) -> DDPMScheduler:
    """Stable Diffusion's noise schedule."""
    return DDPMScheduler(**_schedule(cfg))


def make_sampling_scheduler(cfg: Config) -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM on the training schedule (SD-1 settings)."""
    return DDIMScheduler(
        **_schedule(cfg),
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ----------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------


def vae_loss(cfg: Config, vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + MSE, per pixel) + KL (per latent element) of a batch in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - x).abs().mean()
    mse = F.mse_loss(recon, x)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = l1 + cfg.vae_mse_weight * mse + cfg.vae_kl_weight * kl
    return loss, {
        "loss": loss.item(),
        "l1": l1.item(),
        "mse": mse.item(),
        "kl": kl.item(),
        "post_std": posterior.std.mean().item(),
    }


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: np.ndarray) -> dict[str, float]:
    """Std of posterior-mean latents, mean posterior std, and posterior-mean round-trip PSNR."""
    x = to_tensor(images)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
    mse01 = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on the [0, 1] scale
    return {
        "latent_std": posterior.mean.std().item(),
        "latent_mean": posterior.mean.mean().item(),
        "posterior_std": posterior.std.mean().item(),
        "psnr": (10 * torch.log10(1.0 / mse01.clamp_min(1e-10))).mean().item(),
    }


def train_vae(cfg: Config, work: Path, images: np.ndarray, minutes: float, max_steps: int | None) -> AutoencoderKL:
    """Stage 1. Returns the trained VAE with scaling_factor set, also saved to ``work/vae``."""
    final_dir = work / "vae"
    if (final_dir / "config.json").exists():
        log(f"VAE stage already finished ({final_dir}); loading it")
        return AutoencoderKL.from_pretrained(final_dir)
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    progress_path = work / "vae_progress.pt"
    step, elapsed = 0, 0.0
    if progress_path.exists():
        state = torch.load(progress_path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"VAE: resuming at step {step}, {elapsed / 60:.1f} min done")
    log(f"VAE: {n_params(vae) / 1e6:.2f}M parameters; budget {minutes} min, max steps {max_steps}")

    def save_progress() -> None:
        atomic_save(
            {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, progress_path
        )

    vae.train()
    t_start, last_ckpt = time.time() - elapsed, time.time()
    while (max_steps is None and elapsed < minutes * 60) or (max_steps is not None and step < max_steps):
        for group in opt.param_groups:
            progress = run_progress(step, elapsed, minutes, max_steps)
            group["lr"] = lr_at(cfg, step, progress, cfg.vae_lr, cfg.vae_warmup_steps)
        x = to_tensor(images[batch_indices(cfg, "vae", step, len(images), cfg.vae_batch)])
        loss, parts = vae_loss(cfg, vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        elapsed = time.time() - t_start
        if step % cfg.log_every == 0:
            log(
                f"VAE step {step} "
                + " ".join(f"{k}={v:.4g}" for k, v in parts.items())
                + f" | {elapsed / step:.2f}s/step, {elapsed / 60:.1f} min"
            )
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            save_progress()
            last_ckpt = time.time()
    save_progress()

    vae.eval()
    stats = latent_stats(vae, images[: cfg.scale_scenes])
    scaling = 1.0 / stats["latent_std"]
    vae.register_to_config(scaling_factor=scaling)
    log(f"VAE done: {step} steps, {elapsed / 60:.1f} min; {stats}; scaling_factor={scaling:.4f}")
    vae.save_pretrained(final_dir)
    (work / "vae_stats.json").write_text(
        json.dumps({"steps": step, "wall_s": elapsed, **stats, "scaling_factor": scaling}, indent=2)
    )
    return vae


# ----------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def cached_latents(
    cfg: Config, work: Path, vae: AutoencoderKL, images: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Scaled posterior-mean latents [N, C, h, w] of all training scenes (encoded once on ``device``, cached
    on disk), returned on ``device``.

    The cache is keyed by the scenes (:func:`scenes_key`) and the VAE's weights, so new scenes or another
    VAE re-encode.
    """
    path, key_path = work / "latents.pt", work / "latents_key.json"
    weights = sum(float(t.double().sum()) for t in vae.state_dict().values())  # identifies the VAE cheaply
    key = _digest({"scenes": scenes_key(cfg), "vae": weights, "scale": vae.config.scaling_factor})
    if path.exists() and key_path.exists() and key_path.read_text() == key:
        return torch.load(path).to(device)
    t0 = time.time()
    vae.eval().to(device)
    chunks = []
    for start in range(0, len(images), cfg.encode_batch):
        x = to_tensor(images[start : start + cfg.encode_batch]).to(device)
        chunks.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    latents = torch.cat(chunks)
    vae.cpu()
    atomic_save(latents.cpu(), path)
    key_path.write_text(key)
    log(
        f"encoded {len(images)} scenes to latents {tuple(latents.shape)} in {time.time() - t0:.1f}s "
        f"(std {latents.std().item():.3f})"
    )
    return latents


class Ema:
    """Exponential moving average of a set of parameters (with the usual warm-up of the decay)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)


def train_unet(
    cfg: Config,
    work: Path,
    vae: AutoencoderKL,
    images: np.ndarray,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    minutes: float,
    max_steps: int | None,
    init: Path | None = None,
    first_step: int = 0,
    device: torch.device | None = None,
) -> tuple[CLIPTextModel, UNet2DConditionModel, int, float]:
    """Stage 2, on ``device`` (the CPU by default). Returns the EMA text encoder and UNet (on the CPU), the
    number of steps and the wall time (s).

    With ``init`` (a finished pipeline folder), training continues from its (EMA) text encoder and UNet
    with a fresh optimizer: a warm restart of the cosine schedule (short warmup, then decay over the new
    budget). Steps are numbered from ``first_step`` (the steps the pipeline already had), so the batches
    and noise of the continuation are new ones, and ``max_steps`` / ``minutes`` count this run only.
    """
    device = device or torch.device("cpu")
    latents = cached_latents(cfg, work, vae, images, device)  # [N, C, h, w] on device
    ids_all = tokenize(cfg, tokenizer, captions)
    ids_uncond = tokenize(cfg, tokenizer, [""])
    kinds = word_kinds(tokenizer)  # (colours, shapes)
    kind_weights = (1.0 - cfg.contrast_shape_share, cfg.contrast_shape_share)
    torch.manual_seed(cfg.seed + 1)
    if init is None:
        text_encoder, unet = make_text_encoder(cfg, tokenizer), make_unet(cfg)
    else:
        text_encoder = CLIPTextModel.from_pretrained(init, subfolder="text_encoder")
        _resize_vocabulary(text_encoder, tokenizer, init)
        unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet")
        log(f"UNet: continuing from {init} (step {first_step})")
    text_encoder.to(device)
    unet.to(device)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ema = Ema(params, cfg.ema_decay)
    scheduler = make_train_scheduler(cfg)
    abar = scheduler.alphas_cumprod.to(device)
    progress_path = work / "unet_progress.pt"
    step, elapsed = first_step, 0.0
    if progress_path.exists():
        state = torch.load(progress_path, weights_only=False, map_location=device)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        step, elapsed = state["step"], state["elapsed"]
        log(f"UNet: resuming at step {step}, {elapsed / 60:.1f} min done")
    log(
        f"text encoder {n_params(text_encoder) / 1e6:.3f}M, UNet {n_params(unet) / 1e6:.3f}M parameters; "
        f"budget {minutes} min, max steps {max_steps}"
    )

    def save_progress() -> None:
        atomic_save(
            {
                "text_encoder": text_encoder.state_dict(),
                "unet": unet.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.shadow,
                "step": step,
                "elapsed": elapsed,
            },
            progress_path,
        )

    text_encoder.train()
    unet.train()
    t_start, last_ckpt = time.time() - elapsed, time.time()
    # EMAs of the denoising loss, the hinge and of true < wrong, kept on the device: reading them every step
    # would wait for the GPU each time.
    running, contrast_running, beaten = (torch.zeros((), device=device) for _ in range(3))
    warmup = cfg.unet_warmup_steps if init is None else cfg.continue_warmup_steps
    while (max_steps is None and elapsed < minutes * 60) or (max_steps is not None and step - first_step < max_steps):
        done = step - first_step
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, done, run_progress(done, elapsed, minutes, max_steps), cfg.unet_lr, warmup)
        # The step's draws (scenes, caption drop, t, noise, negatives) come from CPU generators seeded by the
        # step, so they are the same on every device and after a resume.
        idx = torch.from_numpy(batch_indices(cfg, "unet", step, len(latents), cfg.unet_batch))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        ids = ids_all[idx].clone()  # [B, L]
        drop = torch.rand(len(idx), generator=gen) < cfg.uncond_prob
        ids[drop] = ids_uncond
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)  # [B]
        noise = torch.randn((len(idx), *latents.shape[1:]), generator=gen).to(device)  # [B, C, h, w]
        z0 = latents[idx.to(device)]  # [B, C, h, w]
        t = t.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        # Hard negatives ride in the same forward pass: the same z_t, t and noise under a one-word-wrong caption.
        neg = torch.nonzero(~drop & (torch.rand(len(idx), generator=gen) < cfg.contrast_fraction)).flatten()
        if cfg.contrast_weight <= 0:
            neg = neg[:0]
        ids_neg = swap_one_word(ids[neg], kinds, gen, kind_weights)  # [N, L]
        neg = neg.to(device)
        hidden = text_encoder(torch.cat([ids, ids_neg]).to(device)).last_hidden_state
        pred = unet(torch.cat([zt, zt[neg]]), torch.cat([t, t[neg]]), encoder_hidden_states=hidden).sample
        sq_err = ((pred - torch.cat([noise, noise[neg]])) ** 2).mean(dim=(1, 2, 3))  # [B + N]
        loss = denoise = sq_err[: len(idx)].mean()
        if len(neg):
            hinge = contrast_hinge(sq_err[neg], sq_err[len(idx):], cfg.contrast_margin)  # [N]
            loss = denoise + cfg.contrast_weight * hinge.mean()
            contrast_running.lerp_(hinge.detach().mean(), 0.02)
            beaten.lerp_((sq_err[len(idx):] > sq_err[neg]).float().mean(), 0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)
        step += 1
        elapsed = time.time() - t_start
        if step == first_step + 1:
            running.copy_(denoise.detach())
        else:
            running.lerp_(denoise.detach(), 0.02)
        if step % cfg.log_every == 0:
            contrast = (
                f" contrast={contrast_running.item():.4f} true<wrong={beaten.item():.0%}"
                if cfg.contrast_weight > 0 else ""
            )
            log(
                f"UNet step {step} loss={denoise.item():.4f} ema_loss={running.item():.4f}{contrast} "
                f"| {elapsed / (step - first_step):.2f}s/step, {elapsed / 60:.1f} min"
            )
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            save_progress()
            last_ckpt = time.time()
    save_progress()
    ema.copy_to_params()
    log(f"UNet done: {step} steps, {elapsed / 60:.1f} min")
    return text_encoder.eval().cpu(), unet.eval().cpu(), step, elapsed


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export(
    cfg: Config,
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    tokenizer_dir: Path,
    train_log: dict,
) -> dict:
    """Save the Stable-Diffusion pipeline (fp16 weights only if fp32 would exceed the size cap); returns the
    training log as written to ``out/training_log.json``."""
    total = sum(n_params(m) for m in (vae, text_encoder, unet))
    fp32_mb = total * 4 / 2**20
    dtype = torch.float16 if fp32_mb > cfg.save_fp16_above_mb else torch.float32
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sampling_scheduler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # The legacy vocab.json / merges.txt too, for tokenizer versions that read those.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, out / "tokenizer" / name)
    train_log = {**train_log, "params": total, "weights_dtype": str(dtype).replace("torch.", "")}
    (out / "training_log.json").write_text(json.dumps(train_log, indent=2))
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    log(f"saved pipeline to {out} ({total / 1e6:.2f}M parameters, {size_mb:.1f} MB of {dtype} weights)")
    return train_log


def train(
    cfg: Config,
    work: Path,
    out: Path,
    stage: str = "all",
    vae_minutes: float = 12.0,
    unet_minutes: float = 43.0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    continue_from: Path | None = None,
    command: str = "",
    *,
    vae_from: Path | None = None,
    device: str = "cpu",
    workers: int = 1,
) -> dict:
    """Train (or continue training) the bundled model and write the pipeline to ``out``.

    Args:
        cfg: every hyperparameter.
        work: progress checkpoints and caches; calling again with the same folder resumes.
        out: the finished Stable-Diffusion pipeline folder (replaced if it exists).
        stage: one of :data:`STAGES`.
        vae_minutes / unet_minutes: wall-clock budgets of the stages (cumulative over resumes).
        vae_steps / unet_steps: exact step counts instead of the budgets.
        continue_from: a finished pipeline (e.g. the bundled one): keep its VAE, grow its tokenizer by
            ``cfg.added_words``, and train its text encoder + UNet further (a warm restart of the lr
            schedule; step numbers continue from the pipeline's).
        command: the command line, recorded in ``training_log.json``.
        vae_from: a finished pipeline whose VAE is kept while a new text encoder + UNet (``cfg``'s
            architecture) are trained from scratch.
        device: the torch device of the VAE encoding and of stage 2 (the VAE stage trains on the CPU).
        workers: processes that render the training scenes.

    Returns:
        The training log written to ``out/training_log.json`` (empty for ``stage="scenes"`` / ``"vae"``).

    Raises:
        ValueError: an unknown stage, ``stage="vae"`` with ``continue_from`` / ``vae_from``, or both of them.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    if continue_from is not None and vae_from is not None:
        raise ValueError("continue_from already keeps the pipeline's VAE; give continue_from or vae_from, not both")
    source = continue_from or vae_from
    if source is not None and stage == "vae":
        raise ValueError("continue_from / vae_from keep the VAE of the pipeline; use stage 'unet'")
    torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions: fp32 range, ~fp16 speed
        torch.backends.cudnn.allow_tf32 = True
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, captions = load_scenes(cfg, work, workers)
    if stage == "scenes":
        return {}
    tokenizer = build_tokenizer(cfg, work / "tokenizer_src")
    previous: dict = {}
    if source is not None:
        previous = json.loads((source / "training_log.json").read_text())
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        (work / "vae_stats.json").write_text(
            json.dumps({**previous["vae"], "psnr": previous["vae"]["psnr_posterior_mean"]}, indent=2)
        )
        if vae_from is not None:  # a new text encoder + UNet: their history starts here
            previous = {"vae": previous["vae"]}
    else:
        vae = train_vae(cfg, work, images, vae_minutes, vae_steps)
    if stage == "vae":
        return {}
    first_step = previous.get("unet", {}).get("steps", 0)
    text_encoder, unet, steps, wall = train_unet(
        cfg, work, vae, images, captions, tokenizer, unet_minutes, unet_steps, continue_from, first_step,
        torch.device(device),
    )
    vae_stats = json.loads((work / "vae_stats.json").read_text())
    earlier = previous.get("unet", {})
    rounds = earlier.get("rounds", [{"command": previous["command"], **earlier}] if earlier else [])
    train_log = {
        "command": command,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "vae": {
            "steps": vae_stats["steps"],
            "wall_s": round(vae_stats["wall_s"], 1),
            "psnr_posterior_mean": vae_stats["psnr"],
            "posterior_std": vae_stats["posterior_std"],
            "latent_std": vae_stats["latent_std"],
            "scaling_factor": vae_stats["scaling_factor"],
        },
        "unet": {
            "steps": steps,
            "wall_s": round(wall + earlier.get("wall_s", 0.0), 1),
            "rounds": [
                *rounds,
                {
                    "command": command,
                    "train_style": cfg.train_style,
                    "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
                    "steps": steps - first_step,
                    "wall_s": round(wall, 1),
                },
            ],
        },
        "torch_threads": cfg.threads,
    }
    full_log = export(cfg, out, vae, text_encoder, tokenizer, unet, work / "tokenizer_src", train_log)
    log(f"all done in {(time.time() - t0) / 60:.1f} min (this invocation)")
    return full_log
