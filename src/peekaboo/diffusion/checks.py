"""The model source: what ``model.pretrained`` names (the bundled model, a local folder or a hub id), and its checks
before any weights are read.

A local folder is checked from its small JSON files (the components Peekaboo loads, their configs' sizes, the
pipeline kind) and its weight files (pickles a safe load refuses); a hub id from its ``model_index.json`` and
component configs alone, fetched into the Hugging Face cache. Two pipeline formats pass: Stable Diffusion 1.x/2.x
(one CLIP text encoder) and SDXL base (two text encoders, and a UNet with ``addition_embed_type="text_time"``);
what neither covers (an SDXL refiner, other added conditioning) is refused here, from the configs.
:mod:`peekaboo.diffusion.loading` loads what passes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from peekaboo.config import BUNDLED_MODELS, ModelConfig
from peekaboo.diffusion.backbone import (
    PREDICTION_TYPES,
    TEXT_TIME,
    TIME_IDS,
    channels_message,
    is_sdxl_format,
    prediction_message,
)
from peekaboo.errors import ModelError
from peekaboo.utils.devices import check_dtype

COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# What an SDXL-format pipeline adds: the second text encoder (with a projection: its pooled embedding conditions the
# UNet) and its tokenizer.
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
ASSETS = Path(__file__).parents[1] / "assets"
#: The shipped models' folders, by their ``model.pretrained`` name.
BUNDLED_PATHS: dict[str, Path] = {name: ASSETS / folder for name, (folder, _) in BUNDLED_MODELS.items()}

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
WEIGHTED_COMPONENTS = ("vae", "unet", "text_encoder", "text_encoder_2")
# model_index.json's _class_name prefix of SDXL's pipelines (base, img2img, inpainting, refiner).
SDXL_PIPELINES = "StableDiffusionXL"
_SUPPORTED = "Peekaboo supports Stable Diffusion 1.x/2.x-style pipelines and SDXL base-style ones."


def resolve_pretrained(name: str) -> str:
    """Map a bundled model's name (``"bundled"``, ``"bundled-shapes"``) to its shipped folder; leave hub ids and
    other paths as they are."""
    return str(BUNDLED_PATHS[name]) if name in BUNDLED_PATHS else name


def offline(cfg: ModelConfig) -> bool:
    """Load from local files only when asked to, or when ``HF_HUB_OFFLINE`` is set."""
    return cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    # Hub ids are exactly "owner/name"; anything else (or anything that exists on disk) is a folder.
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def check_model_source(cfg: ModelConfig, device: torch.device | str | None = None, segmentation: bool = False) -> str:
    """Validate ``cfg`` (and its dtype on ``device``) before any weights are read; returns the resolved name.

    A local folder is checked from its small JSON files only: the components Peekaboo loads exist, the UNet
    takes plain text conditioning or SDXL's ``text_time`` conditioning (then with a second text encoder whose
    projection fits the UNet's added embedding), the scheduler predicts epsilon or v, and, with
    ``segmentation``, the UNet takes the VAE's latents alone (an inpainting UNet's extra channels can edit but
    not segment). A hub id is checked the same way from the same small files alone (:func:`_check_hub_model`),
    so a checkpoint Peekaboo cannot drive is refused before gigabytes of weights download.

    Raises:
        ModelError: float16 on CPU, a missing folder, a folder without a Stable-Diffusion layout, a missing
            component, a pipeline Peekaboo cannot drive (an SDXL refiner, added conditioning other than SDXL's),
            or a hub id whose small files cannot be had.
    """
    if device is not None:
        check_dtype(cfg.dtype, torch.device(device).type, ModelError)
    name = resolve_pretrained(cfg.pretrained)
    if not _looks_like_path(name):
        _check_hub_model(cfg, name, segmentation)
        return name  # diffusers downloads (or reads from its cache) the rest
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(f"model.pretrained={cfg.pretrained} is a file, not a folder; pass the diffusers pipeline "
                         f"folder that holds model_index.json (e.g. {path.parent}).")
    if not path.is_dir():
        if cfg.pretrained in BUNDLED_PATHS:
            raise ModelError(f"The bundled model {cfg.pretrained} is missing from the package ({path}); "
                             "reinstall peekaboo.")
        raise ModelError(f"model.pretrained={cfg.pretrained}: no such folder; pass a diffusers model folder or hub id.")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"model.pretrained={cfg.pretrained} has no model_index.json, so it is not a diffusers pipeline folder; "
            "save one with pipeline.save_pretrained(...)."
        )
    components = _read_json(index)
    _check_components(cfg.pretrained, components)
    listed = COMPONENTS + tuple(c for c in SDXL_COMPONENTS if _listed(components, c))
    absent = [c for c in listed if not (path / c).is_dir()]
    if absent:
        raise ModelError(
            f"model.pretrained={cfg.pretrained} lacks the component folder(s) {', '.join(absent)}/; "
            "copy the complete pipeline folder."
        )
    scheduler = path / "scheduler" / "scheduler_config.json"
    _check_pipeline_kind(cfg.pretrained, components, _optional_json(path / "unet" / "config.json"),
                         _optional_json(path / "vae" / "config.json"),
                         _read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon",
                         segmentation, _optional_json(path / "text_encoder_2" / "config.json"))
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


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _class_name(components: dict[str, Any]) -> str:
    return str(components.get("_class_name", "diffusers"))


def _listed(components: dict[str, Any], component: str) -> bool:
    """Whether ``model_index.json`` names a class for ``component`` (an SDXL refiner lists ``text_encoder`` as
    ``[null, null]``: absent)."""
    entry = components.get(component)
    return entry is not None and not (isinstance(entry, list) and all(e is None for e in entry))


def _check_components(pretrained: str, components: dict[str, Any]) -> None:
    """Refuse a ``model_index.json`` without the components Peekaboo loads, or of an SDXL refiner (no first text
    encoder, time ids with an aesthetic score)."""
    class_name = _class_name(components)
    missing = [c for c in COMPONENTS if not _listed(components, c)]
    if missing and class_name.startswith(SDXL_PIPELINES) and _listed(components, "text_encoder_2"):
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} without {', '.join(missing)} (an SDXL refiner-only "
            "checkpoint?); Peekaboo needs both text encoders of an SDXL base-style pipeline, e.g. "
            "stabilityai/stable-diffusion-xl-base-1.0."
        )
    if missing:
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} pipeline without {', '.join(missing)}; "
            f"Peekaboo needs a Stable-Diffusion-style text-to-image pipeline ({', '.join(COMPONENTS)})."
        )
    if components.get("requires_aesthetics_score"):
        raise ModelError(f"model.pretrained={pretrained} is a {class_name} whose UNet is conditioned on an aesthetic "
                         f"score (requires_aesthetics_score, as SDXL's refiner); {_SUPPORTED}")


def _check_pipeline_kind(pretrained: str, components: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any],
                         prediction: str, segmentation: bool, text_encoder_2: dict[str, Any] | None = None) -> None:
    """Refuse pipelines with the SD layout that Peekaboo still cannot drive, from their component configs
    (``{}`` for a config not at hand: its defaults; ``text_encoder_2`` None: not read)."""
    class_name = _class_name(components)
    kind = unet.get("addition_embed_type")
    if kind not in (None, TEXT_TIME):
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} whose UNet needs added conditioning Peekaboo cannot "
            f"give (addition_embed_type={kind!r}; it gives none, as SD 1.x/2.x, or {TEXT_TIME!r}, as SDXL); "
            f"{_SUPPORTED}"
        )
    if kind == TEXT_TIME:
        _check_text_time(pretrained, components, unet, text_encoder_2)
    unet_channels, latent_channels = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if segmentation and unet_channels != latent_channels:
        raise ModelError(channels_message(f"model.pretrained={pretrained} ({class_name})", unet_channels,
                                           latent_channels))
    if prediction not in PREDICTION_TYPES:
        raise ModelError(prediction_message(f"model.pretrained={pretrained}", prediction))


def _check_text_time(pretrained: str, components: dict[str, Any], unet: dict[str, Any],
                     text_encoder_2: dict[str, Any] | None) -> None:
    """Refuse an SDXL-style UNet (``addition_embed_type="text_time"``) that Peekaboo cannot condition: one without
    the second text encoder, or whose added embedding does not take SDXL base's six time ids plus the second
    encoder's pooled embedding (SDXL's refiner takes five time ids: an aesthetic score in place of the target
    size). ``text_encoder_2`` is that encoder's config (None, or ``{}``: not at hand, its width unchecked)."""
    class_name = _class_name(components)
    missing = [c for c in SDXL_COMPONENTS if not _listed(components, c)]
    if missing:
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} whose UNet takes SDXL's added conditioning "
            f"(addition_embed_type={TEXT_TIME!r}), but it has no {', '.join(missing)} (that conditioning's pooled "
            f"text embedding comes from text_encoder_2); {_SUPPORTED}"
        )
    added, per_id = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    if not (isinstance(added, int) and isinstance(per_id, int)):
        return  # diffusers refuses such a UNet config itself
    pooled = (text_encoder_2 or {}).get("projection_dim")
    if isinstance(pooled, int):
        fits, what = added == TIME_IDS * per_id + pooled, f"text_encoder_2's projection_dim {pooled}"
    else:  # the second encoder's width unknown: at least room for a pooled embedding
        fits, what = added > TIME_IDS * per_id, "a pooled text embedding"
    if not fits:
        raise ModelError(
            f"model.pretrained={pretrained} is a {class_name} whose UNet's added embedding takes {added} values, "
            f"not {TIME_IDS} time ids x addition_time_embed_dim {per_id} + {what} (an SDXL refiner, or a "
            f"damaged config); {_SUPPORTED}"
        )


