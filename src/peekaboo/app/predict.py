"""Segment one image (or one sampled from a prompt) for one or more prompts and write the masks at the image's
original size; optionally regenerate each segmented region from a new prompt (``edit.prompt``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from peekaboo.app import edit
from peekaboo.app.segmenter import segment_image
from peekaboo.config import PredictConfig, to_yaml
from peekaboo.diffusion import pipelines
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.runs.layout import write_start
from peekaboo.utils import files, images, overlays
from peekaboo.utils.console import quiet_loading
from peekaboo.utils.devices import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOutput:
    """The files written for one prompt."""

    prompt: str
    folder: Path
    mask: Path  # binary mask, original size, 0/255
    alpha: Path  # soft alpha, original size, 0..255
    overlay: Path  # the mask shown over the image (outside dimmed, outline in a contrasting colour)
    cutout: Path  # RGBA: the image with the soft alpha as its alpha channel
    area: float  # fraction of the image inside the binary mask
    rgba: Path | None = None  # generate=: the sampled image with the soft alpha (same pixels as cutout)
    edited: Path | None = None  # edit.prompt: the image with the segmented region regenerated, original size
    edit_compare: Path | None = None  # edit.prompt: input | blend weight | edited, side by side

    def files(self) -> list[Path]:
        """Every file written for the prompt, the four of every pair first."""
        return [p for p in (self.mask, self.alpha, self.overlay, self.cutout, self.rgba, self.edited,
                            self.edit_compare) if p is not None]


def edit_result(cfg: PredictConfig, backbone: Backbone, img: Image.Image, mask: np.ndarray) -> edit.EditResult:
    """Regenerate the region of ``mask`` ``(H, W)`` bool from ``cfg.edit.prompt`` (nothing is written)."""
    return edit.edit_region(backbone, img, mask, cfg.edit.prompt, cfg.edit, cfg.sampling, cfg.model,
                            cfg.image_options.fit, cfg.trainer.precision)


def write_edit(img: Image.Image, result: edit.EditResult, folder: Path) -> dict[str, Path]:
    """Write an edit's ``edited.png`` and ``edit_compare.png`` into ``folder``."""
    return {
        "edited": files.save_png(result.image, folder / "edited.png"),
        "edit_compare": files.save_png(edit.compare_strip(img, result.weight, result.image),
                                    folder / "edit_compare.png"),
    }


def predict(cfg: PredictConfig, argv: list[str] | None = None) -> list[PredictOutput]:
    """Run Peekaboo on ``cfg.image`` (or on an image sampled for ``cfg.generate``) for every prompt.

    Writes ``<output_dir>/<image stem>/<prompt>/{mask,alpha,overlay,cutout}.png``, the resolved
    ``config.yaml`` and the command line ``cmd.txt`` beside them, and TensorBoard logs under ``tb/``.
    With ``generate=TEXT`` the folder is ``<output_dir>/<TEXT>/``, the sample is ``sample.png`` there, the
    prompts default to ``[TEXT]`` and each prompt's folder also gets ``rgba.png``. With ``edit.prompt=TEXT``
    each prompt's folder also gets ``edited.png`` and ``edit_compare.png``.

    The prompts are optimized together as one batch (:func:`peekaboo.app.segmenter.segment_image`), each with its
    own random stream, so each gets the mask it gets alone. Every prompt is optimized (and edited) before any
    file is written, and ``config.yaml`` / ``cmd.txt`` are
    written last: a rerun into a folder holding an earlier result that fails (bad model, non-finite loss)
    leaves every earlier file as it was, and the two files always describe the masks beside them.

    Raises:
        PeekabooError: bad image, model or config (before any optimization starts), a non-finite loss, or a
            failed write (files written before it are intact).
    """
    img: Image.Image | None = None
    if cfg.generate is None:
        img = images.load_image(cfg.image, tuple(cfg.image_options.flatten_background), cfg.image_options.max_pixels)
        root = Path(cfg.output_dir) / files.safe_name(Path(cfg.image).stem)
    else:
        root = Path(cfg.output_dir) / files.safe_name(cfg.generate)
    device = resolve_device(cfg.trainer.accelerator)
    with quiet_loading():
        backbone = shared_backbone(cfg.model, device)
    if cfg.generate is not None and cfg.sampling.size is not None:
        pipelines.check_sample_size(cfg.sampling.size, backbone)  # before any file is written
    sample = None
    if img is None:
        img = sample = pipelines.generate(backbone, cfg.generate, cfg.sampling, cfg.model, cfg.trainer.precision)
    prompts = list(cfg.prompt) or [cfg.generate]
    # All prompts in one batch, each with its own random stream: the masks of one-at-a-time runs.
    results = [(seg, result, edit_result(cfg, backbone, img, seg.mask) if cfg.edit.prompt is not None else None)
               for seg, result in segment_image(img, prompts, cfg, backbone, root / "tb" if cfg.tensorboard else None)]
    if sample is not None:
        log.info("sampled %r (seed %d) -> %s", cfg.generate, cfg.sampling.seed,
                 files.save_png(sample, root / "sample.png"))
    outputs = []
    for seg, result, edited in results:
        folder = root / files.safe_name(seg.prompt)
        paths = seg.save(folder)
        if cfg.generate is not None:
            paths["rgba"] = files.save_png(overlays.cutout(img, seg.final.alpha_u8), folder / "rgba.png")
        if edited is not None:
            paths.update(write_edit(img, edited, folder))
        out = PredictOutput(prompt=seg.prompt, folder=folder, area=seg.area, **paths)
        outputs.append(out)
        log.info("%r: %d steps in %.1fs, mask covers %.1f%% -> %s (%s)", seg.prompt, result.steps, result.seconds,
                 100 * seg.area, folder, " ".join(p.name for p in out.files()))
    write_start(root, to_yaml(cfg), argv)
    return outputs
