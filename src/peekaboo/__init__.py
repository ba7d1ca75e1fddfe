"""Peekaboo: zero-shot text-prompted segmentation with a frozen text-to-image diffusion model.

The package is laid out by job:

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

__version__ = "0.1.0"
