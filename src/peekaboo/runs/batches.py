"""One batch of a dataset run: load its pairs' images, fit their masks together (resuming the batch's checkpoint)
and write each pair's outputs and done record. A pair whose input is unusable is recorded as failed; the others
go on."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from peekaboo.config import TrainConfig, logger_kind
from peekaboo.data import Pair
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import NonFiniteError, PeekabooError
from peekaboo.optim.engine import FitOptions, PairResult, optimize_pairs, split_on_oom
from peekaboo.optim.loggers import log_root
from peekaboo.optim.module import non_finite_message
from peekaboo.optim.preemption import SaveOnPreemption
from peekaboo.runs.layout import BATCH_MEMBERS, CHECKPOINT_FILE
from peekaboo.runs.metrics import failed_status
from peekaboo.runs.outputs import RunDir, write_pair, write_record
from peekaboo.runs.planning import batch_ckpt_dir, valid_checkpoint
from peekaboo.utils import files, images
from peekaboo.utils.devices import trainer_devices

log = logging.getLogger(__name__)


class _Loaded(NamedTuple):
    """A pair of the batch whose image loaded: what its fit and its outputs need."""

    pair: Pair
    name: str  # its output name
    image: Image.Image  # at its original size
    canvas: torch.Tensor  # (3, S, S): the square working canvas
    placement: images.Placement  # how the canvas maps back onto the image
    record: dict[str, Any]  # its record's fields so far (id, prompt, name, meta)


def optimize_batch(cfg: TrainConfig, batch: list[tuple[Pair, str]], run_dir: RunDir, backbone: Backbone,
                   device: torch.device) -> list[dict]:
    """Optimize a batch of pairs (resuming its checkpoint), write outputs and done records; returns records.

    A pair whose image or target cannot be used is recorded as failed and the others go on.
    """
    opts = cfg.image_options
    records: list[dict] = []
    ready: list[_Loaded] = []
    for pair, name in batch:
        record: dict[str, Any] = {"id": pair.id, "prompt": pair.prompt, "name": name, **({"meta": pair.meta}
                                                                                       if pair.meta else {})}
        try:
            img = (images.load_image(pair.path, tuple(opts.flatten_background), opts.max_pixels)
                   if pair.path is not None else pair.load_image())
            canvas, placement = images.fit_square(img, cfg.optimization.mask.size, opts.fit)
        except PeekabooError as err:
            log.warning("pair %s failed: %s", pair.id, err)
            records.append(write_record(run_dir, name, {**record, "status": failed_status("input"),
                                                        "error": str(err)}))
            continue
        ready.append(_Loaded(pair, name, img, canvas, placement, record))
    if not ready:
        return records
    # Out of accelerator memory: the batch is split in halves and retried (the masks are the same).
    return records + split_on_oom(ready, lambda part: _fit_and_write(cfg, part, run_dir, backbone, device))


def _fit_and_write(cfg: TrainConfig, ready: list[_Loaded], run_dir: RunDir, backbone: Backbone,
                   device: torch.device) -> list[dict]:
    """Optimize the loaded pairs ``ready`` as one batch (resuming its checkpoint) and write their outputs and
    done records; returns the records."""
    names = [r.name for r in ready]
    ckpt_dir = batch_ckpt_dir(run_dir, names)
    if len(names) > 1:
        files.write_text(json.dumps(names), ckpt_dir.parent / BATCH_MEMBERS)
    failure = ""
    try:
        results: list[PairResult | None] = list(_fit(cfg, ready, run_dir, ckpt_dir, backbone, device))
    except NonFiniteError as err:
        results, failure = [None] * len(ready), str(err)
    except torch.cuda.OutOfMemoryError:
        if len(names) > 1 and not (ckpt_dir / CHECKPOINT_FILE).is_file():  # nothing to resume: the halves start anew
            shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
        raise
    except OSError as err:  # a checkpoint or TensorBoard write inside the fit (full disk, unwritable folder)
        raise files.output_error(err.filename or run_dir.root, err) from None
    records = [_write(cfg, run_dir, loaded, result, failure) for loaded, result in zip(ready, results, strict=True)]
    if not cfg.run.keep_checkpoints:
        shutil.rmtree(ckpt_dir.parent if len(names) > 1 else ckpt_dir, ignore_errors=True)
    return records


def _fit(cfg: TrainConfig, ready: list[_Loaded], run_dir: RunDir, ckpt_dir: Path, backbone: Backbone,
         device: torch.device) -> list[PairResult]:
    """One fit of the batch's masks, checkpointed in ``ckpt_dir`` (every ``run.checkpoint_every_n_steps`` steps and
    on preemption) and resumed from its checkpoint there."""
    names = [r.name for r in ready]
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.run.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True, save_on_train_epoch_end=False),
        SaveOnPreemption(ckpt_dir / CHECKPOINT_FILE),
    ]
    kind = logger_kind(cfg.run)
    return optimize_pairs(
        torch.stack([r.canvas for r in ready]), [r.pair.prompt for r in ready], [r.pair.id for r in ready],
        cfg.optimization, cfg.trainer, backbone,
        FitOptions(tb_dir=log_root(run_dir.root, kind), logger_kind=kind or FitOptions.logger_kind,
                   run_name=names[0] if len(names) == 1 else ckpt_dir.parent.name, pair_run_names=names,
                   callbacks=callbacks, ckpt_path=valid_checkpoint(ckpt_dir / CHECKPOINT_FILE),
                   enable_progress_bar=False, devices=trainer_devices(device)),
    )


def _write(cfg: TrainConfig, run_dir: RunDir, loaded: _Loaded, result: PairResult | None, failure: str) -> dict:
    """A pair's outputs and done record after its fit; ``result`` None (the whole fit failed with ``failure``) or
    failed: the pair is recorded as failed with the error."""
    if result is None or result.failed:
        error = failure or non_finite_message(f"pair {loaded.pair.id}", cfg.optimization)
        return write_record(run_dir, loaded.name, {**loaded.record, "status": failed_status("non-finite"),
                                                   "error": error})
    fields = write_pair(cfg, run_dir, loaded.name, loaded.image, loaded.placement, result, loaded.pair)
    return write_record(run_dir, loaded.name, {**loaded.record, **fields})
