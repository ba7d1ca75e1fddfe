"""Every hyperparameter of a bundled model and its training, as one frozen dataclass with ``key=value`` overrides."""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields, replace

from peekaboo.data.shapes import CAPTION_FORMS

#: What the training can run: the training scenes only (rendered and cached), the VAE only, the text encoder +
#: UNet only (on a finished VAE), or both.
STAGES: tuple[str, ...] = ("scenes", "vae", "unet", "all")
#: The scene sets a model can learn.
SCENE_SETS: tuple[str, ...] = ("objects", "shapes")


@dataclass(frozen=True)
class Config:
    """All hyperparameters of the bundled model and its training."""

    seed: int = 0
    threads: int = 2
    # Which scenes the model learns (SCENE_SETS): "objects" (emoji objects over photographs, the bundled model)
    # or "shapes" (flat-coloured shapes, the small model the fastest tests use).
    scenes: str = "objects"
    image_size: int = 64
    # --- training data (all from the "train" seed range) ---
    n_scenes: int = 40_000  # scenes rendered once and cached (pixels for the VAE, latents for the UNet)
    # Scene style (a name in peekaboo.data.shapes.STYLES) and the caption forms drawn from. The first
    # bundled model was trained on "classic" scenes with the "and" form only; "wide" adds border-crossing,
    # smaller and larger objects, 4-object scenes, colour jitter and textured backgrounds.
    train_style: str = "wide"
    caption_forms: tuple[str, ...] = CAPTION_FORMS
    # Shapes training-scene mix: probability of 1, 2, 3, 4 objects (as many as the style allows), and of forcing
    # a hard distractor when there are 2+ objects. Single objects on plain backgrounds are what Peekaboo's
    # composites look like; distractors teach the model to bind each colour to its own shape. (The objects
    # scenes draw their own mix: peekaboo.data.objects.)
    p_objects: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    p_distractor: float = 0.5
    # --- VAE ---
    # n blocks -> n - 1 downsamplings. Two (64x64 -> 32x32x4 latents) keep a 10-pixel emoji recognisable; the
    # shapes model's flat colours survive three blocks (16x16x4).
    vae_channels: tuple[int, ...] = (32, 64)
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
    # Shapes only: words added after the first shapes model: they come after every earlier word in the vocabulary, so
    # the earlier token ids stay as they were and a pipeline trained before can be continued (its token
    # embedding grows by these rows; see _resize_vocabulary). "," needs no entry: every single character
    # is already a token.
    added_words: tuple[str, ...] = ("the",)
    # --- UNet ---
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_layers_per_block: int = 1  # one resnet (+ attention) per level: half the step time of two
    unet_heads: int = 4  # diffusers' "attention_head_dim" of SD-1 configs is the number of heads
    # Which UNet resolutions carry cross-attention to the caption (the full latent resolution is the first).
    unet_cross_attention: tuple[bool, ...] = (False, True, True)
    unet_norm_groups: int = 16  # GroupNorm groups; must divide every unet_channels entry
    unet_batch: int = 32
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
    # Shapes: share of the swaps that change a shape word rather than a colour word (shape words are read less
    # well than colour words by the conditioning check, so they get the larger share). Objects: share of the
    # swaps that name a look-alike partner (apple -> tomato) rather than any other kind.
    contrast_shape_share: float = 0.7
    contrast_lookalike_share: float = 0.5
    # Objects: share of the negatives of multi-object captions that leave one object out ("a cat" for a cat and a
    # light bulb). Swaps teach which word names which object; omissions teach that an object the caption does not
    # name should not be there, the evidence Peekaboo's dream loss needs to remove the objects a prompt leaves out.
    contrast_omission_share: float = 0.0
    contrast_margin: float = 0.25
    contrast_weight: float = 1.0
    # Run the text encoder's and UNet's forward passes under bfloat16 autocast (weights, optimizer and EMA stay
    # float32). On a CPU with AMX (Sapphire Rapids and later) a step takes about 0.7x the float32 time; on other CPUs
    # bfloat16 can be slower, so it is off unless asked for.
    unet_bf16_autocast: bool = False
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # --- bookkeeping ---
    checkpoint_every_s: float = 180.0
    log_every: int = 25
    encode_batch: int = 256
    save_fp16_above_mb: float = 28.0  # weights are stored in fp16 if fp32 would exceed this


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


#: The shipped shapes model's settings (src/peekaboo/assets/shapes-ldm/training_log.json has its full record).
SHAPES = Config(scenes="shapes", n_scenes=24_000, vae_channels=(32, 64, 64), unet_channels=(64, 64, 64),
                unet_layers_per_block=2, unet_norm_groups=32, unet_batch=64, save_fp16_above_mb=25.0)
#: Named starting points of ``--preset``.
PRESETS: dict[str, Config] = {"objects": Config(), "shapes": SHAPES}