def _check_hub_model(cfg: ModelConfig, repo_id: str, segmentation: bool) -> None:
    """Check a hub id as a local folder is checked, from its ``model_index.json`` and the ``config.json`` of its
    UNet and VAE and ``scheduler_config.json`` (and ``text_encoder_2/config.json`` for an SDXL-style UNet):
    small files fetched (or read from the local cache) with the config's revision, offline when
    ``model.local_files_only`` or ``HF_HUB_OFFLINE`` says so; no weights are fetched."""
    components = _read_json(_hub_file(cfg, repo_id, "model_index.json"))
    _check_components(cfg.pretrained, components)
    unet = _read_json(_hub_file(cfg, repo_id, "config.json", "unet"))
    text_encoder_2 = None
    if is_sdxl_format(unet) and all(_listed(components, c) for c in SDXL_COMPONENTS):
        text_encoder_2 = _read_json(_hub_file(cfg, repo_id, "config.json", "text_encoder_2"))
    vae = _read_json(_hub_file(cfg, repo_id, "config.json", "vae"))
    scheduler = _read_json(_hub_file(cfg, repo_id, "scheduler_config.json", "scheduler"))
    _check_pipeline_kind(cfg.pretrained, components, unet, vae, scheduler.get("prediction_type", "epsilon"),
                         segmentation, text_encoder_2)


