"""The rows of the benchmarks: Peekaboo, its ablations and the training-free baselines, and the project config
each Peekaboo row runs with.

Every Peekaboo row starts from the project's config (``configs/train.yaml`` + the scene set's model preset,
``configs/model/shapes.yaml`` or ``objects.yaml``, read with :func:`peekaboo.config.load_config`); a row only
lists what it changes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peekaboo.config import BUNDLED_MODELS, MASK_KINDS, TrainConfig, load_config, preset_dir
from peekaboo.diffusion.identity import model_fingerprint
from peekaboo.errors import PeekabooError
from peekaboo.optim.masks import LEGACY_REVISION, MASK_REVISIONS
from peekaboo.optim.restarts import candidate_inits
from peekaboo.runs.planning import SPEED_KEYS

#: The synthetic scene sets a benchmark runs on, each with the model preset its rows start from
#: (configs/model/<preset>.yaml: the bundled model trained on those scenes and the settings tuned for it).
SCENE_PRESETS: dict[str, str] = {"shapes": "shapes", "objects": "objects"}
# The model config group of the shapes scenes, which the GPU check runs: configs/model/<MODEL_GROUP>.yaml.
MODEL_GROUP = SCENE_PRESETS["shapes"]
# The dataset-run task: configs/train.yaml, whose validation needs no image (a predict config would).
CONFIG_TASK = "train"
# The bench writes no run folder, but a dataset-run config requires a run name.
_RUN_NAME = "run.name=bench"

# -- settings chosen by the sweep on the tune split (see docs/BENCHMARK.md, "How the settings were chosen") --
#: Optimizer of each mask kind in the mask-kind rows: a learning rate suits one parameterization only (a
#: raster's logits and an MLP's weights live on different scales). A kind equal to the default's adds nothing.
#: The raster kinds run at the preset's own optimizer (none here): the default's kind keeps the rate chosen for
#: the default, and the plain raster takes its bilateral partner's (SWEEP_KIND_PARTNER), so a re-chosen preset
#: carries over to their rows without a second copy of its rate.
KIND_OPTIM: dict[str, tuple[str, ...]] = {
    "raster": (),
    "fourier": ("optimization.optim.name=adam", "optimization.optim.lr=0.003"),
    "raster_bilateral": (),
    "fourier_bilateral": ("optimization.optim.name=adam", "optimization.optim.lr=0.003"),
}
#: Settings of a mask kind's row that are fixed, not tuned. The Fourier MLP is 64 wide over 64 frequencies
#: instead of the paper's 256 over 128: at 256 the MLP alone outweighs the VAE and UNet per step on a CPU,
#: and a 64x64 mask needs far less capacity than the paper's 256x256 one. It starts from its own random
#: weights: the preset's region start sets raster logits, which an MLP does not have.
_SMALL_FOURIER = ("optimization.mask.fourier.hidden=64", "optimization.mask.fourier.num_features=64",
                  "optimization.mask.init=constant")
KIND_EXTRA: dict[str, tuple[str, ...]] = {"fourier": _SMALL_FOURIER, "fourier_bilateral": _SMALL_FOURIER}
#: The paper's own numbers where they carry over to a bundled model (DESIGN.md: score distillation, guidance 100,
#: a posterior sample, 300 iterations) and its start, alpha 0.5 everywhere; the mask kind, optimizer, gravity and
#: resolution stay the preset's, since the paper's are for 256-pixel masks on Stable Diffusion.
PAPER_OVERRIDES = ("optimization.guidance.estimator=sds", "optimization.guidance.guidance_scale=100",
                   "optimization.guidance.latent_mode=sample", "optimization.mask.init=constant")
PAPER_STEPS = 300  # the paper code's iterations
#: The paper's settings as a whole: its overrides at its step count.
PAPER_SETTINGS = (*PAPER_OVERRIDES, f"trainer.max_steps={PAPER_STEPS}")
#: The cross-attention baseline's mask is ``map > threshold`` (the map is min-max normalized per pair).
#: Chosen on the ``tune`` split with the bundled model (the sweep's figures are in docs/BENCHMARK.md).
CROSS_ATTENTION_THRESHOLD = 0.7


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Attributes:
        name: the ``--methods`` name.
        label: the row's label.
        kind: ``"peekaboo"``, ``"start_only"``, ``"cross_attention"``, ``"random"`` or ``"whole_image"``.
        overrides: config overrides on top of the project's config (Peekaboo rows only).
        about: what the row measures (written to docs/BENCHMARK.md).
    """

    name: str
    label: str
    kind: str
    overrides: tuple[str, ...] = ()
    about: str = ""


