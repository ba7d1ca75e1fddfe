"""Resume planning: whether a rerun is the same run, and which unfinished pairs run together in which batch.

A run folder records its settings (``config.yaml``); a rerun that would change what a pair computes is refused
(:func:`check_same_run`), one that only changes speed resumes. The unfinished pairs are dealt to the workers in
batches (:func:`plan_units`), a batch interrupted with a checkpoint kept whole; every random draw is seeded from
(seed, pair id, step), so where a pair runs, and whether it was interrupted, never changes its mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peekaboo.config import TrainConfig, drop_retired_keys
from peekaboo.data import Pair
from peekaboo.errors import ConfigError
from peekaboo.optim.masks import LEGACY_REVISION, MASK_REVISIONS, REVISION_KEY, check_checkpoint_revision
from peekaboo.runs.layout import BATCH_MEMBERS, CHECKPOINT_FILE, CONFIG_FILE, WEIGHTS_FILE
from peekaboo.runs.outputs import RunDir

log = logging.getLogger(__name__)

# Config sections that change what a pair computes: a rerun must match them to resume the same run.
RESULT_KEYS = ("data", "model", "image_options", "optimization", "trainer.max_steps", "trainer.precision")
# Keys inside RESULT_KEYS that change only how fast pairs run, never their masks (per-pair seeds make batching
# invisible; compiled, channels-last, either attention kernel and TF32 matmuls compute the same model, to rounding):
# a resume may change them.
SPEED_KEYS = ("data.pairs_per_step", "model.compile", "model.attention", "model.channels_last", "model.tf32",
              "model.vae_gradient_checkpointing")


def check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix results of different settings in one run folder."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = drop_retired_keys(OmegaConf.load(saved_path))
    # A folder started before a key existed saved no value for it: it ran with what is now the key's default
    # (every new key's default keeps the behaviour of before), so it reads as that default. A key that no
    # longer exists fails the merge: the saved config is then compared as it is, and shows as a difference.
    with contextlib.suppress(OmegaConfBaseException):
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    diffs = [key for key in RESULT_KEYS if _result_part(saved, key) != _result_part(cfg, key)]
    if diffs:
        raise ConfigError(
            f"Run folder {run_dir} was started with different {', '.join(diffs)} settings; rerun the same command "
            "to resume it, or choose a new run.name."
        )
    check_checkpoint_revisions(RunDir(run_dir), cfg.optimization.mask.kind)


def check_checkpoint_revisions(run_dir: RunDir, kind: str) -> None:
    """Refuse, before any work, a run whose unfinished pairs have a checkpoint of a mask of kind ``kind`` that
    another version of Peekaboo wrote (:data:`~peekaboo.optim.masks.MASK_REVISIONS`): resuming it would fail on
    its parameter keys, or go on with another mask. The module refuses such a checkpoint too, when it is loaded.

    Raises:
        ConfigError: naming the first such checkpoint and the fix.
    """
    if MASK_REVISIONS[kind] == LEGACY_REVISION:  # every checkpoint of this kind is of its revision
        return
    for members, path in _resumable_checkpoints(run_dir):
        if all(run_dir.record(n) is not None for n in members):
            continue  # a finished batch's kept checkpoint (run.keep_checkpoints) is never resumed
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True).get(REVISION_KEY)
        except Exception:  # unreadable: valid_checkpoint moves it aside and restarts its pairs
            continue
        check_checkpoint_revision(kind, saved, f"Checkpoint {path}")


def check_same_weights(run_dir: Path, fingerprint: str) -> None:
    """Refuse to resume a run with other weights than it started with: ``model.pretrained=bundled`` (or a folder
    or hub id) may name other weights today. A folder started before weights were recorded is not checked."""
    saved_path = run_dir / WEIGHTS_FILE
    if not saved_path.is_file():
        return
    saved = saved_path.read_text().strip()
    if saved != fingerprint:
        raise ConfigError(
            f"Run folder {run_dir} was started with other model weights ({saved}; model.pretrained now gives "
            f"{fingerprint}); resume it with the weights it started with, or choose a new run.name."
        )


def _result_part(cfg: Any, key: str) -> Any:
    """The value of ``key`` in ``cfg`` as plain data, without the :data:`SPEED_KEYS` under it."""
    value = OmegaConf.select(cfg, key)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    for speed in SPEED_KEYS:
        section, _, leaf = speed.rpartition(".")
        if section == key and isinstance(value, dict):
            value.pop(leaf, None)
    return value


def logged_names(names: list[str], count: int | None) -> set[str]:
    """The pairs that get a logger run of their own (``run.log_pairs``): the ``count`` output names whose SHA-1
    is lowest (None: all). Spread over the dataset, the same whatever the batching or the workers, and a pair
    logged in a run is logged in any run over a subset of its pairs."""
    if count is None or count >= len(names):
        return set(names)
    return set(sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:count])


def plan_units(todo: list[tuple[Pair, str]], run_dir: RunDir, pairs_per_step: int,
               logged: set[str] | None = None) -> list[list[tuple[Pair, str]]]:
    """Split the run's unfinished pairs into batches ("units") that the workers share round-robin.

    A batch interrupted with a checkpoint is kept whole (whatever ``pairs_per_step`` is now), so it resumes
    from its checkpoint; the other unfinished pairs are batched in dataset order, the ``logged`` ones (the pairs
    with logger runs, :func:`logged_names`) apart from the others, so a batch logs all its pairs or none.
    Every worker computes the same plan from the run folder, so the remaining pairs are spread evenly over
    however many workers the rerun has, whoever finished what before.
    """
    unfinished = [(p, n) for p, n in todo if run_dir.record(n) is None]
    index = {n: i for i, (_, n) in enumerate(unfinished)}
    units: list[list[tuple[Pair, str]]] = []
    taken: set[str] = set()
    for members in _checkpointed_batches(run_dir):
        if all(n in index and n not in taken for n in members):
            units.append([unfinished[index[n]] for n in members])
            taken.update(members)
    rest = [(p, n) for p, n in unfinished if n not in taken]
    groups = [rest] if logged is None else [[u for u in rest if u[1] in logged],
                                            [u for u in rest if u[1] not in logged]]
    for group in groups:
        units += [group[i : i + pairs_per_step] for i in range(0, len(group), pairs_per_step)]
    return sorted(units, key=lambda unit: index[unit[0][1]])


def _checkpointed_batches(run_dir: RunDir) -> list[list[str]]:
    """The member names of every batch (or lone pair) with a checkpoint to resume from."""
    return [members for members, _ in _resumable_checkpoints(run_dir)]


def _resumable_checkpoints(run_dir: RunDir) -> list[tuple[list[str], Path]]:
    """``(member names, checkpoint)`` of every batch (or lone pair) with a checkpoint."""
    found = []
    for members_file in sorted((run_dir.root / "batches").glob(f"*/{BATCH_MEMBERS}")):
        ckpt = members_file.parent / "ckpt" / CHECKPOINT_FILE
        if ckpt.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                found.append(([str(n) for n in json.loads(members_file.read_text())], ckpt))
    lone = sorted((run_dir.root / "pairs").glob(f"*/ckpt/{CHECKPOINT_FILE}"))
    found += [([ckpt.parents[1].name], ckpt) for ckpt in lone]
    return found


def valid_checkpoint(path: Path) -> Path | None:
    """``path`` if it is a loadable checkpoint; a corrupt one is moved aside with a warning."""
    if not path.is_file():
        return None
    try:
        # weights_only: a checkpoint is untrusted input (it may come from a shared or copied run folder) and
        # must not run code. Lightning's own load on resume would use torch's default, so a file that does
        # not pass here never reaches it.
        torch.load(path, map_location="cpu", weights_only=True)
        return path
    except Exception as err:  # any unreadable file means: start this pair again
        unsafe = isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower()
        why = "holds objects or code that a safe load refuses" if unsafe else f"is unreadable ({type(err).__name__})"
        aside = path.with_suffix(".corrupt")
        log.warning("checkpoint %s %s; moved it to %s and restarting that pair from scratch.", path, why, aside.name)
        path.rename(aside)
        return None


def batch_ckpt_dir(run_dir: RunDir, names: list[str]) -> Path:
    """Checkpoint folder of a batch: a lone pair's own folder, or one named by the batch's members (a resumed
    worker rebuilds the same unfinished batch, since finished batches drop out of its list whole)."""
    if len(names) == 1:
        return run_dir.ckpt_dir(names[0])
    digest = hashlib.sha1("\0".join(names).encode()).hexdigest()[:10]
    return run_dir.root / "batches" / f"{names[0]}+{len(names) - 1}-{digest}" / "ckpt"
