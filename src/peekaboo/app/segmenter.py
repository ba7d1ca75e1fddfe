"""The Python API: load the frozen model once, then segment images from a notebook or a script.

>>> from peekaboo import Segmenter
>>> seg = Segmenter.from_pretrained("bundled", trainer={"max_steps": 50})      # doctest: +SKIP
>>> [car, bulb] = seg("objects.png", ["a car", "a light bulb"])                # doctest: +SKIP
>>> car.mask.shape, car.alpha.dtype, car.steps                                 # doctest: +SKIP
((256, 256), dtype('float32'), 50)

Nothing is written unless asked (:meth:`Segmentation.save` writes what ``predict.py`` writes for a prompt), and
nothing is printed: no progress bar unless asked (``seg(image, prompts, progress=True)``), no banners of the
libraries underneath; warnings go to the ``peekaboo`` loggers (Python ``logging``).
The prompts of one image are optimized together as one batch, each with its own random stream, so every mask
is the one that prompt gets alone; ``predict.py`` goes through the same :func:`segment_image`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from peekaboo.config import (
    BUNDLED_MODEL,
    BUNDLED_MODELS,
    ModelConfig,
    PredictConfig,
    apply_overrides,
    load_config,
    preset_dir,
)
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.checks import is_sdxl_pipeline
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.errors import ConfigError, ImageError, NonFiniteError, PeekabooError
from peekaboo.optim.engine import FitOptions, PairResult, optimize_pairs, split_on_oom
from peekaboo.optim.module import non_finite_message
from peekaboo.utils import files, images
from peekaboo.utils.console import quiet_loading
from peekaboo.utils.devices import resolve_device

#: What :meth:`Segmenter.__call__` accepts as an image.
ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

# The presets of checkpoints other than the bundled models (which name their own in BUNDLED_MODELS): the paper's
# settings for Stable Diffusion 1.x/2.x, and their SDXL counterpart.
CHECKPOINT_PRESET = "sd15"
SDXL_PRESET = "sdxl"


def default_preset(pretrained: str) -> str:
    """The model preset (``configs/model/<preset>.yaml``) a model starts from: a bundled model's own tuned
    preset, ``sdxl`` for an SDXL-format pipeline, ``sd15`` (the paper's settings) for any other checkpoint.

    Raises:
        ModelError: a folder or hub id that is no usable pipeline (:func:`check_model_source`).
    """
    if pretrained in BUNDLED_MODELS:
        return BUNDLED_MODELS[pretrained][1]
    return SDXL_PRESET if is_sdxl_pipeline(ModelConfig(pretrained=pretrained)) else CHECKPOINT_PRESET

@dataclass(frozen=True)
class Segmentation:
    """One prompt's result for one image, at the image's original size.

    Attributes:
        prompt: the prompt.
        image: the RGB image that was segmented.
        final: the soft alpha as 8 bits and the binary mask, exactly as :meth:`save` writes them.
        steps: optimization steps run.
        losses: the final loss terms and mask area (``loss/dream``, ``loss/alpha``, ``loss/total``, ``mask/area``).
    """

    prompt: str
    image: Image.Image
    final: images.FinalMask
    steps: int
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def alpha(self) -> np.ndarray:
        """The soft mask ``(H, W)`` float32 in [0, 1]."""
        return self.final.alpha

    @property
    def mask(self) -> np.ndarray:
        """The binary mask ``(H, W)`` bool (``alpha > optimization.threshold``)."""
        return self.final.mask

    @property
    def area(self) -> float:
        """Fraction of the image inside the binary mask."""
        return self.final.area

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``mask.png``, ``alpha.png``, ``overlay.png`` and ``cutout.png`` into ``folder`` (as
        ``predict.py`` does for one prompt); returns the paths by kind."""
        folder = Path(folder)
        paths = {kind: folder / f"{kind}.png" for kind in files.PAIR_FILES}
        return files.write_pair_files(self.image, self.final, paths)


def segment_image(img: Image.Image, prompts: Sequence[str], cfg: PredictConfig, backbone: Backbone,
                  tb_dir: str | os.PathLike | None = None,
                  progress: bool | None = None) -> list[tuple[Segmentation, PairResult]]:
    """Optimize one mask per prompt for ``img``, all prompts in one batch (halved on out-of-memory).

    Each prompt's pair id is its safe name (:func:`peekaboo.utils.files.safe_name`), which seeds its random stream.
    ``tb_dir``: the prompts' TensorBoard runs (None: no logging); ``progress``: Lightning's progress bar (None:
    ``cfg.trainer.enable_progress_bar``).

    Raises:
        NonFiniteError: a prompt's loss or mask went non-finite.
    """
    opt = cfg.optimization
    canvas, placement = images.fit_square(img, opt.mask.size, cfg.image_options.fit)  # (3, S, S)
    names = [files.safe_name(p) for p in prompts]

    def fit(indices: list[int]) -> list[PairResult]:
        ids = [names[i] for i in indices]
        return optimize_pairs(canvas.expand(len(indices), -1, -1, -1).contiguous(), [prompts[i] for i in indices],
                              ids, opt, cfg.trainer, backbone,
                              FitOptions(tb_dir=tb_dir, pair_run_names=ids, enable_progress_bar=progress))

    results = split_on_oom(list(range(len(prompts))), fit, "prompts")
    out = []
    for prompt, result in zip(prompts, results, strict=True):
        if result.failed:
            raise NonFiniteError(non_finite_message(f"The optimization of {prompt!r}", opt))
        final = images.finalize_mask(result.alpha, placement, opt.threshold)
        out.append((Segmentation(prompt, img, final, result.steps, dict(result.losses)), result))
    return out


def to_image(image: ImageLike, cfg: PredictConfig) -> Image.Image:
    """Any accepted image as upright 8-bit RGB.

    A path is loaded as ``predict.py`` loads it; an array is ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8
    (0..255) or float (0..1); a tensor is ``(3, H, W)`` or ``(1, 3, H, W)``, uint8 or float in [0, 1].

    Raises:
        ImageError: a missing or unusable file, or an array of another shape or range.
    """
    opts = cfg.image_options
    if isinstance(image, (str, os.PathLike)):
        return images.load_image(image, tuple(opts.flatten_background), opts.max_pixels)
    if isinstance(image, Image.Image):
        return images.to_rgb(image, tuple(opts.flatten_background))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError(f"Image tensor of shape {tuple(image.shape)} is not (3, H, W) or (1, 3, H, W); "
                             "pass a channels-first RGB tensor.")
        image = t.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ImageError(f"Image array of shape {image.shape} is not (H, W), (H, W, 3) or (H, W, 4); pass "
                             "an RGB image.")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ImageError("Image array of floats must hold values in [0, 1]; divide 8-bit values by "
                                 "255 or pass a uint8 array.")
            arr = np.rint(arr * 255).astype(np.uint8)
        if min(arr.shape[:2]) < images.MIN_SIDE:
            raise ImageError(f"Image array of shape {image.shape} is too small; each side needs "
                             f"{images.MIN_SIDE}+ pixels.")
        return images.to_rgb(Image.fromarray(arr), tuple(opts.flatten_background))
    raise ImageError(f"Cannot segment a {type(image).__name__}; pass a path, a PIL image, a numpy array or a "
                     "tensor.")


class Segmenter:
    """A frozen text-to-image model and the Peekaboo settings to segment with (see the module docstring).

    Build one with :meth:`from_pretrained`; calling it segments one image for one or several prompts.
    """

    def __init__(self, cfg: PredictConfig, backbone: Backbone):
        self.cfg, self.backbone = cfg, backbone

    @classmethod
    def from_pretrained(cls, pretrained: str = BUNDLED_MODEL, config: PredictConfig | None = None,
                        preset: str | None = None, **overrides: Any) -> Segmenter:
        """Load the model once, frozen, with the command line's config keys and validation.

        Args:
            pretrained: ``"bundled"`` (or ``"bundled-shapes"``), a hub id or a local diffusers folder
                (``model.pretrained``).
            config: a full config to start from instead of a preset (e.g. one loaded from a run's
                ``config.yaml``); its ``model.pretrained`` is replaced by ``pretrained``.
            preset: the model preset (``configs/model/<preset>.yaml``) to start from; default:
                :func:`default_preset` (the bundled model's own, ``sdxl`` for an SDXL pipeline, else ``sd15``).
            **overrides: config keys, nested (``trainer={"max_steps": 50}``) or dotted
                (``**{"optimization.loss.gravity": 0.02}``). A segmenter logs no TensorBoard runs
                (``tensorboard=False``) and shows no progress bar (``trainer.enable_progress_bar=False``) unless
                these say otherwise.

        Raises:
            ConfigError: an unknown key or a bad value; ModelError: a model that cannot be loaded.
        """
        if config is None:
            preset = preset or default_preset(pretrained)
            config = load_config(PredictConfig, [f"model={preset}"], preset_dir(), "predict", inputs=False)
        quiet = {"tensorboard": False, "trainer.enable_progress_bar": False}  # a library call prints nothing
        cfg = apply_overrides(config, {"model": {"pretrained": pretrained}, **quiet, **overrides}, inputs=False)
        with quiet_loading():
            backbone = shared_backbone(cfg.model, resolve_device(cfg.trainer.accelerator))
        return cls(cfg, backbone)

    def __call__(self, image: ImageLike, prompts: str | Sequence[str],
                 progress: bool | None = None) -> list[Segmentation]:
        """Segment ``image`` for each prompt (one result per prompt, in order); writes and prints nothing.

        Args:
            progress: show Lightning's progress bar while the masks are optimized; None: the
                config's ``trainer.enable_progress_bar`` (off unless :meth:`from_pretrained` was told otherwise).

        Raises:
            ImageError: an image that cannot be used; ConfigError: no prompt; NonFiniteError: a non-finite loss.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ConfigError("Segmenter needs one or more non-empty prompts, e.g. seg(image, 'a red circle').")
        img = to_image(image, self.cfg)
        return [segmentation for segmentation, _ in segment_image(img, prompts, self.cfg, self.backbone,
                                                                   progress=progress)]

    def with_overrides(self, **overrides: Any) -> Segmenter:
        """A segmenter with changed settings sharing this one's model (model keys cannot change here)."""
        cfg = apply_overrides(self.cfg, overrides, inputs=False)
        if cfg.model != self.cfg.model:
            raise PeekabooError("with_overrides cannot change model.* keys; call Segmenter.from_pretrained.")
        return Segmenter(cfg, self.backbone)

    def __repr__(self) -> str:
        return f"Segmenter(pretrained={self.cfg.model.pretrained!r}, steps={self.cfg.trainer.max_steps})"