def _kind_method(kind: str, optim: Sequence[str]) -> Method:
    label = kind.replace("_", " + ")
    overrides = (f"optimization.mask.kind={kind}", *KIND_EXTRA.get(kind, ()), *optim)
    start = (" (from the MLP's random start: the region and cross-attention starts set raster logits, which an MLP "
             "does not have)" if kind.startswith("fourier") else "")
    return Method(kind, f"mask: {label}", "peekaboo", overrides,
                  f"The default with the `{kind}` mask parameterization and the optimizer chosen for it on the "
                  f"tune split{start}.")


def build_methods(kind_optim: dict[str, Sequence[str]] | None = None) -> tuple[Method, ...]:
    """The table's rows, in order; ``kind_optim`` replaces :data:`KIND_OPTIM` (e.g. a sweep's choice)."""
    kind_optim = {**KIND_OPTIM, **(kind_optim or {})}
    return (
        Method("peekaboo", "Peekaboo (default)", "peekaboo", (),
               "Peekaboo with the scene set's preset (`configs/model/shapes.yaml` or `objects.yaml`, plus any `--set` "
               "of the command)."),
        Method("no_gravity", "no gravity", "peekaboo", ("optimization.loss.gravity=0",),
               "The default without the alpha regularizer: nothing pulls the mask towards empty, so keeping the "
               "whole image is as good an answer as keeping the object."),
        *(_kind_method(kind, kind_optim[kind]) for kind in MASK_KINDS),
        Method("guidance_7.5", "guidance 7.5", "peekaboo", ("optimization.guidance.guidance_scale=7.5",),
               "The default with the guidance scale of ordinary sampling."),
        Method("guidance_30", "guidance 30", "peekaboo", ("optimization.guidance.guidance_scale=30",),
               "The default with guidance scale 30."),
        Method("guidance_100", "guidance 100", "peekaboo", ("optimization.guidance.guidance_scale=100",),
               "The default with the paper's guidance scale for Stable Diffusion."),
        Method("paper", "the paper's settings", "peekaboo", PAPER_SETTINGS,
               f"The paper's score distillation, guidance 100, posterior latent sampling, alpha-0.5 start and "
               f"{PAPER_STEPS} steps (its "
               "own count, not one chosen on tune); the mask kind, optimizer and gravity stay the preset's, since the "
               "paper's are for 256-pixel masks on Stable Diffusion (`python predict.py model=sd14` runs those)."),
        Method("latent_composite", "latent composite", "peekaboo", ("optimization.composite=latent",),
               "The default compositing in latent space: alpha, area-averaged to the latent grid, blends the "
               "image's latents (encoded once) with the background's (encoded without gradient), so a step pays "
               "no VAE backward; the blend only approximates encoding the composite."),
        Method("encode_32", "encode at 32 px", "peekaboo", ("optimization.guidance.encode_resolution=32",),
               "The default with the composite encoded at 32x32 instead of the model's 64x64: a cheaper VAE "
               "encoder (forward and backward) and UNet, on 8x8 latents the model was not trained at."),
        Method("constant_init", "start from alpha 0.5", "peekaboo", ("optimization.mask.init=constant",),
               "The default with its mask started at alpha 0.5 everywhere (the paper's start), then the same "
               "optimization: the method with no head start, so against the default it shows what the preset's start "
               "adds. Where the preset starts at alpha 0.5 itself (objects), it is the default row."),
        Method("cross_attention_init", "start from cross-attention", "peekaboo",
               ("optimization.mask.init=cross_attention",),
               "The default with its mask started from the cross-attention map of the `cross-attention map` row "
               "instead of the preset's start: logits `init_scale * (map - init_threshold)`, then the same "
               "optimization."),
        Method("region_init", "start from the best region", "peekaboo", ("optimization.mask.init=region",),
               "The default with its mask started on the pair's best-ranked image region (`peekaboo.optim.regions`: "
               "Felzenszwalb segments ranked by the model's denoising error under the prompt), then the same "
               "optimization. Where the preset starts there itself (shapes), it is the default row."),
        Method("restarts_4", "4 restarts from alpha 0.5, model-chosen", "peekaboo",
               ("optimization.restarts.count=4", "optimization.restarts.mask_inits=[constant]"),
               "The `start from alpha 0.5` row optimized 4 times per pair (other random streams; the first is that "
               "row's own run), keeping the mask whose composite the prompt explains best: the lowest denoising "
               "error under the prompt over 16 draws shared by the 4 candidates (`peekaboo.optim.restarts`). No label "
               "is used; it costs 4 optimizations per pair."),
        Method("restarts_4_objective", "4 restarts from alpha 0.5, chosen by the objective", "peekaboo",
               ("optimization.restarts.count=4", "optimization.restarts.mask_inits=[constant]",
                "optimization.restarts.fit=objective"),
               "The candidates of `4 restarts from alpha 0.5`, scored by the guided denoising objective whose "
               "gradient the runs follow (`restarts.fit=objective`, at the run's guidance scale) instead of the error "
               "under the prompt alone: a mask the prompt explains no better than the empty prompt does gains "
               "nothing. Still no label and no start but alpha 0.5; 4 optimizations per pair."),
        Method("restarts_2_mixed", "2 restarts, mixed starts, model-chosen", "peekaboo",
               ("optimization.restarts.count=2", "optimization.restarts.mask_inits=[constant,cross_attention]"),
               "The `start from alpha 0.5` row's run plus a second one started from the cross-attention map (the "
               "`start from cross-attention` row's start, on another random stream), keeping the one whose "
               "composite the prompt explains best (the lowest denoising error under the prompt over draws the "
               "two share): two starts that begin apart settle on different objects more often than two from "
               "alpha 0.5. Costs 2 optimizations per pair."),
        Method("restarts_4_mixed", "4 restarts, mixed starts, model-chosen", "peekaboo",
               ("optimization.restarts.count=4", "optimization.restarts.mask_inits=[constant,cross_attention]"),
               "4 candidates per pair, alpha 0.5 and cross-attention starts alternating (candidates 1 and 3 from "
               "the map), each on its own random stream, keeping the one whose composite the prompt explains best "
               "(the lowest denoising error under the prompt over draws the candidates share). Costs 4 "
               "optimizations per pair."),
        Method("restarts_3_regions", "3 restarts: alpha 0.5, cross-attention and region starts", "peekaboo",
               ("optimization.restarts.count=3", "optimization.restarts.mask_inits=[constant,cross_attention,region]"),
               "Three candidates per pair: the `start from alpha 0.5` row's run, one started from the "
               "cross-attention map and one on the pair's best-ranked image region (the shapes preset's start), "
               "each on its own random stream; the kept one is the one whose composite the prompt explains best (the "
               "lowest denoising error under the prompt over draws the candidates share). The three starts reach "
               "the named object by three routes. Costs 3 optimizations per pair, plus the region scoring."),
        Method("restarts_4_mixed_ratio", "4 restarts, mixed starts, chosen by error ratio", "peekaboo",
               ("optimization.restarts.count=4", "optimization.restarts.mask_inits=[constant,cross_attention]",
                "optimization.restarts.fit=error_ratio"),
               "The candidates of `4 restarts, mixed starts`, scored by their denoising error under the prompt "
               "over their error under the empty prompt on the same draw (`restarts.fit=error_ratio`): how much "
               "the prompt explains beyond any caption, so a composite that is easy to denoise anyway (a large "
               "plain object) gains nothing over a small one. One more UNet row per scoring draw."),
        Method("default_start", "the default's start, no optimization", "start_only", (),
               "No optimization: the default's mask as its run starts it (the preset's `mask.init` seen through the "
               "mask's parameterization and filter), scored before any step. Against the default row it shows what "
               "the dream-loss optimization adds. A start at alpha 0.5 is the whole image: the mask is scored as "
               "saved, 8-bit, where 0.5 becomes 128/255, just above the threshold 0.5."),
        Method("region_start", "region start, no optimization", "start_only", ("optimization.mask.init=region",),
               "No optimization: the mask on the pair's best-ranked image region (`peekaboo.optim.regions`) seen "
               "through the mask's filter, scored before any step: how far the image's regions alone go. Its s/pair "
               "is the ranking's, or nearly nothing where an earlier row of the same run ranked the pairs."),
        Method("cross_attention", "cross-attention map", "cross_attention", (),
               "No optimization: the UNet's cross-attention to the prompt's content words on the VAE-encoded image "
               "noised at a few timesteps, averaged over heads, layers and timesteps, normalized to [0, 1] and "
               "thresholded (threshold chosen on the tune split)."),
        Method("random", "random disc", "random", (),
               "Chance level: a disc of a typical object's size at a random position (seeded by the pair id)."),
        Method("whole_image", "whole image", "whole_image", (),
               "Every pixel selected: the IoU is the object's share of the image."),
    )


