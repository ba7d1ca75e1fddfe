"""The workers of a dataset run: one process per device (spawned here, or started by torchrun / SLURM), each
optimizing its share of the planned batches (reporting through :mod:`peekaboo.runs.progress`); requeueing after a
preemption."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peekaboo.config import TrainConfig, logger_kind, to_yaml
from peekaboo.data import build_source
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.errors import EXIT_PREEMPTED, OutputError, exit_status
from peekaboo.optim.loggers import log_root, make_logger
from peekaboo.optim.preemption import PREEMPTION, Preempted, preemption_signals
from peekaboo.runs.batches import optimize_batch
from peekaboo.runs.outputs import RunDir, output_names
from peekaboo.runs.planning import logged_names, plan_units
from peekaboo.runs.progress import JobCurves, JobProgress
from peekaboo.utils.console import setup_logging
from peekaboo.utils.devices import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the run's workers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> World | None:
        """The worker identity set by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or by srun (SLURM_PROCID/...).

        A batch script that runs ``python train.py`` without ``srun`` under ``sbatch --ntasks=N`` sees
        ``SLURM_NTASKS=N`` too, but no job step (``SLURM_STEP_ID``): no other task was started, so this process
        is the whole job and runs every pair (None), with a warning that names ``srun``.
        """
        env = os.environ
        if "WORLD_SIZE" in env and "RANK" in env:
            return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
        if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
            step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
            if step is None or step in _SLURM_BATCH_STEPS:
                log.warning("SLURM_NTASKS=%s but this process was not started by srun, so it is the job's only "
                            "process and runs every pair itself (with trainer.devices workers); to spread the "
                            "pairs over the %s tasks, start it with srun (srun python train.py ...) in the batch "
                            "script.", env["SLURM_NTASKS"], env["SLURM_NTASKS"])
                return None
            return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        return None


# The batch script's own step id, should a Slurm version export one there (its numeric and its named form).
_SLURM_BATCH_STEPS = ("4294967294", "batch")


def spawn_workers(cfg: TrainConfig, names: list[str]) -> int:
    """Start ``trainer.devices`` worker processes (spawned, so CUDA initializes cleanly in each)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = cfg.trainer.devices
    yaml = to_yaml(cfg)
    progress = JobProgress(RunDir(Path(cfg.run.root) / cfg.run.name), names, cfg.run.progress_every_s)
    procs = [ctx.Process(target=_worker_entry, args=(yaml, World(r, n, r)), daemon=False) for r in range(n)]
    for p in procs:
        p.start()
    forward = lambda signum, frame: [os.kill(p.pid, signum) for p in procs if p.is_alive()]  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        # The parent speaks for the job: one progress line for all workers, whose own bars stay off in a log.
        while any(p.is_alive() for p in procs):
            next(p for p in procs if p.is_alive()).join(timeout=progress.poll_s)
            progress.report()
        progress.report(final=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.exitcode for p in procs]
    for line in killed_workers(codes):
        log.error(line)
    if any(codes):
        log.warning("worker exit codes: %s", codes)
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else max((abs(c) for c in codes if c), default=0)


