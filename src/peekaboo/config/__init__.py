"""Typed configuration: dataclasses merged with YAML presets and ``key=value`` overrides.

The dataclasses below hold every default in exactly one place. The defaults are the paper's settings for
Stable Diffusion 1.x (docs/DESIGN.md); the YAML presets only override them. The presets ship inside the
package (``peekaboo/configs/``, which the repository's ``configs/`` links to), so ``peekaboo-predict`` run
from any folder behaves as ``predict.py`` in the repository; ``PEEKABOO_CONFIG_DIR`` points at a folder of
one's own instead (:func:`preset_dir`). In that folder:

- ``configs/<task>.yaml`` (``predict.yaml``, ``train.yaml``) is read first;
- a group selection on the command line, ``model=sd15`` or ``data=voc``, merges ``configs/model/sd15.yaml``
  (its keys are rooted at the top level, so a model preset can also set the mask or guidance that suit it);
- then every ``key=value`` override, in order. Repeating a list key (``prompt=a prompt=b``) appends.

Unknown keys and values of the wrong type are :class:`~peekaboo.errors.ConfigError` naming the key; range
checks live in :func:`validate`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING as _NO_FACTORY
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode, ValueNode

from peekaboo.errors import ConfigError
from peekaboo.utils.devices import ACCELERATORS, check_dtype
from peekaboo.utils.images import DEFAULT_MAX_PIXELS

MASK_KINDS = ("raster", "fourier", "raster_bilateral", "fourier_bilateral")
BACKGROUNDS = ("solid", "noise", "blur")
FIT_MODES = ("scale", "crop", "pad")
OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "float16", "bfloat16")
# "sdpa": torch's fused scaled_dot_product_attention (diffusers' default on torch 2); "classic": diffusers'
# AttnProcessor (explicit matmul + softmax), for comparison and for backends where SDPA misbehaves.
ATTENTIONS = ("sdpa", "classic")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed")
GRAVITY_REDUCTIONS = ("sum", "mean")
LATENT_MODES = ("mean", "sample")
COMPOSITES = ("pixel", "latent")
# optimization.optim.schedule: the learning rate over a pair's steps (peekaboo.optim.module.lr_factor).
LR_SCHEDULES = ("constant", "cosine", "step")
# optimization.guidance.t_schedule: where each step's dream-loss timestep comes from (peekaboo.ops.timestep_range).
T_SCHEDULES = ("uniform", "annealed", "stratified")
# optimization.guidance.estimator: how the UNet's predictions make the dream-loss gradient (peekaboo.ops:
# sds_gradient, nfsd_gradient, dds_gradient); guidance.dds_reference: what the dds reference branch sees.
ESTIMATORS = ("sds", "nfsd", "dds")
DDS_REFERENCES = ("background", "image")
# optimization.guidance.noise: where the noisy latents come from (a fresh draw, or DDIM inversion).
NOISE_KINDS = ("random", "ddim_inversion")
# optimization.mask.init: where the mask starts (peekaboo.optim.module.PeekabooModule.on_fit_start).
MASK_INITS = ("constant", "cross_attention", "region")
# How restarts score a candidate: the denoising error under the prompt, or that error over the error without it.
RESTART_FITS = ("error", "error_ratio")
# Lightning config groups that a ``group=name`` override selects from ``configs/<group>/<name>.yaml``.
GROUPS = ("model", "data")
# Environment variable naming a folder of presets that replaces the packaged ones.
CONFIG_DIR_ENV = "PEEKABOO_CONFIG_DIR"
MAX_MASK_SIZE = 4096
# run.logger values: Lightning's loggers (peekaboo.optim.loggers builds them), or none.
LOGGERS = ("tensorboard", "csv", "wandb", "mlflow", "none")
# Loggers whose package is an optional extra of this project: logger -> (module, pip extra).
OPTIONAL_LOGGERS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}

BUNDLED_MODEL = "bundled"


@dataclass
class ModelConfig:
    """The frozen text-to-image diffusion model (diffusers Stable-Diffusion layout)."""

    # "bundled" (the small shapes model shipped in the package), a hub id, or a local folder.
    pretrained: str = BUNDLED_MODEL
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to load a checkpoint's half-precision weight files
    dtype: str = "float32"  # weights of the frozen model; the mask always stays float32
    # Forces offline loading; HF_HUB_OFFLINE=1 in the environment does the same.
    local_files_only: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet and the VAE encoder (pays off on GPUs for long runs)
    attention: str = "sdpa"  # the UNet's and VAE's attention kernels: sdpa | classic
    # Side length the composite is resized to before VAE encoding; None = the model's native
    # resolution (unet.sample_size * VAE downsampling factor: 512 for SD 1.x).
    resolution: int | None = None


@dataclass
class GuidanceConfig:
    """The dream loss (score distillation), DESIGN.md step 5."""

    guidance_scale: float = 100.0
    t_min: float = 0.02  # fraction of the training timesteps
    t_max: float = 0.98
    # Encode the composite with the VAE posterior mean or a sample from it (the paper samples).
    latent_mode: str = "sample"
    # Run [uncond, cond] as one UNet batch of 2B (faster) or as two calls (less memory).
    batch_cfg: bool = True
    # uniform: t ~ U[t_min, t_max] every step (the paper); annealed: t falls linearly from t_max to t_min over
    # the run, drawn within +-t_anneal_jitter of that line (after DreamTime, arXiv:2306.12422); stratified:
    # the steps cycle through t_strata equal slices of [t_min, t_max], one draw in each.
    t_schedule: str = "uniform"
    t_anneal_jitter: float = 0.05  # annealed: half-width of the band around the line, in the units of t_min
    t_strata: int = 8  # stratified: how many slices of [t_min, t_max] a cycle visits
    # Timestep/noise draws per step for the same composite, in one UNet batch of B*K (2B*K with batch_cfg);
    # the gradient is their mean (a lower-variance estimate at K times the UNet cost).
    samples_per_step: int = 1
    # The gradient from the predictions (UNet rows per draw: 2 with batch_cfg). sds: w (eps_hat - eps), the
    # paper's; nfsd: Noise-Free Score Distillation (arXiv:2310.17590), w (delta_D + s delta_C), no noise term
    # (meant for ordinary guidance scales such as 7.5); dds: a reference branch on the same t and noise is
    # subtracted, after Delta Denoising Score (arXiv:2304.07090).
    estimator: str = "sds"
    # nfsd: delta_D is eps_u below this fraction of the training timesteps, eps_u - eps_neg above it.
    nfsd_t_threshold: float = 0.2
    # nfsd: the negative prompt of eps_neg; "" makes eps_neg = eps_u (no extra rows), another adds a row per draw.
    nfsd_negative_prompt: str = ""
    # dds: background (the step's background, with the empty prompt: +1 row per draw) or image (the unmasked
    # image, with the prompt and guidance: +2 rows per draw); both encoded with the VAE's posterior mean.
    dds_reference: str = "background"
    # random: z_t from a fresh eps ~ N(0, I) (the paper); ddim_inversion: z_t by DDIM inversion of the clean
    # latents in inversion_steps steps, eps the implied noise (SDI, arXiv:2405.15891); each inversion step is
    # one more UNet call of 2 rows per draw (with guidance).
    noise: str = "random"
    inversion_steps: int = 4
    # ddim_inversion: the guidance scale of the inversion's own predictions, apart from the dream loss's (SDI's
    # published default; inverting at the loss's own scale lost the masks on the shapes tune split).
    inversion_guidance_scale: float = -7.5
    # Side the composite is resized to before the VAE encoder in this optimization; None = the backbone's
    # (model.resolution, else the model's native side). A smaller side makes the encoder's forward and
    # backward cheaper; it must be a multiple of the VAE factor times the UNet's downsampling (checked on load).
    encode_resolution: int | None = None


@dataclass
class BilateralConfig:
    """Image-guided bilateral filter applied to the mask logits (the *_bilateral kinds)."""

    kernel: int = 3
    sigma: float = 5.0  # spatial Gaussian, in pixels
    colour_tolerance: float = 0.08  # colour-similarity Gaussian, on RGB in [0, 1]
    iterations: int = 40


@dataclass
class FourierConfig:
    """The per-pixel MLP over random Fourier features (the fourier* kinds)."""

    num_features: int = 128
    scale: float = 10.0
    hidden: int = 256
    layers: int = 3


@dataclass
class RegionsConfig:
    """The image regions that ``mask.init=region`` starts from (:mod:`peekaboo.optim.regions`): Felzenszwalb segments
    of the image at the mask's resolution, ranked by the model's denoising error under the prompt with each
    region as a hard mask (the restarts' ``fit=error``) over ``draws`` draws they all share."""

    scale: float = 100.0  # Felzenszwalb's scale on RGB in [0, 1]: higher, fewer and larger regions
    sigma: float = 0.5  # Gaussian smoothing (pixels) before segmenting; it evens out pixel noise
    min_area: float = 0.002  # fraction of the image: smaller segments merge into a neighbour, then are dropped
    max_area: float = 0.5  # fraction of the image: larger segments (backgrounds) are not proposed
    draws: int = 16  # ranking draws per region
    # The ranking timesteps, t ~ U[t_min, t_max) as fractions of the training timesteps: the whole range, since
    # the noisiest draws tell an object's shape and colour apart best and the least noisy its edges.
    t_min: float = 0.02
    t_max: float = 0.98


@dataclass
class MaskConfig:
    kind: str = "fourier_bilateral"
    size: int = 256  # working resolution of the mask (square)
    init_logit: float = 0.0  # raster, init=constant: initial logit of every pixel (0 = alpha 0.5)
    # constant: raster logits at init_logit, the Fourier MLP's random init. cross_attention (raster kinds only):
    # before the first step the raster's logits become init_scale * (m - init_threshold), m the model's cross-attention
    # map of the prompt over the image in [0, 1] (peekaboo.diffusion.attention), so alpha starts above 0.5 where m is
    # above init_threshold (before any bilateral filter). region (raster kinds only): the logits become
    # init_scale * (r - init_threshold), r an image region in {0, 1} the model ranks best (peekaboo.optim.regions; the
    # k-th region start of a pair among its restarts takes the k-th best region, and with fewer regions than
    # region starts the extra ones keep the constant start). A resumed run keeps its checkpointed mask.
    init: str = "constant"
    # cross_attention: logits per unit of the map; 8 with init_threshold 0.5 starts alpha in 0.02 .. 0.98.
    init_scale: float = 8.0
    init_threshold: float = 0.5  # cross_attention: the map value that starts at alpha 0.5
    fourier: FourierConfig = field(default_factory=FourierConfig)
    bilateral: BilateralConfig = field(default_factory=BilateralConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)


@dataclass
class LossConfig:
    # "Gravity" pulls alpha towards 0. With reduction "sum" it multiplies sum(alpha) over the mask pixels
    # (the paper); with "mean" it multiplies mean(alpha), i.e. sum(alpha) / (size*size).
    gravity: float = 0.05
    gravity_reduction: str = "sum"
    lambda_dream: float = 1.0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 1e-5
    momentum: float = 0.0  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw only
    weight_decay: float = 0.0
    # The learning rate over a pair's trainer.max_steps steps: constant (the paper), cosine (from lr down to
    # final_lr_fraction * lr at the last step) or step (times step_gamma every step_every steps); each after
    # warmup_steps of linear warm-up from lr / warmup_steps.
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0  # cosine only
    step_every: int = 100  # step only
    step_gamma: float = 0.5  # step only


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments a Peekaboo run uses."""

    accelerator: str = "auto"
    devices: int = 1  # dataset runs: worker processes, one device each
    precision: str = "32-true"
    max_steps: int = 300
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True


@dataclass
class EarlyStopConfig:
    """Stop a pair when its binary mask has stopped changing (and, with ``loss_tolerance``, its dream loss
    has stopped improving). In a batch each pair stops on its own and is frozen from then on; the batch ends
    when all its pairs have stopped."""

    enabled: bool = False
    tolerance: float = 0.002  # at most this fraction of the mask's pixels flipped between checks ...
    patience: int = 20  # ... for this many consecutive steps
    min_steps: int = 50  # never stop before this step
    # None: the mask test alone. A number: also wait until the EMA of the pair's dream loss has not fallen
    # below (1 - loss_tolerance) times its best value for `patience` steps.
    loss_tolerance: float | None = None
    loss_ema: float = 0.9  # decay of that EMA (0: the raw per-step loss, which the random t makes noisy)


@dataclass
class RestartsConfig:
    """Several independent optimizations of each pair, one kept, chosen by the model itself (no labels): the
    candidate whose composite the prompt explains best, i.e. with the lowest denoising error under the prompt
    over ``draws`` (background, timestep, noise) draws that all of a pair's candidates share
    (:mod:`peekaboo.optim.restarts`). Candidate 0 is the single optimization's mask, bit for bit."""

    count: int = 1  # optimizations per pair; 1: one (the paper), no scoring
    draws: int = 16  # scoring draws per candidate (one VAE encode and one UNet call of this batch)
    t_min: float = 0.2  # the scoring timesteps, t ~ U[t_min, t_max) as fractions of the training timesteps
    t_max: float = 0.8
    # error: the mean denoising error under the prompt; error_ratio: the mean of that error over the error under
    # the empty prompt on the same draw, i.e. how much the prompt explains beyond what any caption would. The
    # ratio discounts how easy a composite is to denoise at all (a large plain object, a small one, an empty
    # background), which the plain error rewards regardless of the prompt. One more UNet row per draw.
    fit: str = "error"
    # Each candidate's mask.init, cycled (candidate k takes mask_inits[k % len]); empty: mask.init for all. A
    # mix (e.g. [constant, cross_attention]) gives candidates that start apart and so settle apart.
    mask_inits: list[str] = field(default_factory=list)


@dataclass
class OptimizationConfig:
    """Everything that defines one pair's optimization."""

    seed: int = 0
    background: str = "solid"  # random solid colour each step (the paper); "noise" or "blur" also work
    threshold: float = 0.5  # binary mask = alpha > threshold
    mask: MaskConfig = field(default_factory=MaskConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    restarts: RestartsConfig = field(default_factory=RestartsConfig)
    # Where the composite is made: "pixel" (alpha * image + (1 - alpha) * background, VAE-encoded with
    # gradient: the paper's) or "latent" (alpha pooled to the latent grid blends the image's cached latents
    # with the background's, encoded without gradient: no VAE backward, an approximation of the encoding).
    composite: str = "pixel"


@dataclass
class ImageConfig:
    """How an image becomes the square working canvas, and how the mask maps back."""

    fit: str = "scale"  # scale (stretch), crop (centre crop; outside the crop alpha is 0), or pad
    # RGBA images are flattened over this colour (RGB in [0, 1]) before use.
    flatten_background: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # Refuse images with more pixels than this (decompression bombs).
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class SamplingConfig:
    """Sampling from the diffusion model (edit and generate), with diffusers' pipelines."""

    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    size: int | None = None  # square output side for generate; None = the model's native resolution


@dataclass
class EditConfig:
    """Regenerate the segmented region from a new prompt, keeping every pixel outside it."""

    prompt: str | None = None  # e.g. "a blue square"; None = no edit
    strength: float = 1.0  # 1 = the masked region is regenerated from pure noise; lower keeps more of it
    dilation: int = 2  # grow the binary mask by this many pixels (of the original image) before editing
    feather: float = 2.0  # ramp width in pixels inside the dilated mask: 0 at its border, full edit this far in


@dataclass
class PredictConfig:
    """``predict.py``: segment one image for one or more prompts (or a generated one: ``generate=``)."""

    image: str | None = None
    prompt: list[str] = field(default_factory=list)
    # Text to RGBA: sample an image for this prompt, segment it with the same prompt, write an RGBA PNG.
    generate: str | None = None
    output_dir: str = "outputs"
    tensorboard: bool = True
    edit: EditConfig = field(default_factory=EditConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_options: ImageConfig = field(default_factory=ImageConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


DATA_SOURCES = ("manifest", "shapes", "voc", "refcoco", "folder")


@dataclass
class DataConfig:
    """Where a dataset run's pairs come from (see ``peekaboo.data``)."""

    source: str = MISSING  # manifest | shapes | voc | refcoco | folder
    # manifest: the JSONL/CSV file (image, prompt, optional mask, optional id; paths relative to it).
    manifest: str | None = None
    # voc: the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/);
    # refcoco: the folder holding refs(<split_by>).p and instances.json, and images under images_dir;
    # folder: the folder searched recursively for images.
    root: str | None = None
    # folder: the prompts of every image without a sidecar <image stem>.txt (which replaces them for its image).
    prompts: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".webp"])  # folder: suffixes
    images_dir: str | None = None  # refcoco: COCO train2014 images (default <root>/images)
    split: str = "val"  # voc: ImageSets/Segmentation/<split>.txt; refcoco: the refs' split; shapes: eval | tune
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog (informational; the files define the data)
    split_by: str = "unc"  # refcoco: reads refs(<split_by>).p
    num_pairs: int | None = None  # shapes: how many pairs; other sources: keep only the first N
    # Manifest paths outside the manifest's folder (../, absolute) are refused unless this is set.
    allow_outside_root: bool = False
    # Pairs optimized together in one module (one VAE and one UNet call per step); each stays independent.
    pairs_per_step: int = 1


@dataclass
class RunConfig:
    """A dataset run's outputs and bookkeeping under ``<root>/<name>/``."""

    name: str = MISSING
    root: str = "runs"
    checkpoint_every_n_steps: int = 50  # per-pair ModelCheckpoint; a resumed pair continues from the last one
    keep_checkpoints: bool = False  # delete a pair's checkpoints once it is done
    save_overlays: bool = True
    logger: str = "tensorboard"  # one run per pair: tensorboard | csv | wandb | mlflow | none
    tensorboard: bool = True  # false = no logger at all (as run.logger=none; kept for existing commands)
    # Seconds between the job-wide progress lines (pairs finished of all, ETA) in a log that is not a terminal.
    progress_every_s: float = 30.0


@dataclass
class TrainConfig:
    """``train.py``: optimize every pair of a dataset."""

    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_options: ImageConfig = field(default_factory=ImageConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


C = TypeVar("C")


def preset_dir() -> Path:
    """The folder of YAML presets: ``$PEEKABOO_CONFIG_DIR`` if set, else the presets inside the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(str(resources.files("peekaboo") / "configs"))


def _group_files(config_dir: Path, argv: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Split ``group=name`` selections (whose YAML exists) from ordinary overrides."""
    files, rest = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in GROUPS and "." not in value and "/" not in value:
            path = config_dir / key / f"{value}.yaml"
            if not path.is_file():
                choices = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                raise ConfigError(f"{key}={value}: no such config group file {path}; choose one of {choices}.")
            files.append(path)
        else:
            rest.append(arg)
    return files, rest


def _parse_overrides(argv: Sequence[str], schema: DictConfig) -> DictConfig:
    """Turn ``key=value`` strings into a config; repeated list keys accumulate.

    A value for a text field (``str``, ``Optional[str]`` or a list of ``str`` in ``schema``) is taken literally:
    a prompt such as ``a red circle: the big one`` or ``{x}`` stays that text instead of becoming a YAML
    mapping (a list of text still takes a flow list of plain items, ``prompt=[a, b]``, see :func:`_text_list`).
    Every other value is parsed as YAML, and one of the wrong shape for its field (a mapping or list for a
    number, a nested value in a list of numbers) is a :class:`ConfigError` naming the key.
    """
    dotlist: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"{arg!r} is not a key=value override; write e.g. prompt=\"a red circle\".")
        node = _schema_node(schema, key)
        if isinstance(node, ListConfig) and node._metadata.element_type is str:
            parsed: Any = _text_list(value)
        elif isinstance(node, StringNode):
            parsed = _literal(value, optional=node._is_optional())
        else:
            parsed = _parse_value(key, value)
        section = OmegaConf.select(schema, key, default=None, throw_on_missing=False)
        if isinstance(section, DictConfig) and not isinstance(parsed, (dict, DictConfig)):
            raise ConfigError(f"{key}={value}: {key} is a config section, not a value; set one of its keys "
                              f"({', '.join(f'{key}.{k}' for k in list(section.keys())[:4])}, ...).")
        _check_shape(key, value, parsed, node)
        is_list = isinstance(node, ListConfig) or _is_list_field(schema, key)
        if is_list and not isinstance(parsed, (list, ListConfig)):
            dotlist.setdefault(key, []).append(parsed)
        else:
            dotlist[key] = parsed
    cfg = OmegaConf.create()
    for key, value in dotlist.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


# What ``key=null`` means for an optional text field (e.g. ``edit.prompt=null`` clears an edit a config file set);
# any other spelling, and this one for a prompt, is text.
_NULL_TEXT = "null"
# The names of scalar field types in "takes one ..." messages.
_SCALAR_NAMES = {IntegerNode: "integer", FloatNode: "number", BooleanNode: "true or false"}


def _parse_value(key: str, value: str) -> Any:
    """``value`` parsed as YAML, as OmegaConf parses a dotlist value; errors name ``key``."""
    try:
        return OmegaConf.from_dotlist([f"x={value}"]).x if value.strip() else value
    except yaml.YAMLError as err:
        # The value is parsed alone under a dummy key: name the real key, and the parser's first line only.
        raise ConfigError(f"Bad value for config key {key!r}: {value!r} cannot be parsed "
                          f"({str(err).splitlines()[0]}); quote it or fix its brackets.") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"Bad value for config key {key!r}: {value!r} cannot be resolved "
                          f"({str(err).splitlines()[0].rstrip('.')}).") from None


def _literal(value: str, optional: bool) -> str | None:
    """``value`` as the text it is; ``${`` is escaped so OmegaConf never reads it as an interpolation."""
    if optional and value == _NULL_TEXT:
        return None
    return value.replace("${", "\\${")


def _schema_node(schema: DictConfig, key: str) -> Any:
    """The schema's node for a dotted ``key`` (a value node, list or section), or None for an unknown key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key, default=None) if parent_key else schema
    if not isinstance(parent, DictConfig):
        return None
    # Not ``leaf in parent``: that is False for a required (``???``) key such as run.name.
    return parent._get_node(leaf, throw_on_missing_key=False)


def _text_list(value: str) -> str | list[str]:
    """A value for a list-of-text field: a flow list of plain items (``[a, b]``) is that list, each item taken
    as written; anything else (``a: b``, ``[x] y``, ``[a, b: c]``, ``- x``) is one item, taken literally."""
    if value.lstrip().startswith("["):
        try:
            # BaseLoader keeps every scalar as the text written ([true, 1e5] is ["true", "1e5"]) and, unlike
            # the full loader, builds no objects.
            items = yaml.load(value, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.replace("${", "\\${") for item in items]
    return _literal(value, optional=False)  # type: ignore[return-value]


def _check_shape(key: str, value: str, parsed: Any, node: Any) -> None:
    """Refuse a mapping or list where ``node`` takes one number or flag, and nesting in a list of them."""
    containers = (dict, list, DictConfig, ListConfig)
    if isinstance(node, ValueNode) and not isinstance(node, StringNode) and isinstance(parsed, containers):
        what = "mapping" if isinstance(parsed, (dict, DictConfig)) else "list"
        kind = _SCALAR_NAMES.get(type(node), "value")
        raise ConfigError(f"{key}={value}: {key} takes one {kind}, not a {what}; write e.g. {key}={node._value()}.")
    if isinstance(node, ListConfig) and node._metadata.element_type is not str:
        items = parsed if isinstance(parsed, (list, ListConfig)) else [parsed]
        if any(isinstance(item, containers) for item in items):
            example = ",".join(str(v) for v in node) if len(node) else "..."
            raise ConfigError(f"{key}={value}: {key} is a list of plain values, not of mappings or lists; "
                              f"write e.g. {key}=[{example}].")


def _is_list_field(schema: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    if not isinstance(parent, DictConfig):
        return False
    try:
        return OmegaConf.is_list(parent._get_node(leaf)) or "list" in str(parent._get_node(leaf)._metadata.ref_type)
    except (AttributeError, KeyError, OmegaConfBaseException):
        return False


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or ("Key '" in msg and "not" in msg):
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        options = list(parent.keys()) if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(leaf, options, n=1)
        hint = f" Did you mean {(parent_key + '.' if parent_key else '') + close[0]!r}?" if close else ""
        return f"Unknown config key {key!r}.{hint} Valid keys here: {', '.join(options)}."
    return f"Bad value for config key {key!r}: {msg}."


def load_config(
    schema_cls: type[C], argv: Sequence[str], config_dir: str | os.PathLike | None = None, task: str | None = None,
    inputs: bool = True,
) -> C:
    """Build a config from ``schema_cls`` defaults, ``configs/<task>.yaml``, group files and overrides.

    Args:
        schema_cls: the dataclass that defines keys, types and defaults.
        argv: command-line ``key=value`` strings (and ``group=name`` selections).
        config_dir: folder with ``<task>.yaml`` and group sub-folders; None uses defaults and overrides only.
        task: the base YAML's stem, e.g. ``"predict"``.
        inputs: require a predict config's inputs (see :func:`validate`).

    Returns:
        The validated config object (an OmegaConf structured config typed as ``schema_cls``).

    Raises:
        ConfigError: unknown key, wrong type, missing required value or out-of-range value.
    """
    schema = OmegaConf.structured(schema_cls)
    sources: list[Path] = []
    if config_dir is not None:
        config_dir = Path(config_dir)
        groups, argv = _group_files(config_dir, argv)
        if task is not None and (config_dir / f"{task}.yaml").is_file():
            sources.append(config_dir / f"{task}.yaml")
        sources += groups
    try:
        cfg = schema
        for path in sources:
            cfg = OmegaConf.merge(cfg, _load_yaml(path, config_dir, groups, schema))
        cfg = OmegaConf.merge(cfg, _parse_overrides(argv, schema))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, schema)) from None
    if missing:
        raise ConfigError(f"Missing required config value(s): {', '.join(missing)}; pass them as key=value.")
    validate(cfg, inputs)
    return cfg  # type: ignore[return-value]


def apply_overrides(cfg: C, overrides: Mapping[str, Any], inputs: bool = True) -> C:
    """``cfg`` with ``overrides`` merged in and validated, for callers in Python (the command line's
    ``key=value`` strings go through :func:`load_config`).

    Args:
        cfg: a config built by :func:`load_config` (or ``OmegaConf.structured``).
        overrides: nested (``{"trainer": {"max_steps": 50}}``) and/or dotted (``{"trainer.max_steps": 50}``)
            keys with Python values, taken as they are (no YAML parsing).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range.
    """
    schema = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    try:
        update = OmegaConf.create()
        for key, value in overrides.items():
            OmegaConf.update(update, key, value, merge=True, force_add=True)
        merged = OmegaConf.merge(schema, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, schema)) from None
    validate(merged, inputs)
    return merged  # type: ignore[return-value]


def _load_yaml(path: Path, config_dir: Path, selected: list[Path], schema: DictConfig) -> DictConfig:
    """Load one YAML file; a task file's ``defaults: {group: name}`` pulls in group files the command line
    did not select itself."""
    data = OmegaConf.load(path)
    if path.parent.parent == config_dir and path.parent.name in GROUPS:  # a group file
        return _for_task(data, schema)
    defaults = data.pop("defaults", None) if isinstance(data, DictConfig) else None
    if not defaults:
        return data
    chosen = {p.parent.name for p in selected}
    merged = OmegaConf.create()
    for group, name in defaults.items():
        if group not in chosen:
            group_file = config_dir / group / f"{name}.yaml"
            if not group_file.is_file():
                raise ConfigError(f"{path}: defaults name {group}={name}, but {group_file} does not exist.")
            merged = OmegaConf.merge(merged, _for_task(OmegaConf.load(group_file), schema))
    return OmegaConf.merge(merged, data)


def _for_task(group: DictConfig, schema: DictConfig) -> DictConfig:
    """A group file's settings for the task being configured.

    A model preset holds what suits its model for every task, e.g. ``data.pairs_per_step`` for dataset runs;
    a task leaves out the sections only other tasks have (``predict.py`` has no ``data``). Any other unknown
    key still fails the merge.
    """
    other_tasks = {f.name for task in (TrainConfig, PredictConfig) for f in fields(task)}
    for key in [k for k in group if k in other_tasks and k not in schema]:
        group.pop(key)
    return group


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Config key {key!r} = {value!r} is out of range; allowed: {allowed}.")


def check_mask_init(cfg: MaskConfig, prefix: str = "optimization.", init: str | None = None,
                    key: str = "mask.init") -> None:
    """Refuse a mask init (``init``, default ``cfg.init``, read from config key ``key``) that the mask kind cannot
    start from (raises ConfigError naming the key)."""
    init = cfg.init if init is None else init
    if init != "constant" and not cfg.kind.startswith("raster"):
        raise ConfigError(f"Config key {prefix + key!r} = {init!r} supports the raster kinds only, "
                          f"not mask.kind={cfg.kind!r}; set {prefix}mask.kind=raster or raster_bilateral, or "
                          + (f"{prefix}mask.init=constant." if key == "mask.init" else
                             f"leave {init} out of {prefix}{key}."))


def validate_optimization(cfg: OptimizationConfig, prefix: str = "optimization.") -> None:
    """Range checks for one pair's optimization settings (raises ConfigError naming the key)."""
    p = prefix
    _check(cfg.background in BACKGROUNDS, p + "background", cfg.background, " | ".join(BACKGROUNDS))
    _check(0.0 <= cfg.threshold <= 1.0, p + "threshold", cfg.threshold, "0 <= threshold <= 1")
    m = cfg.mask
    _check(m.kind in MASK_KINDS, p + "mask.kind", m.kind, " | ".join(MASK_KINDS))
    # Above a few thousand pixels the mask only costs memory: the model sees the composite at its resolution.
    _check(8 <= m.size <= MAX_MASK_SIZE, p + "mask.size", m.size, f"an integer in [8, {MAX_MASK_SIZE}]")
    _check(m.bilateral.kernel >= 1 and m.bilateral.kernel % 2 == 1, p + "mask.bilateral.kernel",
           m.bilateral.kernel, "an odd integer >= 1")
    _check(m.bilateral.iterations >= 0, p + "mask.bilateral.iterations", m.bilateral.iterations, ">= 0")
    _check(m.bilateral.sigma > 0, p + "mask.bilateral.sigma", m.bilateral.sigma, "> 0")
    _check(m.bilateral.colour_tolerance > 0, p + "mask.bilateral.colour_tolerance",
           m.bilateral.colour_tolerance, "> 0")
    _check(m.fourier.num_features >= 1, p + "mask.fourier.num_features", m.fourier.num_features, ">= 1")
    _check(m.fourier.layers >= 1, p + "mask.fourier.layers", m.fourier.layers, ">= 1")
    _check(m.fourier.hidden >= 1, p + "mask.fourier.hidden", m.fourier.hidden, ">= 1")
    _check(m.fourier.scale > 0, p + "mask.fourier.scale", m.fourier.scale, "> 0")
    _check(m.init in MASK_INITS, p + "mask.init", m.init, " | ".join(MASK_INITS))
    _check(m.init_scale > 0, p + "mask.init_scale", m.init_scale, "> 0")
    _check(0 <= m.init_threshold <= 1, p + "mask.init_threshold", m.init_threshold, "a map value in [0, 1]")
    rg = m.regions
    _check(rg.scale > 0, p + "mask.regions.scale", rg.scale, "> 0")
    _check(rg.sigma >= 0, p + "mask.regions.sigma", rg.sigma, ">= 0")
    _check(0 <= rg.min_area <= rg.max_area <= 1, p + "mask.regions.min_area/max_area", (rg.min_area, rg.max_area),
           "fractions of the image with 0 <= min_area <= max_area <= 1")
    _check(rg.draws >= 1, p + "mask.regions.draws", rg.draws, "an integer >= 1")
    _check(0.0 <= rg.t_min < rg.t_max <= 1.0, p + "mask.regions.t_min/t_max", (rg.t_min, rg.t_max),
           "0 <= t_min < t_max <= 1 (fractions of the training timesteps)")
    check_mask_init(m, p)
    g = cfg.guidance
    _check(0.0 <= g.t_min < g.t_max <= 1.0, p + "guidance.t_min/t_max", (g.t_min, g.t_max),
           "0 <= t_min < t_max <= 1 (fractions of the training timesteps)")
    _check(g.guidance_scale >= 0, p + "guidance.guidance_scale", g.guidance_scale, ">= 0")
    _check(g.latent_mode in LATENT_MODES, p + "guidance.latent_mode", g.latent_mode, " | ".join(LATENT_MODES))
    _check(g.t_schedule in T_SCHEDULES, p + "guidance.t_schedule", g.t_schedule, " | ".join(T_SCHEDULES))
    _check(0 <= g.t_anneal_jitter <= 1, p + "guidance.t_anneal_jitter", g.t_anneal_jitter, "a fraction in [0, 1]")
    _check(g.t_strata >= 1, p + "guidance.t_strata", g.t_strata, "an integer >= 1")
    _check(g.samples_per_step >= 1, p + "guidance.samples_per_step", g.samples_per_step, "an integer >= 1")
    _check(g.estimator in ESTIMATORS, p + "guidance.estimator", g.estimator, " | ".join(ESTIMATORS))
    _check(0 < g.nfsd_t_threshold < 1, p + "guidance.nfsd_t_threshold", g.nfsd_t_threshold, "a fraction in (0, 1)")
    _check(g.dds_reference in DDS_REFERENCES, p + "guidance.dds_reference", g.dds_reference,
           " | ".join(DDS_REFERENCES))
    _check(g.noise in NOISE_KINDS, p + "guidance.noise", g.noise, " | ".join(NOISE_KINDS))
    _check(g.inversion_steps >= 1, p + "guidance.inversion_steps", g.inversion_steps, "an integer >= 1")
    _check(g.encode_resolution is None or g.encode_resolution >= 8, p + "guidance.encode_resolution",
           g.encode_resolution, "null or an integer >= 8")
    _check(cfg.composite in COMPOSITES, p + "composite", cfg.composite, " | ".join(COMPOSITES))
    ls = cfg.loss
    _check(ls.gravity >= 0, p + "loss.gravity", ls.gravity, ">= 0")
    _check(ls.lambda_dream >= 0, p + "loss.lambda_dream", ls.lambda_dream, ">= 0")
    _check(ls.gravity_reduction in GRAVITY_REDUCTIONS, p + "loss.gravity_reduction", ls.gravity_reduction,
           " | ".join(GRAVITY_REDUCTIONS))
    o = cfg.optim
    _check(o.name in OPTIMIZERS, p + "optim.name", o.name, " | ".join(OPTIMIZERS))
    _check(o.lr > 0, p + "optim.lr", o.lr, "> 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), p + "optim.betas", list(o.betas),
           "two numbers in [0, 1)")
    _check(o.momentum >= 0, p + "optim.momentum", o.momentum, ">= 0")
    _check(o.weight_decay >= 0, p + "optim.weight_decay", o.weight_decay, ">= 0")
    _check(o.schedule in LR_SCHEDULES, p + "optim.schedule", o.schedule, " | ".join(LR_SCHEDULES))
    _check(o.warmup_steps >= 0, p + "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    _check(0 <= o.final_lr_fraction <= 1, p + "optim.final_lr_fraction", o.final_lr_fraction, "a fraction in [0, 1]")
    _check(o.step_every >= 1, p + "optim.step_every", o.step_every, "an integer >= 1")
    _check(0 < o.step_gamma <= 1, p + "optim.step_gamma", o.step_gamma, "0 < step_gamma <= 1")
    e = cfg.early_stop
    _check(0 <= e.tolerance <= 1, p + "early_stop.tolerance", e.tolerance, "a fraction in [0, 1]")
    _check(e.patience >= 1, p + "early_stop.patience", e.patience, "an integer >= 1")
    _check(e.min_steps >= 0, p + "early_stop.min_steps", e.min_steps, "an integer >= 0")
    _check(e.loss_tolerance is None or e.loss_tolerance >= 0, p + "early_stop.loss_tolerance", e.loss_tolerance,
           "null (mask test only) or a relative improvement >= 0")
    _check(0 <= e.loss_ema < 1, p + "early_stop.loss_ema", e.loss_ema, "0 <= loss_ema < 1")
    r = cfg.restarts
    _check(r.count >= 1, p + "restarts.count", r.count, "an integer >= 1")
    _check(r.draws >= 1, p + "restarts.draws", r.draws, "an integer >= 1")
    _check(0.0 <= r.t_min < r.t_max <= 1.0, p + "restarts.t_min/t_max", (r.t_min, r.t_max),
           "0 <= t_min < t_max <= 1 (fractions of the training timesteps)")
    _check(r.fit in RESTART_FITS, p + "restarts.fit", r.fit, " | ".join(RESTART_FITS))
    for init in r.mask_inits:
        _check(init in MASK_INITS, p + "restarts.mask_inits", list(r.mask_inits), "a list of " + " | ".join(MASK_INITS))
        check_mask_init(cfg.mask, p, init, "restarts.mask_inits")


def validate_finite(cfg: Any) -> None:
    """Every value resolves and every float is finite (YAML reads ``inf`` and ``.nan``): an infinite gravity or
    learning rate would otherwise surface only as a non-finite loss, after the model has loaded."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"Bad value for config key {key!r}: {str(err).splitlines()[0]}.") from None
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, dict):
            stack += [(f"{key}.{k}" if key else str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(node)]
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"Config key {key!r} = {node} is not a finite number; give a finite value.")


def validate_output_dir(key: str, value: str) -> None:
    """Refuse an output folder that cannot be one (empty, an existing file, on a read-only file system)
    before any work starts, instead of failing on the first write."""
    if not str(value).strip():
        raise ConfigError(f"{key} is empty; give the folder to write outputs to, e.g. {key}=outputs.")
    try:
        path = Path(value).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except (OSError, RuntimeError, ValueError) as err:  # a NUL byte, a name too long, an unknown ~user
        raise ConfigError(f"{key}={value!r} is not a usable path ({err}); choose another {key}.") from None
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{key}={value}: {existing} is a file, not a folder; choose another {key}.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: {existing} is not writable (permissions or a read-only file "
                          f"system); choose another {key}.")


def logger_kind(run: RunConfig) -> str | None:
    """The logger a run uses (``run.logger``), or None when logging is off."""
    return None if run.logger == "none" or not run.tensorboard else run.logger


def validate_logger(run: RunConfig) -> None:
    """``run.logger`` is known, agrees with ``run.tensorboard``, and its optional package is installed."""
    _check(run.logger in LOGGERS, "run.logger", run.logger, " | ".join(LOGGERS))
    if not run.tensorboard and run.logger not in ("tensorboard", "none"):
        raise ConfigError(f"run.tensorboard=false turns logging off but run.logger={run.logger} asks for it; drop "
                          "run.tensorboard=false, or use run.logger=none for no logger.")
    if run.logger in OPTIONAL_LOGGERS:
        module, extra = OPTIONAL_LOGGERS[run.logger]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module entry without a spec
            found = False
        if not found:
            raise ConfigError(f"run.logger={run.logger} needs the {module} package; install it with "
                              f"pip install 'peekaboo[{extra}]'.")


def validate(cfg: Any, inputs: bool = True) -> None:
    """Range-check every section a config has; with ``inputs``, also that a predict config names its inputs
    (an image or ``generate=``, and prompts). The Python API gives those per call instead."""
    validate_finite(cfg)
    if "output_dir" in cfg:
        validate_output_dir("output_dir", cfg.output_dir)
    if "run" in cfg and not OmegaConf.is_missing(cfg.run, "root"):
        validate_output_dir("run.root", cfg.run.root)
    if "optimization" in cfg:
        validate_optimization(cfg.optimization)
    if "trainer" in cfg:
        t = cfg.trainer
        _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "an integer >= 1")
        _check(t.devices >= 1, "trainer.devices", t.devices, "an integer >= 1")
        _check(str(t.precision) in PRECISIONS, "trainer.precision", t.precision,
               " | ".join(PRECISIONS) + " (never *-true half precision: the mask must stay float32)")
        _check(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, ">= 1")
        _check(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, " | ".join(ACCELERATORS))
        if "model" in cfg:
            check_dtype(cfg.model.dtype, t.accelerator)
    if "data" in cfg and not OmegaConf.is_missing(cfg.data, "source"):
        _check(cfg.data.source in DATA_SOURCES, "data.source", cfg.data.source, " | ".join(DATA_SOURCES))
        _check(cfg.data.pairs_per_step >= 1, "data.pairs_per_step", cfg.data.pairs_per_step, "an integer >= 1")
        _check(cfg.data.num_pairs is None or cfg.data.num_pairs >= 1, "data.num_pairs", cfg.data.num_pairs,
               "null or an integer >= 1")
    if "run" in cfg:
        validate_logger(cfg.run)
        _check(cfg.run.checkpoint_every_n_steps >= 1, "run.checkpoint_every_n_steps",
               cfg.run.checkpoint_every_n_steps, "an integer >= 1")
    if "model" in cfg:
        _check(cfg.model.dtype in DTYPES, "model.dtype", cfg.model.dtype, " | ".join(DTYPES))
        _check(cfg.model.attention in ATTENTIONS, "model.attention", cfg.model.attention, " | ".join(ATTENTIONS))
        _check(cfg.model.resolution is None or cfg.model.resolution >= 8, "model.resolution",
               cfg.model.resolution, "null or an integer >= 8")
    if "image_options" in cfg:
        io = cfg.image_options
        _check(io.fit in FIT_MODES, "image_options.fit", io.fit, " | ".join(FIT_MODES))
        _check(io.max_pixels >= 4, "image_options.max_pixels", io.max_pixels, "an integer >= 4 (a 2x2 image)")
        _check(len(io.flatten_background) == 3 and all(0 <= v <= 1 for v in io.flatten_background),
               "image_options.flatten_background", list(io.flatten_background), "three numbers in [0, 1]")
    if "generate" in cfg and inputs:
        if (cfg.image is None) == (cfg.generate is None):
            raise ConfigError("Give exactly one of image=PATH (segment an image) or generate=\"a prompt\" "
                              "(text to RGBA).")
        if cfg.image is not None and not cfg.prompt:
            raise ConfigError("No prompt given; add prompt=\"what to segment\" (repeat it for several).")
        if cfg.generate is not None and not str(cfg.generate).strip():
            raise ConfigError("generate is empty; give the image to sample, e.g. generate=\"a green triangle\".")
        if cfg.edit.prompt is not None and not str(cfg.edit.prompt).strip():
            raise ConfigError("edit.prompt is empty; give what to put in place of the segmented object.")
        _check(0.0 < cfg.edit.strength <= 1.0, "edit.strength", cfg.edit.strength, "0 < strength <= 1")
        _check(cfg.edit.dilation >= 0, "edit.dilation", cfg.edit.dilation, "an integer >= 0")
        _check(cfg.edit.feather >= 0, "edit.feather", cfg.edit.feather, ">= 0")
        _check(cfg.sampling.steps >= 1, "sampling.steps", cfg.sampling.steps, "an integer >= 1")
        _check(cfg.sampling.guidance_scale >= 0, "sampling.guidance_scale", cfg.sampling.guidance_scale, ">= 0")
    if "prompt" in cfg and not OmegaConf.is_missing(cfg, "prompt"):
        for i, prompt in enumerate(cfg.prompt):
            if not str(prompt).strip():
                raise ConfigError(f"prompt[{i}] is empty; give the object to segment, e.g. prompt=\"a red circle\".")


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved beside every run's outputs, and handed to worker processes).

    Text that holds a literal ``${`` (a prompt, a path) is escaped again, so reading the file back gives the
    same text rather than an interpolation to resolve.
    """
    return OmegaConf.to_yaml(OmegaConf.create(_escape_interpolations(OmegaConf.to_container(cfg, resolve=True))))


def _escape_interpolations(node: Any) -> Any:
    """``node`` (plain containers) with every ``${`` in its strings escaped as ``\\${``."""
    if isinstance(node, dict):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(v) for v in node]
    return node.replace("${", "\\${") if isinstance(node, str) else node


def help_text(schema_cls: type, prefix: str = "") -> str:
    """One line per config key: ``key: type = default``, for ``--help``."""
    lines: list[str] = []
    for f in fields(schema_cls):
        default = f.default if f.default_factory is _NO_FACTORY else f.default_factory()  # type: ignore[misc]
        if is_dataclass(default):
            lines.append(help_text(type(default), prefix + f.name + "."))
            continue
        shown = "???" if default == MISSING else repr(default)
        lines.append(f"  {prefix}{f.name}: {_type_name(f.type)} = {shown}")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")

