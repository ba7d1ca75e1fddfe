"""The frozen text-to-image diffusion model: loading, prompt and image encoding, and the dream-loss terms.

A :class:`Backbone` is a plain object (not an ``nn.Module``), so a LightningModule holding it never puts its
weights into ``state_dict`` or a checkpoint. :func:`load_backbone` loads one per process and model config
and hands the same object to every pair.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peekaboo import ops
from peekaboo.config import BUNDLED_MODEL, GuidanceConfig, ModelConfig
from peekaboo.errors import ConfigError, ModelError
from peekaboo.utils.devices import check_dtype

log = logging.getLogger(__name__)

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BUNDLED_PATH = Path(__file__).parents[1] / "assets" / "shapes-ldm"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Sanity bounds on a local folder's component configs, read before any module is built: a config with absurd
# sizes would otherwise end in an allocator error or a size overflow (possibly after outputs were started).
# Each bound is far above any real text-to-image model (SD 1.5's UNet has 0.86 B parameters, SDXL's 2.6 B).
MAX_COMPONENT_PARAMETERS = 50_000_000_000
# Any single width, length or count in a component config (channels, hidden size, vocabulary, layers).
MAX_CONFIG_DIMENSION = 1_048_576
# Any count of layers or heads (CLIP: 12..32 layers; a UNet: 1..3 layers per block): deep tiny stacks would pass
# the parameter bound yet take hours to build.
MAX_CONFIG_COUNT = 1024
_COUNT_SUFFIXES = ("_layers", "_per_block", "_heads")
# UNet latent side (SD 1.x: 64, SDXL: 128) and VAE image side (SD 1.x: 512, SDXL: 1024).
MAX_LATENT_SAMPLE_SIZE = 1024
MAX_IMAGE_SAMPLE_SIZE = 8192
# A 3x3 ResNet block holds two 3x3 convolutions: 2 * 9 * c^2 weights, a lower bound of what a block costs.
_RESNET_WEIGHTS_PER_CHANNEL_SQUARED = 18
# A transformer layer holds at least the four h x h attention projections (plus its MLP, counted apart).
_ATTENTION_WEIGHTS_PER_HIDDEN_SQUARED = 4
# Weight files: safetensors hold only tensors; the others are pickles, read with weights_only=True.
SAFE_WEIGHT_SUFFIX = ".safetensors"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHTED_COMPONENTS = ("vae", "unet", "text_encoder")


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text embeddings in diffusers' order ``[uncond, cond]``: each ``(B, L, D)`` (or ``(1, L, D)``, shared)."""

    uncond: torch.Tensor
    cond: torch.Tensor

    @staticmethod
    def stack(items: list[PromptEmbeddings]) -> PromptEmbeddings:
        """One batch from per-prompt embeddings."""
        return PromptEmbeddings(torch.cat([e.uncond for e in items]), torch.cat([e.cond for e in items]))


def resolve_pretrained(name: str) -> str:
    """Map ``"bundled"`` to the shipped model folder; leave hub ids and other paths as they are."""
    return str(BUNDLED_PATH) if name == BUNDLED_MODEL else name


