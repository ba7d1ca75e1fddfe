"""Dataset runs: spread pairs over worker processes, resume interrupted runs, write outputs and scores.

Layout of ``<run.root>/<run.name>/``::

    config.yaml  cmd.txt          the resolved config and the command line that started the run
    masks/<id>.png                binary mask at the image's original size
    alphas/<id>.png               soft alpha (0..255) at the original size
    overlays/<id>.png             mask tinted over the image (run.save_overlays)
    pairs/<id>/done.json          the pair's result record: it is finished (skipped on rerun)
    pairs/<id>/ckpt/last.ckpt     the pair's latest checkpoint while it runs (resumed from on rerun)
    batches/<...>/ckpt/last.ckpt  the same for a batch of pairs (data.pairs_per_step > 1)
    results.jsonl                 one line per finished pair
    summary.json                  pairs done / failed, mIoU, overall IoU, precision at IoU thresholds
    report.html  report/*.png     the run report (peekaboo.runs.report): summary, figures, gallery, failures
    tb/<id>/                      TensorBoard: one run per pair; tb/worker<rank>/ job-level curves
                                  (csv/, wandb/, mlruns/ instead with run.logger=csv | wandb | mlflow)

The unfinished pairs are dealt to the workers in batches (:func:`plan_units`); every random draw is seeded
from (seed, pair id, step), so where a pair runs, and whether it was interrupted, never changes its mask.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from peekaboo.utils import images, files, overlays
from peekaboo.runs import report
from peekaboo.diffusion.backbone import check_model_source, shared_backbone
from peekaboo.config import TrainConfig, logger_kind, to_yaml
from peekaboo.data import Pair, build_source
from peekaboo.utils.devices import resolve_device, trainer_devices
from peekaboo.optim.engine import (
    PREEMPTION,
    PairResult,
    Preempted,
    SaveOnPreemption,
    optimize_pairs,
    preemption_signals,
    split_on_oom,
)
from peekaboo.errors import EXIT_PREEMPTED, ConfigError, NonFiniteError, OutputError, PeekabooError, exit_status
from peekaboo.optim.loggers import log_root, make_logger
from peekaboo.utils.console import setup_logging
from peekaboo.runs.metrics import pair_scores, summarize
from peekaboo.optim.module import non_finite_hint

log = logging.getLogger(__name__)
# The files a dataset run writes per pair, each under ``<kind>s/<name>.png`` (the overlay only with
# run.save_overlays).
RUN_FILES = ("mask", "alpha", "overlay")
# Config sections that change what a pair computes: a rerun must match them to resume the same run.
RESULT_KEYS = ("data", "model", "image_options", "optimization", "trainer.max_steps", "trainer.precision")
# Keys inside RESULT_KEYS that change only how fast pairs run, never their masks (per-pair seeds make batching
# invisible; compiled, channels-last and either attention kernel compute the same model): a resume may change them.
SPEED_KEYS = ("data.pairs_per_step", "model.compile", "model.attention", "model.channels_last")


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`run` did: the run's summary, its folder and the exit status for the command line
    (0, or :data:`~peekaboo.errors.EXIT_PREEMPTED` when a worker was stopped to be resumed)."""

    summary: dict[str, Any]
    root: Path
    status: int


