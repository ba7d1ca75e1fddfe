"""The dataset-run driver: ``run(cfg)`` optimizes every pair of ``cfg.data``, resuming a run of the same name.

It checks what it can before any work (the model source, the run's identity: :mod:`peekaboo.runs.planning`),
records the run's start, hands the pairs to the workers (:mod:`peekaboo.runs.workers`) and rewrites the results,
summary and report at the end (:mod:`peekaboo.runs.outputs`; the run folder's files: :mod:`peekaboo.runs.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peekaboo.config import TrainConfig, to_yaml
from peekaboo.data import build_source
from peekaboo.diffusion.checks import check_model_source
from peekaboo.diffusion.identity import model_fingerprint
from peekaboo.runs.layout import CONFIG_FILE, write_start
from peekaboo.runs.outputs import finalize, output_names
from peekaboo.runs.planning import check_same_run, check_same_weights
from peekaboo.runs.workers import World, run_worker, spawn_workers
from peekaboo.utils import files
from peekaboo.utils.devices import check_worker_devices, resolve_device


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`run` did: the run's summary, its folder and the exit status for the command line
    (0, or :data:`~peekaboo.errors.EXIT_PREEMPTED` when a worker was stopped to be resumed)."""

    summary: dict[str, Any]
    root: Path
    status: int


def run(cfg: TrainConfig, argv: list[str] | None = None) -> RunOutcome:
    """Optimize every pair of ``cfg.data`` (resuming a previous run of the same name).

    With ``trainer.devices=N > 1`` this process starts N workers (one per GPU: more than the visible GPUs is
    refused); under torchrun or srun this process is one worker of the job. Raises :class:`PeekabooError` for
    bad input found before any work starts; a preempted worker is not an error but a status
    (:data:`~peekaboo.errors.EXIT_PREEMPTED`).
    """
    run_dir = Path(cfg.run.root) / cfg.run.name
    pairs = build_source(cfg.data)
    names = output_names(pairs)
    # Every model problem we can see without loading weights (also float16 on CPU) fails here, before the run
    # folder records these settings: a corrected rerun must not be refused as "different settings".
    check_model_source(cfg.model, resolve_device(cfg.trainer.accelerator), segmentation=True)
    env_world = World.from_env()
    if env_world is None:  # this process starts the workers: never more than one per GPU
        check_worker_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    check_same_run(run_dir, cfg)
    weights = model_fingerprint(cfg.model.pretrained, cfg.model.revision)
    check_same_weights(run_dir, weights)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what the start-up check cannot foresee, e.g. a folder under /proc
        raise files.output_error(run_dir, err) from None
    # Written once, when the run starts: a rerun resumes under the same settings (check_same_run compared
    # them above), and one that is refused or fails must leave the record of the run's start as it was.
    if (env_world is None or env_world.rank == 0) and not (run_dir / CONFIG_FILE).is_file():
        write_start(run_dir, to_yaml(cfg), argv, weights)
    if env_world is not None:
        code = run_worker(cfg, env_world)
    elif cfg.trainer.devices > 1:
        code = spawn_workers(cfg, names)
    else:
        code = run_worker(cfg, World())
    return RunOutcome(summary=finalize(run_dir, pairs, names), root=run_dir, status=code)
