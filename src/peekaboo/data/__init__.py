"""Pair sources of dataset runs: :func:`build_source` turns ``data.*`` config into a list of :class:`Pair`.

Sources (``data.source``):

- ``manifest`` (:mod:`~peekaboo.data.manifest`): a JSONL or CSV file of image, prompt, optional mask and id.
- ``objects`` (:mod:`~peekaboo.data.synthetic`): everyday objects (emoji) over photographs, with exact masks of
  their visible pixels.
- ``shapes`` (:mod:`~peekaboo.data.synthetic`): synthetic coloured-shapes scenes with exact masks.
- ``voc`` (:mod:`~peekaboo.data.voc`): Pascal VOC 2012 segmentation, one pair per class in each image.
- ``refcoco`` (:mod:`~peekaboo.data.refcoco`): RefCOCO / RefCOCO+ / RefCOCOg, one pair per sentence.
- ``folder`` (:mod:`~peekaboo.data.folder`): every image under a folder times its prompts, no ground truth.

Every pair's image and target load lazily and every loader is a ``functools.partial`` of a module-level
function, so pairs pickle to worker processes.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from peekaboo.config import DATA_SOURCES
from peekaboo.data.base import IGNORE, Pair
from peekaboo.data.folder import folder_pairs
from peekaboo.data.manifest import manifest_pairs
from peekaboo.data.refcoco import refcoco_pairs
from peekaboo.data.synthetic import SCENE_SETS, synthetic_pairs
from peekaboo.data.voc import voc_pairs
from peekaboo.errors import ConfigError, PeekabooError

__all__ = ["IGNORE", "Pair", "build_source"]

# What an unset (``???``) config value reads as on a plain DataConfig dataclass.
_MISSING = "???"
# The sources whose pairs depend on data.split.
_SPLIT_SOURCES = ("objects", "shapes", "voc", "refcoco")


def build_source(cfg: Any) -> list[Pair]:
    """The pairs a ``data`` config names, in the source's order.

    Args:
        cfg: a :class:`~peekaboo.config.DataConfig` (dataclass or OmegaConf node).

    Returns:
        The pairs; for sources other than the synthetic ``objects`` and ``shapes``, only the first
        ``cfg.num_pairs`` when that is set (the synthetic sources generate exactly ``num_pairs``, default 200).

    Raises:
        ConfigError: ``data.source`` unset or unknown, or a key the source needs is missing.
        PeekabooError: the source's files are missing or malformed, ids repeat, or no pair was found.
    """
    source = _value(cfg, "source")
    if source == "manifest":
        pairs = manifest_pairs(_required(cfg, "manifest", "the .jsonl or .csv manifest file"),
                               allow_outside_root=bool(cfg.allow_outside_root))
    elif source in SCENE_SETS:
        pairs = synthetic_pairs(cfg.split, cfg.num_pairs, scenes=source)
    elif source == "voc":
        pairs = voc_pairs(_required(cfg, "root", "the VOC2012 folder"), cfg.split)
    elif source == "refcoco":
        pairs = refcoco_pairs(_required(cfg, "root", "the folder holding refs(<split_by>).p and instances.json"),
                              split=cfg.split, split_by=cfg.split_by, images_dir=_value(cfg, "images_dir"))
    elif source == "folder":
        pairs = folder_pairs(_required(cfg, "root", "the folder holding your images"), cfg.prompts, cfg.extensions)
    elif source is None:
        raise ConfigError(f"data.source is not set; choose one of {' | '.join(DATA_SOURCES)}, e.g. data=voc.")
    else:
        raise ConfigError(f"data.source={source!r} is unknown; choose one of {' | '.join(DATA_SOURCES)}.")
    if source not in SCENE_SETS and cfg.num_pairs is not None:
        pairs = pairs[: cfg.num_pairs]
    if not pairs:
        # Only the sources that read data.split name it: a manifest lists its pairs itself.
        split = f" (split {cfg.split!r})" if source in _SPLIT_SOURCES else ""
        hint = " and data.split" if source in _SPLIT_SOURCES else ""
        raise PeekabooError(f"data.source={source}{split} yielded no pairs; check the data files{hint}.")
    _check_unique(pairs, source)
    return pairs


def _check_unique(pairs: list[Pair], source: str) -> None:
    seen: set[str] = set()
    for pair in pairs:
        if pair.id in seen:
            raise PeekabooError(f"data.source={source} yields the pair id {pair.id!r} twice; ids must be unique "
                                "(they name each pair's outputs).")
        seen.add(pair.id)


def _value(cfg: Any, key: str) -> Any:
    """``cfg.<key>``, with an unset (``???``) value read as None on both dataclasses and OmegaConf nodes."""
    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, key):
        return None
    try:
        value = getattr(cfg, key)
    except MissingMandatoryValue:
        return None
    return None if value == _MISSING else value


def _required(cfg: Any, key: str, what: str) -> str:
    value = _value(cfg, key)
    if value is None or not str(value).strip():
        raise ConfigError(f"data.source={cfg.source} needs data.{key}=<{what}>; add it to the command line or "
                          "the data config.")
    return str(value)