def killed_workers(codes: list[int | None]) -> list[str]:
    """One line per worker that a signal ended (a negative exit code: it could not handle the signal and save),
    naming the signal and what to do; SIGKILL is what the out-of-memory killer sends."""
    lines = []
    for rank, code in enumerate(codes):
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-code}"
            cause = " (the out-of-memory killer's signal)" if -code == signal.SIGKILL else ""
            lines.append(f"worker {rank} was killed by {name}{cause}; if memory ran out, lower data.pairs_per_step "
                         "or trainer.devices, then rerun the same command: finished pairs are kept.")
    return lines


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what taskset, cgroups or SLURM's --cpus-per-task
    leave it), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _worker_entry(cfg_yaml: str, world: World) -> None:
    setup_logging()
    schema = OmegaConf.structured(TrainConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.create(cfg_yaml))
    # Share the process's cores between the workers instead of oversubscribing them: a GPU worker's CPU work
    # (loading images, writing masks and overlays) runs beside the others' too.
    torch.set_num_threads(max(1, usable_cpus() // world.size))
    # The same one line (and status) a single-process run gives, not a traceback; the process's exit code is
    # how the parent learns the worker's status.
    sys.exit(exit_status(lambda: run_worker(cfg, world, spawned=True), context=f"worker {world.rank}: "))


def _own_rank_zero() -> None:
    """Make this worker rank zero for Lightning.

    Lightning reads the global rank from the launcher's environment (``RANK``, ``SLURM_PROCID``) and silences
    loggers and other rank-zero-only work everywhere else, which suits one job spread over processes. Each
    worker here runs its own single-device Trainers on its own pairs, so every worker must log.
    """
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only.rank = 0  # one object, shared by Lightning's loggers and callbacks


def run_worker(cfg: TrainConfig, world: World, spawned: bool = False) -> int:
    """Optimize this worker's share of the pairs; returns the exit status (0, or EXIT_PREEMPTED).

    ``spawned``: started by this package's own launcher (``trainer.devices > 1``), whose parent process
    reports the job's progress.
    """
    from tqdm import tqdm

    _own_rank_zero()
    run_dir = RunDir(Path(cfg.run.root) / cfg.run.name)
    pairs = build_source(cfg.data)
    names = output_names(pairs)
    finished = sum(run_dir.record(n) is not None for n in names)
    # Logger runs of their own for a sample of the pairs only (run.log_pairs): TensorBoard cannot browse one run
    # per pair of a whole dataset. The sample is batched apart, so a batch either logs all its pairs or none.
    logged = logged_names(names, cfg.run.log_pairs)
    units = plan_units(list(zip(pairs, names, strict=True)), run_dir, cfg.data.pairs_per_step,
                       logged)[world.rank :: world.size]
    unlogged_cfg = OmegaConf.merge(cfg, {"run": {"logger": "none"}})
    device = resolve_device(cfg.trainer.accelerator, world.local_rank)
    # Bars only on a terminal; in a log the job-wide line speaks instead (the parent's, or rank 0's).
    bar = tqdm(total=sum(map(len, units)), desc=f"worker {world.rank}", position=world.rank, unit="pair",
               dynamic_ncols=True, disable=not cfg.trainer.enable_progress_bar or JobProgress.enabled())
    progress = JobProgress(run_dir, names, cfg.run.progress_every_s) if world.rank == 0 and not spawned else None
    # Job curves are indexed by pairs finished in the whole run, so a resumed worker continues past every step
    # an earlier attempt logged instead of writing the same steps again.
    kind = logger_kind(cfg.run)
    curves = None
    if kind is not None:
        root = log_root(run_dir.root, kind)
        curves = JobCurves(make_logger(kind, root, f"worker{world.rank}"), finished,
                            lambda: make_logger(kind, root, f"worker{world.rank}-losses", resume_step=0))
    with preemption_signals(), contextlib.closing(bar):
        try:
            backbone = shared_backbone(cfg.model, device) if units else None
            for unit in units:
                if PREEMPTION.signal is not None:  # stopped between batches: nothing in flight to save
                    requeue_once(run_dir)
                    return EXIT_PREEMPTED
                # Pairs of the share that another attempt finished meanwhile are not redone.
                batch = [(p, n) for p, n in unit if run_dir.record(n) is None]
                if not batch:
                    continue
                try:
                    batch_cfg = cfg if any(n in logged for _, n in batch) else unlogged_cfg
                    records = optimize_batch(batch_cfg, batch, run_dir, backbone, device)
                except Preempted as err:
                    log.warning("worker %d preempted (%s): %s checkpointed; rerun the same command to resume.",
                                world.rank, err, ", ".join(p.id for p, _ in batch))
                    requeue_once(run_dir)
                    return EXIT_PREEMPTED
                except OutputError as err:
                    # A full disk or an unwritable folder fails every later pair too: stop, rather than spend the
                    # compute and record them all as failed. The unfinished pairs have no done record, so a
                    # rerun redoes exactly them; finished pairs were written atomically and stay as they are.
                    raise OutputError(f"{err} The run stopped at pair(s) {', '.join(p.id for p, _ in batch)}; "
                                      "fix that and rerun the same command to resume (finished pairs are kept)."
                                      ) from None
                bar.update(len(records))
                if progress is not None:
                    progress.report()
                if curves is not None:
                    curves.add(records)
            if progress is not None:
                progress.report(final=True)
        finally:
            if curves is not None:
                curves.close()
    return 0


def requeue_once(run_dir: RunDir) -> None:
    """Under SLURM, put the job back in the queue so the rerun happens without a human.

    Every preempted worker of the job gets here; the first to create the job's marker file in the run folder
    is the one that calls ``scontrol requeue`` (a job requeued twice would run twice).
    """
    env = os.environ
    array = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array and "SLURM_ARRAY_TASK_ID" in env else env.get("SLURM_JOB_ID")
    if not job or not shutil.which("scontrol"):
        return
    marker = run_dir.root / f".requeued-{job}-{env.get('SLURM_RESTART_COUNT', '0')}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return  # another worker of this job attempt requeued it
    except OSError as err:
        log.warning("could not create %s (%s); requeueing without it.", marker, err)
    done = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    if done.returncode:
        log.warning("scontrol requeue %s failed (%s); resubmit the job to resume the run.", job,
                    (done.stderr or "").strip() or f"exit status {done.returncode}")
