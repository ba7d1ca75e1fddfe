"""Range checks of a built config: every key's allowed values, with a :class:`~peekaboo.errors.ConfigError`
naming the key and what it allows.

:func:`validate` checks whichever sections a config has (predict, train, or one section given through the
Python API); :func:`validate_optimization` checks one pair's optimization settings on their own.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peekaboo.config.schema import (
    ATTENTIONS,
    BACKGROUNDS,
    COMPOSITES,
    DATA_SOURCES,
    DTYPES,
    ESTIMATORS,
    FIT_MODES,
    GRAVITY_REDUCTIONS,
    LATENT_MODES,
    LOGGERS,
    LR_SCHEDULES,
    MASK_INITS,
    MASK_KINDS,
    MAX_MASK_SIZE,
    NOISE_KINDS,
    OPTIMIZERS,
    OPTIONAL_LOGGERS,
    PRECISIONS,
    RESTART_FITS,
    T_SCHEDULES,
    DataConfig,
    ImageConfig,
    MaskConfig,
    ModelConfig,
    OptimizationConfig,
    PredictConfig,
    RunConfig,
    TrainerConfig,
)
from peekaboo.errors import ConfigError
from peekaboo.utils.devices import ACCELERATORS, check_dtype


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
    _check(g.noise in NOISE_KINDS, p + "guidance.noise", g.noise, " | ".join(NOISE_KINDS))
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
    _check(r.choose_at >= 0, p + "restarts.choose_at", r.choose_at, "an integer >= 0 (0: choose at the end)")
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
    """The logger a run uses (``run.logger``), or None for ``run.logger=none``."""
    return None if run.logger == "none" else run.logger


def validate_logger(run: RunConfig) -> None:
    """``run.logger`` is known and its optional package is installed."""
    _check(run.logger in LOGGERS, "run.logger", run.logger, " | ".join(LOGGERS))
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
    if "optimization" in cfg:
        validate_optimization(cfg.optimization)
    if "trainer" in cfg:
        validate_trainer(cfg.trainer)
        if "model" in cfg:
            check_dtype(cfg.model.dtype, cfg.trainer.accelerator)
    if "data" in cfg and not OmegaConf.is_missing(cfg.data, "source"):
        validate_data(cfg.data)
    if "run" in cfg:
        validate_run(cfg.run)
    if "model" in cfg:
        validate_model(cfg.model)
    if "image_options" in cfg:
        validate_image_options(cfg.image_options)
    if "generate" in cfg and inputs:
        validate_predict_inputs(cfg)
    if "prompt" in cfg and not OmegaConf.is_missing(cfg, "prompt"):
        for i, prompt in enumerate(cfg.prompt):
            if not str(prompt).strip():
                raise ConfigError(f"prompt[{i}] is empty; give the object to segment, e.g. prompt=\"a red circle\".")


def validate_trainer(t: TrainerConfig) -> None:
    """Range-check ``trainer``: steps, devices, precision (never float16 autocast), logging, accelerator."""
    _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "an integer >= 1")
    _check(t.devices >= 1, "trainer.devices", t.devices, "an integer >= 1")
    if str(t.precision) in ("16-mixed", "16"):
        raise ConfigError(f"Config key 'trainer.precision' = {t.precision!r} is not supported: float16 autocast "
                          "needs a GradScaler, and one scaler per batch, shared by all its pairs, would make a "
                          "pair's mask depend on its batch-mates and skip the steps whose gradients overflow; "
                          "use trainer.precision=bf16-mixed (with model.dtype=bfloat16) on a GPU with bfloat16, "
                          "or 32-true.")
    _check(str(t.precision) in PRECISIONS, "trainer.precision", t.precision,
           " | ".join(PRECISIONS) + " (never *-true half precision: the mask must stay float32)")
    _check(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, ">= 1")
    _check(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, " | ".join(ACCELERATORS))


def validate_data(data: DataConfig) -> None:
    """Range-check ``data`` once its source is set."""
    _check(data.source in DATA_SOURCES, "data.source", data.source, " | ".join(DATA_SOURCES))
    _check(data.pairs_per_step >= 1, "data.pairs_per_step", data.pairs_per_step, "an integer >= 1")
    _check(data.num_pairs is None or data.num_pairs >= 1, "data.num_pairs", data.num_pairs,
           "null or an integer >= 1")


def validate_run(run: RunConfig) -> None:
    """Range-check ``run``: its output root, logger, checkpoint interval and logged pairs."""
    if not OmegaConf.is_missing(run, "root"):
        validate_output_dir("run.root", run.root)
    validate_logger(run)
    _check(run.checkpoint_every_n_steps >= 1, "run.checkpoint_every_n_steps", run.checkpoint_every_n_steps,
           "an integer >= 1")
    _check(run.log_pairs is None or run.log_pairs >= 0, "run.log_pairs", run.log_pairs,
           "null (every pair) or an integer >= 0")


def validate_model(model: ModelConfig) -> None:
    """Range-check ``model``'s dtype, attention kernel and resolution."""
    _check(model.dtype in DTYPES, "model.dtype", model.dtype, " | ".join(DTYPES))
    _check(model.attention in ATTENTIONS, "model.attention", model.attention, " | ".join(ATTENTIONS))
    _check(model.resolution is None or model.resolution >= 8, "model.resolution", model.resolution,
           "null or an integer >= 8")


def validate_image_options(io: ImageConfig) -> None:
    """Range-check ``image_options``."""
    _check(io.fit in FIT_MODES, "image_options.fit", io.fit, " | ".join(FIT_MODES))
    _check(io.max_pixels >= 4, "image_options.max_pixels", io.max_pixels, "an integer >= 4 (a 2x2 image)")
    _check(len(io.flatten_background) == 3 and all(0 <= v <= 1 for v in io.flatten_background),
           "image_options.flatten_background", list(io.flatten_background), "three numbers in [0, 1]")


def validate_predict_inputs(cfg: PredictConfig) -> None:
    """A predict config names exactly one input (``image`` or ``generate``), its prompts, and sane edit and
    sampling settings."""
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