def offline(cfg: ModelConfig) -> bool:
    """Load from local files only when asked to, or when ``HF_HUB_OFFLINE`` is set."""
    return cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    # Hub ids are exactly "owner/name"; anything else (or anything that exists on disk) is a folder.
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def check_model_source(cfg: ModelConfig, device: torch.device | str | None = None, segmentation: bool = False) -> str:
    """Validate ``cfg`` (and its dtype on ``device``) before any weights are read; returns the resolved name.

    A local folder is checked from its small JSON files only: the components Peekaboo loads exist, the UNet
    takes plain text conditioning (not SDXL's extra conditioning), the scheduler predicts epsilon or v, and,
    with ``segmentation``, the UNet takes the VAE's latents alone (an inpainting UNet's extra channels can
    edit but not segment). A hub id is checked when it loads.

    Raises:
        ModelError: float16 on CPU, a missing folder, a folder without a Stable-Diffusion layout, a missing
            component, or a pipeline Peekaboo cannot drive.
    """
    if device is not None:
        check_dtype(cfg.dtype, torch.device(device).type, ModelError)
    name = resolve_pretrained(cfg.pretrained)
    if not _looks_like_path(name):
        return name  # a hub id: diffusers resolves (and caches) it
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(f"model.pretrained={cfg.pretrained} is a file, not a folder; pass the diffusers pipeline "
                         f"folder that holds model_index.json (e.g. {path.parent}).")
    if not path.is_dir():
        if cfg.pretrained == BUNDLED_MODEL:
            raise ModelError(f"The bundled model is missing from the package ({path}); reinstall peekaboo.")
        raise ModelError(f"model.pretrained={cfg.pretrained}: no such folder; pass a diffusers model folder or hub id.")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"model.pretrained={cfg.pretrained} has no model_index.json, so it is not a diffusers pipeline folder; "
            "save one with pipeline.save_pretrained(...)."
        )
    components = _read_json(index)
    missing = [c for c in COMPONENTS if c not in components]
    if missing:
        raise ModelError(
            f"model.pretrained={cfg.pretrained} is a {components.get('_class_name', 'diffusers')} pipeline without "
            f"{', '.join(missing)}; Peekaboo needs a Stable-Diffusion-style text-to-image pipeline "
            f"({', '.join(COMPONENTS)})."
        )
    absent = [c for c in COMPONENTS if not (path / c).is_dir()]
    if absent:
        raise ModelError(
            f"model.pretrained={cfg.pretrained} lacks the component folder(s) {', '.join(absent)}/; "
            "copy the complete pipeline folder."
        )
    _check_pipeline_kind(cfg.pretrained, path, str(components.get("_class_name", "diffusers")), segmentation)
    for component in WEIGHTED_COMPONENTS:
        _check_component_sizes(path, component)
        _check_safe_weights(path, component)
    return str(path)


def _component_error(path: Path, component: str, what: str) -> ModelError:
    return ModelError(f"Model folder {path}, component {component}/: {what}")


def _check_component_sizes(path: Path, component: str) -> None:
    """Refuse a component config whose sizes no real model has, before a module is built from it.

    Raises:
        ModelError: naming the folder, the component and the offending key.
    """
    config_file = path / component / "config.json"
    if not config_file.is_file():
        return  # diffusers / transformers report a missing config themselves
    config = _read_json(config_file)
    for key, value in config.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v) for v in numbers):
            raise _component_error(path, component, f"{key}={value} in config.json is not a finite number; "
                                                    "re-save the pipeline.")
        ints = [v for v in numbers if isinstance(v, int) and not isinstance(v, bool)]
        if key.startswith("_") or not ints:
            continue
        if any(v > MAX_CONFIG_COUNT for v in ints) and key.endswith(_COUNT_SUFFIXES):
            raise _component_error(path, component, f"{key}={value} in config.json is beyond any real model "
                                                    f"(at most {MAX_CONFIG_COUNT:,}); the file is damaged "
                                                    "or not this model's; re-save the pipeline.")
        if any(v > MAX_CONFIG_DIMENSION for v in ints) and _is_size_key(key):
            raise _component_error(path, component, f"{key}={value} in config.json is beyond any real model "
                                                    f"(at most {MAX_CONFIG_DIMENSION:,}); the file is damaged "
                                                    "or not this model's; re-save the pipeline.")
    limit = MAX_LATENT_SAMPLE_SIZE if component == "unet" else MAX_IMAGE_SAMPLE_SIZE
    sample = config.get("sample_size")
    sides = [v for v in (sample if isinstance(sample, list) else [sample]) if isinstance(v, int)]
    if any(v > limit or v < 1 for v in sides):
        raise _component_error(path, component, f"sample_size={sample} in config.json is outside 1..{limit:,}; "
                                                "the file is damaged or not this model's; re-save the pipeline.")
    estimate = _parameter_estimate(config)
    if estimate > MAX_COMPONENT_PARAMETERS:
        raise _component_error(path, component, f"its config.json describes at least {estimate:,.0f} parameters, "
                                                f"beyond any real model (at most {MAX_COMPONENT_PARAMETERS:,}); "
                                                "re-save the pipeline.")


def _is_size_key(key: str) -> bool:
    """Whether a config key names a width, length or count (not an id or a seed)."""
    return key.endswith(("_channels", "_size", "_dim", "_layers", "_heads", "_embeddings", "_per_block",
                         "_groups", "_length"))