def _hub_file(cfg: ModelConfig, repo_id: str, filename: str, subfolder: str | None = None) -> Path:
    """One small file of a hub repository, from the Hugging Face cache or downloaded into it.

    Raises:
        ModelError: one line saying why the file cannot be had (no such repository, revision or file, a gated
            repository, offline and not cached, the hub unreachable).
    """
    import huggingface_hub
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"model.pretrained={cfg.pretrained}: {subfolder + '/' if subfolder else ''}{filename}"
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder, revision=cfg.revision,
                                                    local_files_only=offline(cfg)))
    except LocalEntryNotFoundError:  # offline (or the hub unreachable), and not in the cache
        raise ModelError(f"{what} could not be fetched and is not in the local Hugging Face cache (HF_HUB_OFFLINE "
                         "or model.local_files_only, or no network); download the model once with network access, "
                         "or pass a local folder.") from None
    except EntryNotFoundError:
        raise ModelError(f"{what} does not exist on the hub, so it is not a diffusers Stable-Diffusion pipeline; "
                         "pass a diffusers pipeline's hub id or folder.") from None
    except GatedRepoError:
        raise ModelError(f"{what}: the repository is gated; accept its licence on the hub and log in "
                         "(hf auth login, or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.pretrained={cfg.pretrained} is no hub repository (or a private one: log in); "
                         "check the hub id, or pass a local folder.") from None
    except RevisionNotFoundError:
        raise ModelError(f"model.pretrained={cfg.pretrained} has no revision {cfg.revision!r}; check "
                         "model.revision.") from None
    except (OSError, ValueError) as err:  # the network, a malformed id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{what} could not be fetched: {first} (check the hub id, and set HF_HUB_OFFLINE=1 to use "
                         "only the local cache).") from None


def model_index(cfg: ModelConfig, name: str) -> dict[str, Any]:
    """A checked source's ``model_index.json`` (a hub id's is in the local cache since the check)."""
    path = Path(name) / "model_index.json"
    return _read_json(path if path.is_file() else _hub_file(cfg, name, "model_index.json"))


def is_sdxl_pipeline(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s model is an SDXL-format pipeline (:func:`~peekaboo.diffusion.backbone.is_sdxl_format`),
    from its (checked) ``unet/config.json`` alone, whatever its pipeline's class name.

    Raises:
        ModelError: as :func:`check_model_source`.
    """
    name = check_model_source(cfg)
    if Path(name).is_dir():  # a checked folder (whose UNet config the check reads where there is one)
        return is_sdxl_format(_optional_json(Path(name) / "unet" / "config.json"))
    return is_sdxl_format(_read_json(_hub_file(cfg, name, "config.json", "unet")))
