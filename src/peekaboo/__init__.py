"""Peekaboo: zero-shot text-prompted segmentation with a frozen text-to-image diffusion model.

``from peekaboo import Segmenter`` is the Python API (:mod:`peekaboo.segmenter`). The package is laid out in
layers whose imports only point down (``lint-imports`` checks it): bench -> app (cli; predict, runner,
evaluate, segmenter, edit, logs) -> core (the rest):

- :mod:`peekaboo.config`   typed configs, YAML groups and ``key=value`` overrides
- :mod:`peekaboo.backbone` the frozen diffusion model: loading, prompt/image encoding, dream-loss gradient
- :mod:`peekaboo.masks`    mask parameterizations (raster, fourier, bilateral variants)
- :mod:`peekaboo.ops`      pure tensor math: compositing, backgrounds, SDS gradient
- :mod:`peekaboo.module`   the LightningModule that optimizes one (image, prompt) pair
- :mod:`peekaboo.io`       image loading, fitting to the working square and back, atomic writes
- :mod:`peekaboo.data`     pair sources (manifest, synthetic shapes, VOC, RefCOCO)
- :mod:`peekaboo.runner`   dataset runs: sharding over workers, resume, outputs
- :mod:`peekaboo.metrics`  IoU and the paper's precision-at-threshold metrics
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmentation", "Segmenter"]


def __getattr__(name: str) -> Any:
    # The API loads torch, Lightning and diffusers: only when it is asked for, so `import peekaboo.io` stays light.
    if name in __all__:
        from peekaboo import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'peekaboo' has no attribute {name!r}")