def _parameter_estimate(config: dict[str, Any]) -> float:
    """A lower bound of a UNet's, VAE's or CLIP text encoder's parameter count from its config (float: the
    product of absurd sizes must not overflow anything)."""
    total = 0.0
    channels = config.get("block_out_channels")
    if isinstance(channels, list):
        layers = config.get("layers_per_block", 1)
        layers = max(layers) if isinstance(layers, list) else layers
        per_block = max(int(layers) if isinstance(layers, int) else 1, 1)
        total += sum(_RESNET_WEIGHTS_PER_CHANNEL_SQUARED * per_block * float(c) ** 2
                     for c in channels if isinstance(c, (int, float)))
    hidden, depth = config.get("hidden_size"), config.get("num_hidden_layers")
    if isinstance(hidden, int) and isinstance(depth, int):
        ff = config.get("intermediate_size", 0)
        ff = ff if isinstance(ff, int) else 0
        vocab = config.get("vocab_size", 0)
        vocab = vocab if isinstance(vocab, int) else 0
        total += depth * (_ATTENTION_WEIGHTS_PER_HIDDEN_SQUARED * float(hidden) ** 2 + 2.0 * hidden * ff)
        total += float(vocab) * hidden
    return total


def _check_safe_weights(path: Path, component: str) -> None:
    """Refuse a local component whose weights exist only as pickles (``*.bin``) that hold objects or code.

    diffusers and transformers read such files with ``weights_only=True`` too, but only mid-load and with a
    pages-long refusal; this trial load runs first, memory-mapped (no tensor data is read), and runs nothing
    from the file either. A file in torch's legacy format, which cannot be mapped, is left to the loader.
    """
    folder = path / component
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if any(p.name.endswith(SAFE_WEIGHT_SUFFIX) for p in files):
        return  # the loaders prefer safetensors and never open the pickles
    for weights in (p for p in files if p.suffix in PICKLE_WEIGHT_SUFFIXES):
        try:
            torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise _component_error(path, component, f"{weights.name} is a pickle that a safe load refuses (it "
                                                    "holds objects or code, which never ran); convert the "
                                                    "weights to safetensors.") from None
        except (OSError, RuntimeError, ValueError, EOFError):
            continue  # legacy or damaged: the loader's own message names it


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}); re-save the pipeline.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object; re-save the pipeline.")
    return data


def _check_pipeline_kind(pretrained: str, path: Path, class_name: str, segmentation: bool) -> None:
    """Refuse pipelines with the SD layout that Peekaboo still cannot drive, from their component configs."""
    unet = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    vae = _read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else {}
    if unet.get("addition_embed_type") is not None:
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} whose UNet needs extra conditioning "
            f"(addition_embed_type={unet['addition_embed_type']!r}, as in SDXL); Peekaboo supports Stable "
            "Diffusion 1.x/2.x-style pipelines."
        )
    unet_channels, latent_channels = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if segmentation and unet_channels != latent_channels:
        raise ModelError(_channels_message(f"model.pretrained={pretrained} ({class_name})", unet_channels,
                                           latent_channels))
    scheduler = path / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise ModelError(
            f"model.pretrained={pretrained}: the scheduler predicts {prediction!r}; Peekaboo supports "
            f"{' or '.join(PREDICTION_TYPES)} models."
        )


def _channels_message(model: str, unet_channels: int, latent_channels: int) -> str:
    return (f"{model}: its UNet takes {unet_channels} input channels but its VAE makes {latent_channels}-channel "
            "latents (an inpainting or depth model?); segmenting needs a text-to-image model.")


