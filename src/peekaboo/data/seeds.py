"""The seed blocks of the synthetic scenes' splits, shared by both scene sets (shapes, objects).

Each split owns a block of ``10**8`` seeds: ``train`` from 0, ``tune`` from ``2 * 10**8``, ``eval`` from ``3 *
10**8``, ``robust`` from ``4 * 10**8``, ``tune_robust`` from ``5 * 10**8``. The blocks are disjoint, so a model
trained on ``train`` never sees a scene it is evaluated on.
"""

from __future__ import annotations

__all__ = ["EVAL_SPLITS", "SPLITS", "TUNE_SPLITS", "scene_seed"]

#: Every split, training first.
SPLITS: tuple[str, ...] = ("train", "tune", "eval", "robust", "tune_robust")
#: The splits with evaluation pairs, and those of them that settings are chosen on (the others report them).
EVAL_SPLITS: tuple[str, ...] = SPLITS[1:]
TUNE_SPLITS: tuple[str, ...] = ("tune", "tune_robust")
_SPLIT_STRIDE = 10**8
_SPLIT_OFFSETS: dict[str, int] = {"train": 0, "tune": 2 * _SPLIT_STRIDE, "eval": 3 * _SPLIT_STRIDE,
                                  "robust": 4 * _SPLIT_STRIDE, "tune_robust": 5 * _SPLIT_STRIDE}


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of ``split``.

    Raises:
        ValueError: an unknown split, or an index outside the split's block.
    """
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < _SPLIT_STRIDE:
        raise ValueError(f"scene index {index} outside [0, {_SPLIT_STRIDE})")
    return _SPLIT_OFFSETS[split] + index
