"""Loading the frozen diffusion model: the components of a checked source (:mod:`peekaboo.diffusion.checks`)
loaded frozen into a :class:`~peekaboo.diffusion.backbone.Backbone`, and the process-wide cache that hands every
pair the same one.

Two pipeline formats load: Stable Diffusion 1.x/2.x (one CLIP text encoder) and SDXL base (two text encoders, and
a UNet with ``addition_embed_type="text_time"`` that also takes the second encoder's pooled embedding and the
image's size ids).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from peekaboo.config import ModelConfig
from peekaboo.diffusion.backbone import Backbone, is_sdxl_format, native_resolution
from peekaboo.diffusion.checks import check_model_source, model_index, offline, resolve_pretrained
from peekaboo.errors import ModelError
from peekaboo.utils.devices import set_tf32


def _safetensors(name: str, component: str) -> bool | None:
    """``use_safetensors`` for one component: True for a local folder that has safetensors weights (so a
    pickle beside them is never read), else None: the libraries then take safetensors where a hub repository
    has them and fall back to the (safely loaded) pickle only where it has none."""
    folder = Path(name) / component
    return True if folder.is_dir() and any(folder.glob("*.safetensors")) else None


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """Load a Stable-Diffusion-style (SD 1.x/2.x or SDXL base) pipeline's components, frozen, from a hub id or
    local folder.

    Raises:
        ModelError: the source is not a usable SD-style pipeline, or the dtype does not suit the device.
    """
    device = torch.device(device)
    name = check_model_source(cfg, device)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = getattr(torch, cfg.dtype)  # one of config.DTYPES, each a torch dtype's name
    common: dict[str, Any] = {"revision": cfg.revision, "local_files_only": offline(cfg)}
    weights = {**common, "variant": cfg.variant}
    sdxl: dict[str, Any] = {}  # SDXL format: text_encoder_2, tokenizer_2 and how the empty prompt embeds
    component = "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype,
                                                    use_safetensors=_safetensors(name, "unet"), **weights)
        sdxl_format = is_sdxl_format(unet.config)
        component = "vae"
        # SDXL's VAE overflows in float16: an SDXL-format model keeps it in float32 where its config says
        # force_upcast (as diffusers' SDXL pipelines do; a VAE fixed for float16 says false). bfloat16 has float32's
        # range. SD 1.x/2.x VAEs run in float16 as diffusers' own pipelines run them.
        upcast = sdxl_format and dtype == torch.float16 and bool(
            AutoencoderKL.load_config(name, subfolder="vae", **common).get("force_upcast", True))
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=torch.float32 if upcast else dtype,
                                            use_safetensors=_safetensors(name, "vae"), **weights)
        component = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dtype,
                                                     use_safetensors=_safetensors(name, "text_encoder"), **weights)
        component = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        if sdxl_format:
            component = "text_encoder_2"
            sdxl["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder_2", dtype=dtype, use_safetensors=_safetensors(name, "text_encoder_2"),
                **weights)
            component = "tokenizer_2"
            sdxl["tokenizer_2"] = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common)
            component = "model_index.json"
            sdxl["zero_empty_prompt"] = zero_empty_prompt(model_index(cfg, name))
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
    backbone = Backbone(vae, unet, text_encoder, tokenizer, scheduler_config, resolution, **sdxl).to(device)
    backbone.set_vae_gradient_checkpointing(cfg.vae_gradient_checkpointing)
    set_tf32(cfg.tf32, device)
    if cfg.compile:
        # The two calls of every step; the text encoder runs once per prompt and is not worth compiling.
        backbone.unet.forward = torch.compile(backbone.unet.forward)
        backbone.vae.encoder.forward = torch.compile(backbone.vae.encoder.forward)
    return backbone


def zero_empty_prompt(components: dict[str, Any]) -> bool:
    """Whether an SDXL-format pipeline's unconditional embedding is zeros rather than the empty prompt's encoding:
    ``model_index.json``'s ``force_zeros_for_empty_prompt`` (SDXL base: true), diffusers' default (true) when it is
    not there."""
    return bool(components.get("force_zeros_for_empty_prompt", True))


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
    resolved to its folder), so a config that differs in any field, including one added later, loads its own;
    all but ``tf32``, a process-wide switch that :func:`shared_backbone` sets on every call."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(fields, dict)
    fields["pretrained"] = resolve_pretrained(cfg.pretrained)
    fields.pop("tf32", None)
    return json.dumps(fields, sort_keys=True)


def shared_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    """The process-wide backbone for ``cfg``: loaded on first use, then reused by every pair; on a GPU, float32
    math follows ``cfg.tf32`` from here on (:func:`~peekaboo.utils.devices.set_tf32`)."""
    key = cache_key(cfg)
    if key not in _SHARED:
        _SHARED[key] = load_backbone(cfg, device)
    set_tf32(cfg.tf32, device)
    return _SHARED[key].to(device)