class Backbone:
    """A frozen Stable-Diffusion-style model (vae, unet, text_encoder, tokenizer, scheduler config).

    Args:
        vae, unet, text_encoder, tokenizer: diffusers / transformers components, already frozen.
        scheduler_config: the scheduler's config dict (betas, number of timesteps, prediction type).
        resolution: side length the composite is resized to before encoding.
    """

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config: dict[str, Any], resolution: int):
        from diffusers import DDPMScheduler

        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        for model in (vae, unet, text_encoder):
            model.eval().requires_grad_(False)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(
                f"The model's scheduler predicts {self.prediction_type!r}; Peekaboo supports "
                f"{' or '.join(PREDICTION_TYPES)} models."
            )
        # DDPM's constructor turns any SD scheduler config (PNDM, DDIM, ...) into the training noise schedule.
        schedule = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(schedule.config.num_train_timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod.float()  # (T,)
        self.resolution = resolution
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: 2 per VAE downsampling (8 for SD 1.x)."""
        return vae_scale_factor(self.vae)

    @property
    def native_resolution(self) -> int:
        """The side the model was trained at: ``unet.sample_size * vae_scale_factor`` (512 for SD 1.x)."""
        return native_resolution(self.unet, self.vae)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str) -> Backbone:
        """Move the weights (and cached embeddings) to ``device``; a no-op when already there."""
        device = torch.device(device)
        if self.device != device:
            for model in (self.vae, self.unet, self.text_encoder):
                model.to(device)
            self._prompt_cache = {k: v.to(device) for k, v in self._prompt_cache.items()}
        return self

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids ``(1, L)``, padded to the tokenizer's length; longer prompts are truncated with a warning."""
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(prompt, truncation=False).input_ids
        if len(full) > limit:
            # Both counts without the start and end tokens the tokenizer adds: what the user wrote.
            log.warning(
                "Prompt %r is %d tokens long but the model reads %d, so it was truncated to its first %d tokens.",
                prompt, len(full) - 2, limit - 2, limit - 2,
            )
        ids = self.tokenizer(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return ids.input_ids

    @torch.no_grad()
    def _embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            ids = self.tokenize(prompt).to(self.device)
            self._prompt_cache[prompt] = self.text_encoder(ids)[0]  # (1, L, D)
        return self._prompt_cache[prompt]

    def encode_prompt(self, prompt: str) -> PromptEmbeddings:
        """Embeddings ``[uncond, cond]`` of ``prompt``, each ``(1, L, D)``; cached per prompt."""
        return PromptEmbeddings(uncond=self._embed(""), cond=self._embed(prompt))

    # -- images ---------------------------------------------------------------------------------------------
    def encode_images(
        self, images: torch.Tensor, mode: str = "sample", generators: list[torch.Generator] | None = None,
        resolution: int | None = None,
    ) -> torch.Tensor:
        """VAE-encode images at the model's resolution; gradients flow through the encoder.

        Args:
            images: ``(B, 3, S, S)`` in [0, 1] (any S: resized to ``resolution``).
            mode: ``"mean"`` (posterior mean) or ``"sample"`` (a draw from the posterior; sample ``i`` uses
                ``generators[i]``, so a pair's draw does not depend on its batch).
            resolution: the side encoded; None = ``self.resolution``.

        Returns:
            latents ``(B, C, h, w)``, float32, scaled by the VAE's ``scaling_factor``.
        """
        dist = self.vae.encode(self._vae_input(images, resolution)).latent_dist
        if mode == "mean":
            z = dist.mean
        else:
            noise = posterior_noise(dist.mean, generators)
            z = dist.mean + dist.std * noise
        return (z.float() - self.shift_factor) * self.scaling_factor

    def _vae_input(self, images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """``images`` ``(B, 3, S, S)`` in [0, 1] as the VAE takes them: resized to ``resolution`` (None:
        ``self.resolution``), in [-1, 1], in the VAE's dtype."""
        side = resolution or self.resolution
        x = images
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return (2.0 * x - 1.0).to(self.vae.dtype)

    @torch.no_grad()
    def encode_posterior(
        self, images: torch.Tensor, resolution: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of ``images`` ``(B, 3, S, S)``, without gradient, in the scaled latent units of
        :meth:`encode_images`: ``(mean, std)``, each ``(B, C, h, w)`` float32. ``mean + std * eps`` is the
        latent :meth:`encode_images` draws with noise ``eps`` (up to rounding)."""
        dist = self.vae.encode(self._vae_input(images, resolution)).latent_dist
        mean = (dist.mean.float() - self.shift_factor) * self.scaling_factor
        return mean, dist.std.float() * self.scaling_factor

    def check_encode_resolution(self, side: int | None, key: str = "optimization.guidance.encode_resolution") -> None:
        """Refuse an encoding side the VAE and UNet cannot take: it must be a multiple of the VAE's factor
        times the UNet's downsampling (every latent side halves evenly through the UNet's down blocks).

        Raises:
            ConfigError: naming ``key``, the side and the multiple.
        """
        if side is None:
            return
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * unet_factor
        if side % multiple:
            nearest = max(multiple, side // multiple * multiple)
            raise ConfigError(f"Config key {key!r} = {side} is out of range for this model; allowed: a multiple "
                              f"of {multiple} (VAE factor {self.vae_scale_factor} times the UNet's downsampling "
                              f"{unet_factor}), e.g. {nearest}.")

    # -- dream loss -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_eps(
        self, noisy: list[torch.Tensor], t: list[torch.Tensor], hidden: list[torch.Tensor], batch: bool = True
    ) -> list[torch.Tensor]:
        """UNet epsilon predictions for groups of rows (v-predictions are converted to epsilon).

        Args:
            noisy: per group ``(N_i, C, h, w)`` noisy latents ``z_t``.
            t: per group ``(N_i,)`` integer timesteps.
            hidden: per group text embeddings ``(N_i, L, D)``, or a shared ``(1, L, D)``.
            batch: one UNet call over all groups' rows instead of one call per group.

        Returns:
            per group ``(N_i, C, h, w)`` float32.
        """
        channels = self.unet.config.in_channels
        if noisy[0].shape[1] != channels:  # e.g. an inpainting UNet loaded for editing
            raise ModelError(_channels_message("The loaded model", channels, noisy[0].shape[1]))
        dtype = self.unet.dtype
        hidden = [e.expand(z.shape[0], -1, -1).to(dtype) for z, e in zip(noisy, hidden, strict=True)]
        zs = [z.to(dtype) for z in noisy]
        if batch:
            sizes = [z.shape[0] for z in zs]
            out = self.unet(torch.cat(zs), torch.cat(t), encoder_hidden_states=torch.cat(hidden)).sample
            outs = list(out.float().split(sizes))
        else:
            outs = [self.unet(z, tt, encoder_hidden_states=e).sample.float() for z, tt, e in zip(zs, t, hidden,
                                                                                                  strict=True)]
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod.to(noisy[0].device)
            outs = [ops.v_to_epsilon(o, z, abar[tt]) for o, z, tt in zip(outs, noisy, t, strict=True)]
        return outs

    @torch.no_grad()
    def predict_noise(
        self, noisy: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, batch_cfg: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet epsilon predictions for ``[uncond, cond]`` (v-predictions are converted to epsilon).

        Args:
            noisy: ``(B, C, h, w)`` noisy latents ``z_t``.
            t: ``(B,)`` integer timesteps.
            emb: prompt embeddings (each ``(1, L, D)``, broadcast to the batch).
            batch_cfg: one UNet call of batch ``2B`` instead of two calls of ``B``.

        Returns:
            ``(eps_uncond, eps_cond)``, each ``(B, C, h, w)`` float32.
        """
        eps_u, eps_c = self.predict_eps([noisy, noisy], [t, t], [emb.uncond, emb.cond], batch_cfg)
        return eps_u, eps_c

    def sample_timestep(
        self, cfg: GuidanceConfig, generator: torch.Generator, index: int = 0, count: int | None = None
    ) -> torch.Tensor:
        """Draw ``index`` of a pair's run of ``count`` timestep draws under ``cfg.t_schedule``
        (:func:`peekaboo.ops.timestep_range`; ``uniform``: ``t ~ U[t_min * T, t_max * T)``). One int64
        timestep, shape ``(1,)``, on CPU."""
        lo, hi = ops.timestep_range(cfg.t_schedule, index, count, cfg.t_min, cfg.t_max, cfg.t_anneal_jitter,
                                    cfg.t_strata)
        return ops.draw_timestep(lo, hi, self.num_train_timesteps, generator)

    @torch.no_grad()
    def invert(self, clean: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, cfg: GuidanceConfig) -> torch.Tensor:
        """Noisy latents ``z_t`` by deterministic DDIM inversion of ``clean`` ``(N, C, h, w)`` from timestep 0
        (the clean latents, taken as ``abar = 1``) up to ``t`` ``(N,)`` in ``cfg.inversion_steps`` even steps
        (:func:`peekaboo.ops.inversion_timesteps`, :func:`peekaboo.ops.ddim_inversion_step`), as in Score
        Distillation via Inversion (Lukoianov et al., 2024, "Score Distillation via Reparametrized DDIM",
        arXiv:2405.15891).

        Each step predicts the noise with the classifier-free-guided prediction ``eps_u + s (eps_c - eps_u)`` at
        ``s = cfg.inversion_guidance_scale``, its own scale rather than the dream loss's: SDI replaces SDS's
        random noise with the noise of a DDIM trajectory through the clean latents, and inverting with the dream
        loss's own guided prediction makes that noise all but equal to the prediction the loss compares it
        with, so the gradient vanishes (measured: the masks are lost at scales 7.5 and 15 on the bundled model).
        SDI's code inverts with a negative scale, which pushes the trajectory away from the prompt.

        Cost: ``inversion_steps`` UNet calls of ``2N`` rows (``[uncond, cond]``), before the dream loss's own.

        Returns:
            ``(N, C, h, w)`` float32.
        """
        abar_all = self.alphas_cumprod.to(clean.device)
        z = clean.float()
        t_prev = torch.zeros_like(t)
        abar_prev = torch.ones_like(abar_all[t])  # the clean latents: no noise at all
        for t_next in ops.inversion_timesteps(t, cfg.inversion_steps):
            eps_u, eps_c = self.predict_noise(z, t_prev, emb, cfg.batch_cfg)
            abar_next = abar_all[t_next]
            eps_hat = ops.guided_score(eps_u, eps_c, cfg.inversion_guidance_scale)
            z = ops.ddim_inversion_step(z, eps_hat, abar_prev, abar_next)
            t_prev, abar_prev = t_next, abar_next
        return z

    def dream_loss(
        self,
        latents: torch.Tensor,
        emb: PromptEmbeddings,
        cfg: GuidanceConfig,
        generators: list[torch.Generator],
        step: int = 0,
        total_steps: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score-distillation loss terms for ``latents`` ``(B, C, h, w)``.

        Sample ``i`` makes ``K = cfg.samples_per_step`` draws from ``generators[i]``, each its ``t`` and then its
        ``eps``; all ``B*K`` noisy latents go through one UNet call, and the loss's gradient w.r.t. ``latents``
        is the mean over the K draws of ``cfg.estimator``'s gradient, by default (``sds``)
        ``w(t) (eps_u + s (eps_c - eps_u) - eps)``. With ``cfg.noise = "ddim_inversion"`` the noisy latents
        come from :meth:`invert` (the draws of ``eps`` are still made, so the timesteps stay those of
        ``random``) and ``eps`` is the implied noise.

        UNet rows per draw, in the one call: ``sds`` 2 (``[uncond, cond]``); ``nfsd`` 2, or 3 with a non-empty
        ``nfsd_negative_prompt``; ``dds`` 3 (``background``) or 4 (``image``).

        Args:
            step: the step being taken, and ``total_steps`` the run's length: the timestep schedule's position
                (draw ``k`` of the step is draw ``step * K + k`` of the run's ``total_steps * K``).
            reference: ``(B, C, h, w)`` the ``dds`` reference latents (no gradient): the background's
                (``dds_reference = "background"``, paired with the empty prompt) or the unmasked image's
                (``"image"``, paired with the prompt); needed by ``dds`` only.

        Returns:
            ``{"loss": (B,), "t": (B,) float (the mean timestep of the K draws), "grad_norm": (B,)}``.
        """
        if cfg.estimator == "dds" and reference is None:
            raise ValueError("guidance.estimator=dds needs the reference latents")
        k_draws = cfg.samples_per_step
        count = None if total_steps is None else total_steps * k_draws
        # Pair-major order: pair i's K draws are rows i*K .. i*K+K-1 of every (B*K, ...) tensor below.
        draws = [(self.sample_timestep(cfg, g, step * k_draws + k, count), torch.randn(latents.shape[1:], generator=g))
                 for g in generators for k in range(k_draws)]
        t = torch.cat([d[0] for d in draws]).to(latents.device)  # (B*K,)
        noise = torch.stack([d[1] for d in draws]).to(latents.device)  # (B*K, C, h, w)
        abar = self.alphas_cumprod.to(latents.device)[t]  # (B*K,)
        clean = latents.detach()
        if k_draws > 1:  # K = 1 keeps exactly the tensors (and results) of a single draw
            clean = clean.repeat_interleave(k_draws, 0)  # (B*K, C, h, w)
            reference = None if reference is None else reference.repeat_interleave(k_draws, 0)
            emb = PromptEmbeddings(*(e.repeat_interleave(k_draws, 0) if e.shape[0] > 1 else e
                                     for e in (emb.uncond, emb.cond)))  # (B*K, L, D), or a shared (1, L, D)
        if cfg.noise == "ddim_inversion":
            noisy = self.invert(clean, t, emb, cfg)  # (B*K, C, h, w)
            noise = ops.implied_noise(noisy, clean, abar)
        else:
            noisy = ops.add_noise(clean, noise, abar)  # (B*K, C, h, w)
        grad = self._estimator_gradient(noisy, noise, t, abar, emb, cfg, reference)  # (B*K, C, h, w)
        t_mean = t.float()  # (B*K,), which is (B,) for K = 1
        if k_draws > 1:
            grad = grad.view(-1, k_draws, *grad.shape[1:]).mean(1)  # (B, K, C, h, w) -> (B, C, h, w)
            t_mean = t_mean.view(-1, k_draws).mean(1)  # (B,)
        return {"loss": ops.dream_loss(latents, grad), "t": t_mean, "grad_norm": grad.flatten(1).norm(dim=1)}

    def _estimator_gradient(
        self,
        noisy: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        abar: torch.Tensor,
        emb: PromptEmbeddings,
        cfg: GuidanceConfig,
        reference: torch.Tensor | None,
    ) -> torch.Tensor:
        """``cfg.estimator``'s gradient ``(N, C, h, w)`` from one UNet call over the main rows ``[uncond, cond]``
        on ``noisy`` ``(N, C, h, w)`` and the estimator's extra rows (a negative prompt's, or the reference's,
        noised with the same ``t`` and ``noise``)."""
        groups = [(noisy, emb.uncond), (noisy, emb.cond)]
        if cfg.estimator == "nfsd" and cfg.nfsd_negative_prompt:
            groups.append((noisy, self._embed(cfg.nfsd_negative_prompt)))  # cached: encoded once
        if cfg.estimator == "dds":
            assert reference is not None
            noisy_ref = ops.add_noise(reference.float(), noise, abar)  # (N, C, h, w): same t, same noise
            groups.append((noisy_ref, emb.uncond))
            if cfg.dds_reference == "image":
                groups.append((noisy_ref, emb.cond))
        eps = self.predict_eps([z for z, _ in groups], [t] * len(groups), [e for _, e in groups], cfg.batch_cfg)
        if cfg.estimator == "nfsd":
            small_t = t < cfg.nfsd_t_threshold * self.num_train_timesteps  # (N,)
            return ops.nfsd_gradient(eps[0], eps[1], eps[-1] if len(eps) == 3 else eps[0], small_t, abar,
                                     cfg.guidance_scale)
        if cfg.estimator == "dds":
            eps_ref = eps[2] if cfg.dds_reference == "background" else ops.guided_score(eps[2], eps[3],
                                                                                          cfg.guidance_scale)
            return ops.dds_gradient(ops.guided_score(eps[0], eps[1], cfg.guidance_scale), eps_ref, abar)
        return ops.sds_gradient(eps[0], eps[1], noise, abar, cfg.guidance_scale)


def posterior_noise(like: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One standard normal draw per sample for a posterior sample shaped like ``like`` ``(B, C, h, w)``:
    sample ``i`` from ``generators[i]`` (a CPU generator; None: the global one), in ``like``'s device and
    dtype, so a pair's draw does not depend on its batch."""
    gens = generators or [torch.default_generator] * like.shape[0]
    noise = torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])  # (B, C, h, w)
    return noise.to(like.device, like.dtype)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along one side of ``vae``: it halves the side once per block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(unet, vae) -> int:
    """The image side ``unet`` and ``vae`` were trained at: the UNet's latent side times the VAE's factor."""
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * vae_scale_factor(vae)


def _safetensors(name: str, component: str) -> bool | None:
    """``use_safetensors`` for one component: True for a local folder that has safetensors weights (so a
    pickle beside them is never read), else None: the libraries then take safetensors where a hub repository
    has them and fall back to the (safely loaded) pickle only where it has none."""
    folder = Path(name) / component
    return True if folder.is_dir() and any(folder.glob("*.safetensors")) else None


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """Load a Stable-Diffusion-style pipeline's components, frozen, from a hub id or local folder.

    Raises:
        ModelError: the source is not a usable SD-style pipeline, or the dtype does not suit the device.
    """
    device = torch.device(device)
    name = check_model_source(cfg, device)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = _DTYPES[cfg.dtype]
    common: dict[str, Any] = {"revision": cfg.revision, "local_files_only": offline(cfg)}
    weights = {**common, "variant": cfg.variant}
    component = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype,
                                            use_safetensors=_safetensors(name, "vae"), **weights)
        component = "unet"
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype,
                                                    use_safetensors=_safetensors(name, "unet"), **weights)
        component = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dtype,
                                                     use_safetensors=_safetensors(name, "text_encoder"), **weights)
        component = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        component = "scheduler"
        scheduler_config = _load_scheduler_config(name, common)
    except ModelError:
        raise
    except pickle.UnpicklingError:
        # The safe loader refused a pickle (it may hold code); nothing of it ran. Its message is pages long.
        raise ModelError(f"Model folder {name}, component {component}/: its weights are a pickle that a safe load "
                         "refuses (it holds objects or code); convert them to safetensors.") from None
    except (MemoryError, OverflowError, torch.OutOfMemoryError) as err:
        raise ModelError(f"Model folder {name}, component {component}/: building it failed "
                         f"({type(err).__name__}); its config describes a model too large for this machine.") from None
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"Could not load model.pretrained={cfg.pretrained}: {first} "
            "(check the hub id or folder, and set HF_HUB_OFFLINE=1 to use only the local cache)."
        ) from None
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    set_attention(cfg.attention, unet, vae)
    resolution = cfg.resolution or native_resolution(unet, vae)
    backbone = Backbone(vae, unet, text_encoder, tokenizer, scheduler_config, resolution).to(device)
    if cfg.compile:
        # The two calls of every step; the text encoder runs once per prompt and is not worth compiling.
        backbone.unet.forward = torch.compile(backbone.unet.forward)
        backbone.vae.encoder.forward = torch.compile(backbone.vae.encoder.forward)
    return backbone