@dataclass(frozen=True)
class World:
    """This process's place among the run's workers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> World | None:
        """The worker identity set by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM (SLURM_PROCID/...)."""
        env = os.environ
        if "WORLD_SIZE" in env and "RANK" in env:
            return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
        if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
            return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        return None


class RunDir:
    """Paths and records of one run folder."""

    def __init__(self, root: Path):
        self.root = root

    def pair_dir(self, name: str) -> Path:
        return self.root / "pairs" / name

    def done_path(self, name: str) -> Path:
        return self.pair_dir(name) / "done.json"

    def ckpt_dir(self, name: str) -> Path:
        return self.pair_dir(name) / "ckpt"

    def record(self, name: str) -> dict | None:
        """The pair's finished record, or None (also for a damaged record: the pair is then redone)."""
        try:
            return json.loads(self.done_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def output_names(pairs: list[Pair]) -> list[str]:
    """File-system-safe output names, one per pair; two ids that map to one name are an error."""
    names = [files.safe_name(p.id) for p in pairs]
    seen: dict[str, str] = {}
    for pair, name in zip(pairs, names, strict=True):
        if name in seen:
            raise PeekabooError(f"Pair ids {seen[name]!r} and {pair.id!r} map to the same output name {name!r}; "
                                "make the ids differ in letters or digits.")
        seen[name] = pair.id
    return names


def _check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix results of different settings in one run folder."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = OmegaConf.load(saved_path)
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


def run(cfg: TrainConfig, argv: list[str] | None = None) -> RunOutcome:
    """Optimize every pair of ``cfg.data`` (resuming a previous run of the same name).

    With ``trainer.devices=N > 1`` this process starts N workers; under torchrun or SLURM this process is
    one worker of the job. Raises :class:`PeekabooError` for bad input found before any work starts; a
    preempted worker is not an error but a status (:data:`~peekaboo.errors.EXIT_PREEMPTED`).
    """
    run_dir = Path(cfg.run.root) / cfg.run.name
    pairs = build_source(cfg.data)
    names = output_names(pairs)
    # Every model problem we can see without loading weights (also float16 on CPU) fails here, before the run
    # folder records these settings: a corrected rerun must not be refused as "different settings".
    check_model_source(cfg.model, resolve_device(cfg.trainer.accelerator), segmentation=True)
    _check_same_run(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    env_world = World.from_env()
    # Written once, when the run starts: a rerun resumes under the same settings (_check_same_run compared
    # them above), and one that is refused or fails must leave the record of the run's start as it was.
    if (env_world is None or env_world.rank == 0) and not (run_dir / "config.yaml").is_file():
        files.write_text(" ".join(argv if argv is not None else sys.argv) + "\n", run_dir / "cmd.txt")
        files.write_text(to_yaml(cfg), run_dir / "config.yaml")  # last: its presence marks a started run
    if env_world is not None:
        code = run_worker(cfg, env_world)
    elif cfg.trainer.devices > 1:
        code = _spawn_workers(cfg, names)
    else:
        code = run_worker(cfg, World())
    return RunOutcome(summary=finalize(run_dir, pairs, names), root=run_dir, status=code)


def _spawn_workers(cfg: TrainConfig, names: list[str]) -> int:
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
    if any(codes):
        log.warning("worker exit codes: %s", codes)
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else max((abs(c) for c in codes if c), default=0)


class JobProgress:
    """The job-wide progress line of a run: pairs finished (by any worker) of all, and an ETA.

    In a log that is not a terminal (a cluster job's output file) one line every ``run.progress_every_s``
    seconds replaces the per-worker bars, which would garble each other there. Counting reads the run folder,
    so it sees every worker's pairs; the rate is taken from the pairs finished since this process started.
    """

    def __init__(self, run_dir: RunDir, names: list[str], every_s: float):
        self.run_dir, self.names = run_dir, names
        self.every = float(every_s)
        self.poll_s = max(0.1, min(self.every, 5.0))
        self.start = time.monotonic()
        self.at_start = self.finished()
        self.last_time: float | None = None
        self.last_count: int | None = None

    @staticmethod
    def enabled() -> bool:
        """Lines, not bars: stderr is not a terminal."""
        return not sys.stderr.isatty()

    def finished(self) -> int:
        return sum(self.run_dir.done_path(n).is_file() for n in self.names)

    def line(self, finished: int, now: float) -> str:
        total, elapsed = len(self.names), now - self.start
        rate = (finished - self.at_start) / elapsed if elapsed > 0 else 0.0
        eta = _clock((total - finished) / rate) if rate > 0 else "unknown"
        return (f"progress: {finished}/{total} pairs finished ({100 * finished / max(total, 1):.0f}%), "
                f"{_clock(elapsed)} elapsed, ETA {eta}")

    def report(self, final: bool = False) -> None:
        """Log the line when it is due (every ``run.progress_every_s``, if the count changed); ``final``: now,
        unless the last line already said the same."""
        if not self.enabled():
            return
        now = time.monotonic()
        if not final and self.last_time is not None and now - self.last_time < self.every:
            return
        count = self.finished()
        if count != self.last_count or (final and self.last_time is None):
            log.info("%s", self.line(count, now))
            self.last_time, self.last_count = now, count


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
    # Share the process's cores between CPU workers instead of oversubscribing them.
    if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
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
    units = plan_units(list(zip(pairs, names, strict=True)), run_dir, cfg.data.pairs_per_step)[world.rank :: world.size]
    device = resolve_device(cfg.trainer.accelerator, world.local_rank)
    # Bars only on a terminal; in a log the job-wide line speaks instead (the parent's, or rank 0's).
    bar = tqdm(total=sum(map(len, units)), desc=f"worker {world.rank}", position=world.rank, unit="pair",
               dynamic_ncols=True, disable=not cfg.trainer.enable_progress_bar or JobProgress.enabled())
    progress = JobProgress(run_dir, names, cfg.run.progress_every_s) if world.rank == 0 and not spawned else None
    # Job curves are indexed by pairs finished in the whole run, so a resumed worker continues past every step
    # an earlier attempt logged instead of writing the same steps again.
    kind = logger_kind(cfg.run)
    job_logger = make_logger(kind, log_root(run_dir.root, kind), f"worker{world.rank}") if kind else None
    curves = _JobCurves(job_logger, finished) if job_logger is not None else None
    with preemption_signals(), contextlib.closing(bar):
        try:
            backbone = shared_backbone(cfg.model, device) if units else None
            for unit in units:
                if PREEMPTION.signal is not None:  # stopped between batches: nothing in flight to save
                    _requeue_once(run_dir)
                    return EXIT_PREEMPTED
                # Pairs of the share that another attempt finished meanwhile are not redone.
                batch = [(p, n) for p, n in unit if run_dir.record(n) is None]
                if not batch:
                    continue
                try:
                    records = optimize_batch(cfg, batch, run_dir, backbone, device)
                except Preempted as err:
                    log.warning("worker %d preempted (%s): %s checkpointed; rerun the same command to resume.",
                                world.rank, err, ", ".join(p.id for p, _ in batch))
                    _requeue_once(run_dir)
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


class _JobCurves:
    """One worker's job-level curves, through the run's logger: pairs done, seconds per pair and the running
    mIoU of the pairs it finished, each at step = pairs finished in the whole run."""

    def __init__(self, logger: Any, finished: int):
        self.logger = logger
        self.done, self.ious = finished, []

    def add(self, records: list[dict]) -> None:
        for record in records:
            self.done += 1
            if record.get("iou") is not None:
                self.ious.append(record["iou"])
            metrics = {"job/pairs_done": self.done, "job/seconds_per_pair": record.get("seconds", 0.0)}
            if self.ious:
                metrics["job/running_miou"] = float(np.mean(self.ious))
            self.logger.log_metrics(metrics, step=self.done)
        self.logger.save()

    def close(self) -> None:
        self.logger.finalize("success")


def plan_units(todo: list[tuple[Pair, str]], run_dir: RunDir, pairs_per_step: int) -> list[list[tuple[Pair, str]]]:
    """Split the run's unfinished pairs into batches ("units") that the workers share round-robin.

    A batch interrupted with a checkpoint is kept whole (whatever ``pairs_per_step`` is now), so it resumes
    from its checkpoint; the other unfinished pairs are batched in dataset order. Every worker computes the
    same plan from the run folder, so the remaining pairs are spread evenly over however many workers the
    rerun has, whoever finished what before.
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
    units += [rest[i : i + pairs_per_step] for i in range(0, len(rest), pairs_per_step)]
    return sorted(units, key=lambda unit: index[unit[0][1]])


def _checkpointed_batches(run_dir: RunDir) -> list[list[str]]:
    """The member names of every batch (or lone pair) with a checkpoint to resume from."""
    found = []
    for members_file in sorted((run_dir.root / "batches").glob(f"*/{BATCH_MEMBERS}")):
        if (members_file.parent / "ckpt" / "last.ckpt").is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                found.append([str(n) for n in json.loads(members_file.read_text())])
    found += [[ckpt.parents[1].name] for ckpt in sorted((run_dir.root / "pairs").glob("*/ckpt/last.ckpt"))]
    return found


def _requeue_once(run_dir: RunDir) -> None:
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
    subprocess.run(["scontrol", "requeue", job], check=False)


def _valid_checkpoint(path: Path) -> Path | None:
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


# The file in a batch's folder that lists its members, so a rerun can rebuild the batch around its checkpoint.
BATCH_MEMBERS = "members.json"


def _batch_dir(run_dir: RunDir, names: list[str]) -> Path:
    """Checkpoint folder of a batch: a lone pair's own folder, or one named by the batch's members (a resumed
    worker rebuilds the same unfinished batch, since finished batches drop out of its list whole)."""
    if len(names) == 1:
        return run_dir.ckpt_dir(names[0])
    digest = hashlib.sha1("\0".join(names).encode()).hexdigest()[:10]
    return run_dir.root / "batches" / f"{names[0]}+{len(names) - 1}-{digest}" / "ckpt"


def _finish(run_dir: RunDir, name: str, record: dict) -> dict:
    """Persist a finished pair: its done record first (the truth on rerun), then its results line."""
    files.write_text(json.dumps(record), run_dir.done_path(name))
    files.append_line(json.dumps(record), run_dir.results)
    return record


def optimize_batch(cfg: TrainConfig, batch: list[tuple[Pair, str]], run_dir: RunDir, backbone, device) -> list[dict]:
    """Optimize a batch of pairs (resuming its checkpoint), write outputs and done records; returns records.

    A pair whose image or target cannot be used is recorded as failed and the others go on.
    """
    opts = cfg.image_options
    records: list[dict] = []
    ready = []  # (pair, name, image, canvas, placement, base record)
    for pair, name in batch:
        record: dict[str, Any] = {"id": pair.id, "prompt": pair.prompt, "name": name, **({"meta": pair.meta}
                                                                                       if pair.meta else {})}
        try:
            img = (images.load_image(pair.path, tuple(opts.flatten_background), opts.max_pixels)
                   if pair.path is not None else pair.load_image())
            canvas, placement = images.fit_square(img, cfg.optimization.mask.size, opts.fit)
        except PeekabooError as err:
            log.warning("pair %s failed: %s", pair.id, err)
            records.append(_finish(run_dir, name, {**record, "status": "failed: input", "error": str(err)}))
            continue
        ready.append((pair, name, img, canvas, placement, record))
    if not ready:
        return records
    # Out of accelerator memory: the batch is split in halves and retried (the masks are the same).
    return records + split_on_oom(ready, lambda part: _fit_and_write(cfg, part, run_dir, backbone, device))


def _fit_and_write(cfg: TrainConfig, ready: list[tuple], run_dir: RunDir, backbone, device) -> list[dict]:
    """Optimize the loaded pairs ``ready`` as one batch (resuming its checkpoint) and write their outputs and
    done records; returns the records."""
    records: list[dict] = []
    names = [r[1] for r in ready]
    ckpt_dir = _batch_dir(run_dir, names)
    if len(names) > 1:
        files.write_text(json.dumps(names), ckpt_dir.parent / BATCH_MEMBERS)
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.run.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True, save_on_train_epoch_end=False),
        SaveOnPreemption(ckpt_dir / "last.ckpt"),
    ]
    failure = ""
    try:
        results = optimize_pairs(
            torch.stack([r[3] for r in ready]), [r[0].prompt for r in ready], [r[0].id for r in ready],
            cfg.optimization, cfg.trainer, backbone,
            tb_dir=log_root(run_dir.root, logger_kind(cfg.run)), callbacks=callbacks,
            ckpt_path=_valid_checkpoint(ckpt_dir / "last.ckpt"), enable_progress_bar=False,
            devices=trainer_devices(device), run_name=names[0] if len(names) == 1 else ckpt_dir.parent.name,
            pair_run_names=names, logger_kind=logger_kind(cfg.run) or "tensorboard",
        )
    except NonFiniteError as err:
        results = [None] * len(ready)
        failure = str(err)
    except torch.cuda.OutOfMemoryError:
        if len(names) > 1 and not (ckpt_dir / "last.ckpt").is_file():  # nothing to resume: the halves start anew
            shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
        raise
    except OSError as err:  # a checkpoint or TensorBoard write inside the fit (full disk, unwritable folder)
        raise files.output_error(err.filename or run_dir.root, err) from None
    for (pair, name, img, _, placement, record), result in zip(ready, results, strict=True):
        if result is None or result.failed:
            error = failure if result is None else (f"non-finite loss or mask in pair {pair.id}; "
                                                    f"{non_finite_hint(cfg.optimization)}")
            records.append(_finish(run_dir, name, {**record, "status": "failed: non-finite", "error": error}))
            continue
        records.append(_finish(run_dir, name, {**record, **_write_pair(cfg, run_dir, name, img, placement,
                                                                        result, pair)}))
    if not cfg.run.keep_checkpoints:
        shutil.rmtree(ckpt_dir.parent if len(names) > 1 else ckpt_dir, ignore_errors=True)
    return records


def _write_pair(cfg: TrainConfig, run_dir: RunDir, name: str, img: Image.Image, placement: images.Placement,
                result: PairResult, pair: Pair) -> dict[str, Any]:
    """Write one pair's mask, alpha (and overlay) at the original size; returns its record fields."""
    final = images.finalize_mask(result.alpha, placement, cfg.optimization.threshold)
    kinds = RUN_FILES if cfg.run.save_overlays else tuple(k for k in RUN_FILES if k != "overlay")
    paths = files.write_pair_files(img, final, {kind: run_dir.root / f"{kind}s" / f"{name}.png" for kind in kinds})
    fields: dict[str, Any] = {
        "status": "done", "outputs": {k: str(v.relative_to(run_dir.root)) for k, v in paths.items()},
        "steps": result.steps, "seconds": round(result.seconds, 3), "losses": result.losses, "curve": result.curve,
        "area": final.area,
    }
    try:
        target = pair.load_target()
    except PeekabooError as err:
        log.warning("pair %s: ground truth unusable (%s); not scored.", pair.id, err)
        target = None
    if target is not None:
        fields.update(pair_scores(final.mask, target))
    return fields


def finalize(run_dir: Path, pairs: list[Pair], names: list[str]) -> dict[str, Any]:
    """Rewrite ``results.jsonl`` (exactly one line per finished pair, in dataset order) and ``summary.json``."""
    rd = RunDir(run_dir)
    records = [r for n in names if (r := rd.record(n)) is not None]
    summary = write_results(rd, records, len(pairs))
    try:
        report.write_report(run_dir)
    except Exception as err:  # the report is a view of the results: it must never cost the run them
        log.warning("could not write %s (%s: %s); the results are intact, and python -m peekaboo.runs.evaluate %s "
                    "writes it again.", run_dir / report.REPORT_FILE, type(err).__name__, err, run_dir)
    log.info("%s: %d/%d pairs finished, mIoU %s", run_dir, len(records), len(pairs), miou_text(summary))
    return summary


def miou_text(summary: dict[str, Any]) -> str:
    """A run summary's mIoU for people: three decimals, or why there is none."""
    miou = summary.get("miou")
    return "n/a (no ground truth)" if miou is None else f"{miou:.3f}"


def write_results(rd: RunDir, records: list[dict], n_pairs: int) -> dict[str, Any]:
    """Atomically write ``results.jsonl`` (one line per record) and ``summary.json``; returns the summary."""
    with files.atomic_path(rd.results) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(records)
    summary["pairs"] = n_pairs
    summary["remaining"] = n_pairs - len(records)
    files.write_text(json.dumps(summary, indent=2) + "\n", rd.summary)
    return summary
