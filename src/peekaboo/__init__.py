"""Peekaboo: zero-shot text-prompted segmentation with a frozen text-to-image diffusion model.

``from peekaboo import Segmenter`` is the Python API (:mod:`peekaboo.app.segmenter`). Subpackages by role, each
importing only the ones listed below it (``lint-imports`` checks it):

- :mod:`peekaboo.bench`     benchmark machinery behind ``benchmarks/*.py``
- :mod:`peekaboo.app`       what users call: command lines, ``predict``, the :class:`Segmenter` API, edits
- :mod:`peekaboo.runs`      dataset runs over workers, resume, outputs, evaluation, metrics, the run report
- :mod:`peekaboo.optim`     one pair's mask optimization: masks, the LightningModule, starts, the engine
- :mod:`peekaboo.data`      pair sources (manifest, folder, VOC, RefCOCO, the synthetic scenes)
- :mod:`peekaboo.diffusion` the frozen diffusion model: loading, encoding, UNet calls, guidance estimators
- :mod:`peekaboo.config`    typed configs, YAML presets and ``key=value`` overrides
- :mod:`peekaboo.utils`     images in and masks out, atomic files, overlays, devices, console logging
- :mod:`peekaboo.ops`       pure tensor math of the method (compositing, backgrounds, score-distillation terms)
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmentation", "Segmenter"]


def __getattr__(name: str) -> Any:
    # The API loads torch, Lightning and diffusers: only when it is asked for, so `import peekaboo.utils` stays light.
    if name in __all__:
        from peekaboo.app import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'peekaboo' has no attribute {name!r}")