def set_attention(kind: str, *models) -> None:
    """Give every attention layer of ``models`` the ``kind`` processor: ``"sdpa"`` (torch's fused
    ``scaled_dot_product_attention``) or ``"classic"`` (explicit ``baddbmm`` + softmax)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = {"sdpa": AttnProcessor2_0, "classic": AttnProcessor}[kind]
    for model in models:
        model.set_attn_processor(processor())


def _load_scheduler_config(name: str, common: dict[str, Any]) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(name, subfolder="scheduler", **common)
    return dict(config)


_SHARED: dict[str, Backbone] = {}


def cache_key(cfg: ModelConfig) -> str:
    """The key of ``cfg``'s shared backbone: every field of the model config (with the bundled model's name
    resolved to its folder), so a config that differs in any field, including one added later, loads its own."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(fields, dict)
    fields["pretrained"] = resolve_pretrained(cfg.pretrained)
    return json.dumps(fields, sort_keys=True)


def shared_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """The process-wide backbone for ``cfg``: loaded on first use, then reused by every pair."""
    key = cache_key(cfg)
    if key not in _SHARED:
        _SHARED[key] = load_backbone(cfg, device)
    return _SHARED[key].to(device)


@torch.no_grad()
def latent_blend_error(
    backbone: Backbone, images: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
    resolution: int | None = None,
) -> torch.Tensor:
    """How far the latent composite (``optimization.composite=latent``) is from encoding the pixel composite:
    ``||blend - encode(composite)|| / ||encode(composite)||`` per pair, posterior means throughout.

    Args:
        images: ``(B, 3, S, S)`` in [0, 1].
        alpha: ``(B, 1, S, S)`` in [0, 1].
        background: ``(B, 3, S, S)``.
        resolution: the encoded side (``guidance.encode_resolution``); None = the backbone's.

    Returns:
        ``(B,)`` float32 relative errors (0 where alpha is all ones or all zeros).
    """
    z_image, _ = backbone.encode_posterior(images, resolution)
    z_background, _ = backbone.encode_posterior(background, resolution)
    blend = ops.blend_latents(z_image, z_background, ops.downsample_alpha(alpha, z_image.shape[-2:]))
    true = backbone.encode_images(ops.composite(images, alpha, background), "mean", resolution=resolution)
    return ops.relative_error(blend, true)
