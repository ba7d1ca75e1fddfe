"""Segment one image for one or more prompts and write the masks at the image's original size."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from peekaboo import io
from peekaboo.backbone import shared_backbone
from peekaboo.config import PredictConfig, to_yaml
from peekaboo.devices import resolve_device
from peekaboo.engine import optimize_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOutput:
    """The files written for one prompt."""

    prompt: str
    folder: Path
    mask: Path  # binary mask, original size, 0/255
    alpha: Path  # soft alpha, original size, 0..255
    overlay: Path  # mask tinted over the image
    cutout: Path  # RGBA: the image with the soft alpha as its alpha channel
    area: float  # fraction of the image inside the binary mask


def write_outputs(img: Image.Image, alpha_orig, threshold: float, folder: Path) -> dict[str, Path]:
    """Write mask, alpha, overlay and cutout PNGs for one soft mask already mapped to the original size.

    Args:
        img: the original RGB image.
        alpha_orig: ``(H, W)`` tensor in [0, 1].
    """
    alpha_u8 = io.quantize(alpha_orig)
    mask = io.binarize(alpha_u8, threshold)
    return {
        "mask": io.save_png(Image.fromarray((mask * 255).astype(np.uint8), "L"), folder / "mask.png"),
        "alpha": io.save_png(Image.fromarray(alpha_u8, "L"), folder / "alpha.png"),
        "overlay": io.save_png(io.overlay(img, mask), folder / "overlay.png"),
        "cutout": io.save_png(io.cutout(img, alpha_u8), folder / "cutout.png"),
    }


def predict(cfg: PredictConfig, argv: list[str] | None = None) -> list[PredictOutput]:
    """Run Peekaboo on ``cfg.image`` for every prompt in ``cfg.prompt``.

    Writes ``<output_dir>/<image stem>/<prompt>/{mask,alpha,overlay,cutout}.png``, the resolved
    ``config.yaml`` and the command line ``cmd.txt`` beside them, and TensorBoard logs under ``tb/``.

    Raises:
        PeekabooError: bad image, model or config (before any optimization starts).
    """
    opt = cfg.optimization
    img = io.load_image(cfg.image, tuple(cfg.image_options.flatten_background), cfg.image_options.max_pixels)
    canvas, placement = io.fit_square(img, opt.mask.size, cfg.image_options.fit)
    device = resolve_device(cfg.trainer.accelerator)
    backbone = shared_backbone(cfg.model, device)
    root = Path(cfg.output_dir) / io.safe_name(Path(cfg.image).stem)
    root.mkdir(parents=True, exist_ok=True)
    io.write_text(to_yaml(cfg), root / "config.yaml")
    io.write_text(" ".join(argv if argv is not None else sys.argv) + "\n", root / "cmd.txt")
    outputs = []
    for prompt in cfg.prompt:
        name = io.safe_name(prompt)
        result = optimize_pair(
            canvas, prompt, name, opt, cfg.trainer, backbone,
            tb_dir=root / "tb" if cfg.tensorboard else None,
        )
        alpha = io.unfit(result.alpha, placement)
        folder = root / name
        paths = write_outputs(img, alpha, opt.threshold, folder)
        area = float((io.binarize(io.quantize(alpha), opt.threshold)).mean())
        outputs.append(PredictOutput(prompt=prompt, folder=folder, area=area, **paths))
        log.info("%r: %d steps in %.1fs, mask covers %.1f%% -> %s", prompt, result.steps, result.seconds,
                 100 * area, folder)
    return outputs