METHODS = build_methods()
METHOD_NAMES = tuple(m.name for m in METHODS)
#: The table's main rows: the default, the paper's settings, and every row that runs no optimization (each start
#: scored alone, the cross-attention map, a random disc, the whole image), which the default has to beat for its
#: optimization to count. The README's table shows these (the full table, the other starts optimized included, is
#: in docs/), and a ``robust`` run computes them unless ``--methods`` says otherwise.
MAIN_ROWS = ("peekaboo", "paper", "default_start", "region_start", "cross_attention", "random", "whole_image")


# -- configs --------------------------------------------------------------------------------------------------
def resolve_config_dir(config_dir: str | os.PathLike | None) -> Path:
    """The presets the rows start from: ``--config-dir``, else :func:`peekaboo.config.preset_dir` (the
    packaged presets, or ``$PEEKABOO_CONFIG_DIR``).

    Raises:
        PeekabooError: the folder lacks a scene set's model preset: the benchmark's defaults must come from one.
    """
    folder = Path(config_dir) if config_dir is not None else preset_dir()  # an explicit folder: no fallback
    missing = [p for p in SCENE_PRESETS.values() if not (folder / "model" / f"{p}.yaml").is_file()]
    if missing:
        raise PeekabooError(f"{folder} has no model/{missing[0]}.yaml; pass --config-dir pointing at a folder "
                            "of presets like the project's configs/.")
    return folder


def method_config(overrides: Sequence[str], extra: Sequence[str], config_dir: Path, base: Sequence[str] = (),
                  scenes: str = "shapes") -> Any:
    """The project's dataset-run config (``configs/train.yaml``) with the scene set's model preset
    (:data:`SCENE_PRESETS`) and data group, then ``base`` (tuned defaults every row starts from), then a row's
    ``overrides``, then ``extra`` (the command's ``--set``): later ones win.

    Raises:
        PeekabooError: an unknown scene set (a ConfigError for bad overrides).
    """
    if scenes not in SCENE_PRESETS:
        raise PeekabooError(f"--scenes {scenes}: use one of {', '.join(SCENE_PRESETS)}.")
    argv = [f"model={SCENE_PRESETS[scenes]}", f"data={scenes}", _RUN_NAME, *base, *overrides, *extra]
    return load_config(TrainConfig, argv, config_dir, CONFIG_TASK)


def row_max_steps(cfg: Any, default: Any, step_counts: dict[str, int]) -> int | None:
    """The step count a Peekaboo row of config ``cfg`` runs at, from a tune sweep's ``step_counts``
    (:func:`peekaboo.bench.sweep.sweep`): its mask kind's where it differs from the default's kind, else the
    largest of its starts' (a restart row has one start per candidate; the default's start takes the default's
    count). None where the sweep chose none for it: the row keeps its config's count.

    Args:
        cfg: the row's resolved config; ``default``: the default row's.
    """
    opt, base = cfg.optimization, default.optimization
    if opt.mask.kind != base.mask.kind:
        return step_counts.get(f"kind:{opt.mask.kind}")
    counts = [step_counts.get("default") if init == base.mask.init else step_counts.get(f"start:{init}")
              for init in set(candidate_inits(opt.restarts, opt.mask.init))]
    return None if None in counts else max(counts)


#: The config groups whose every setting can change a Peekaboo row's masks.
KEYED_GROUPS = ("model", "image_options", "optimization")


def settings_key(cfg: Any) -> str:
    """What decides a Peekaboo row's masks: two rows with the same key produce the same masks. The model's
    weights count too (:func:`model_fingerprint`): retrained weights at the same path make other masks; and so
    does the mask code's revision (:data:`~peekaboo.optim.masks.MASK_REVISIONS`): a row computed before the
    official Fourier MLP and bilateral borders is recomputed. The switches that change only how fast the masks
    are computed (:data:`~peekaboo.runs.planning.SPEED_KEYS`: channels-last, compiling, ...) do not count."""
    groups = _without_speed_keys({k: OmegaConf.to_container(cfg[k], resolve=True) for k in KEYED_GROUPS})
    return json.dumps(groups | {"steps": cfg.trainer.max_steps, "precision": str(cfg.trainer.precision),
                                "weights": model_fingerprint(cfg.model.pretrained),
                                "mask_revision": MASK_REVISIONS[cfg.optimization.mask.kind]},
                      sort_keys=True)


def canonical_key(key: str) -> str:
    """``key`` (a row key ending in a :func:`settings_key`) with the settings it lacks filled in at their schema
    defaults and the ones its run does not read blanked: a key stored before a setting existed then equals
    today's key of the same run, since the run used what is now that setting's default, and a preset change
    of a setting the row overrides keeps the row. Keys without settings come back unchanged."""
    prefix, brace, body = key.partition("{")
    if not brace:
        return key
    try:
        settings = json.loads(brace + body)
    except json.JSONDecodeError:
        return key
    defaults = _keyed_defaults()
    for group in KEYED_GROUPS:
        if isinstance(settings.get(group), dict):
            settings[group] = _fill(defaults[group], settings[group])
    _without_speed_keys(settings)  # keys stored before they were left out held them
    if "weights" in settings:  # a settings_key; "precision" and "mask_revision" joined it later
        settings.setdefault("precision", str(TrainConfig().trainer.precision))
        settings.setdefault("mask_revision", LEGACY_REVISION)  # keys stored before revisions were recorded
        model = settings.get("model")
        if isinstance(model, dict) and model.get("pretrained") in BUNDLED_MODELS:
            # A bundled model is known by its weights' digest, not its name: the shapes model's rows stored as
            # "bundled" (its name before the objects model took it) are the rows of "bundled-shapes".
            model["pretrained"] = None
    _starts_as_read(settings)
    return prefix + json.dumps(settings, sort_keys=True)


def _starts_as_read(settings: dict[str, Any]) -> None:
    """Write the mask starts as what the run reads, so rows that start alike share a key: one run reads
    ``mask.init`` only; restarts read each candidate's start (:func:`~peekaboo.optim.restarts.candidate_inits`),
    whether a preset's ``mask.init`` or the row's own ``mask_inits`` gave it."""
    opt = settings.get("optimization")
    if not isinstance(opt, dict) or not isinstance(opt.get("restarts"), dict) or not isinstance(opt.get("mask"), dict):
        return
    restarts, mask = opt["restarts"], opt["mask"]
    if restarts.get("count", 1) > 1:
        restarts["mask_inits"] = candidate_inits(OmegaConf.create(restarts), mask.get("init"))
        mask["init"] = None
    else:
        restarts["mask_inits"] = None
        restarts["choose_at"] = None  # read only with restarts


def _without_speed_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (groups by name) without the keys of :data:`~peekaboo.runs.planning.SPEED_KEYS`, in place."""
    for dotted in SPEED_KEYS:
        group, _, name = dotted.partition(".")
        if isinstance(settings.get(group), dict):
            settings[group].pop(name, None)
    return settings


@functools.cache
def _keyed_defaults() -> dict[str, Any]:
    """The schema defaults of :data:`KEYED_GROUPS` (read-only: :func:`_fill` builds new dicts)."""
    schema = OmegaConf.structured(TrainConfig)
    return {group: OmegaConf.to_container(schema[group], resolve=True) for group in KEYED_GROUPS}


def _fill(defaults: Any, stored: Any) -> Any:
    """``stored`` with the keys of ``defaults`` it lacks added, recursively (stored values win)."""
    if not (isinstance(defaults, dict) and isinstance(stored, dict)):
        return stored
    # Keys of retired settings (guidance.dds_reference, inversion_steps, ...) are dropped: runs never read them.
    return {k: _fill(defaults.get(k), v) for k, v in stored.items() if k in defaults} | {
        k: v for k, v in defaults.items() if k not in stored}


