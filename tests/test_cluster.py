"""What a cluster user hits: preemption signals anywhere in a step, SLURM launch layouts, requeueing once per job,
Ctrl-C, and resuming with faster settings over a different number of workers.

Everything runs in-process on the tiny model (``train_main`` returns the exit status), so each test costs a few
fits of a few steps.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from tests_support import FAST

from peekaboo.app.cli import train_main
from peekaboo.config import TrainerConfig
from peekaboo.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from peekaboo.optim import callbacks, engine
from peekaboo.optim.loggers import make_logger
from peekaboo.runs import layout, outputs, planning, workers
from peekaboo.runs.progress import JobProgress

STEPS = 6
PAIRS = 6


def _args(model: Path, root: Path, name: str, *extra: str, pairs: int = PAIRS) -> list[str]:
    return [*FAST, f"model.pretrained={model}", f"run.root={root}", f"run.name={name}", "data=shapes",
            f"data.num_pairs={pairs}", f"trainer.max_steps={STEPS}", "data.pairs_per_step=1",
            "run.checkpoint_every_n_steps=1000", *extra]


def _masks(run: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((run / "masks").glob("*.png"))}


def _done(run: Path) -> list[str]:
    return sorted(p.parent.name for p in run.glob("pairs/*/done.json"))


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted run of the pairs the tests below interrupt."""
    root = tmp_path_factory.mktemp("cluster-ref")
    assert train_main(_args(tiny_model, root, "ref")) == 0
    return root / "ref"


def _signal_at_last_step(monkeypatch, cls: type, method: str) -> None:
    """Make ``cls.method(trainer, ...)`` send this process SIGTERM inside the call, at the last step of the second
    pair: after that step's own preemption check, so only Lightning's end-of-epoch check sees it."""
    original = getattr(cls, method)
    last_steps = {"seen": 0}

    def wrapped(self, trainer, *args, **kwargs):
        if trainer.global_step == STEPS:
            last_steps["seen"] += 1
            if last_steps["seen"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, trainer, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint save", "callback"])
def test_sigterm_anywhere_in_the_last_step_saves_exits_143_and_resumes(tiny_model, reference, tmp_path, monkeypatch,
                                                                       where):
    # Lightning stops a fit on SIGTERM by raising its SystemExit subclass at the epoch's end, which used to
    # end the whole process with status 0 and nothing saved.
    if where == "checkpoint save":
        _signal_at_last_step(monkeypatch, ModelCheckpoint, "_save_checkpoint")
        extra = [f"run.checkpoint_every_n_steps={STEPS}", "run.logger=none"]
    else:
        _signal_at_last_step(monkeypatch, callbacks.MaskImages, "on_train_batch_end")
        extra = []
    args = [*_args(tiny_model, tmp_path, "t"), *extra]
    assert train_main(args) == EXIT_PREEMPTED
    run = tmp_path / "t"
    assert len(_done(run)) == 1  # the first pair finished; the second was stopped at its last step
    assert list(run.glob("pairs/*/ckpt/last.ckpt")), "the stopped pair was not checkpointed"
    monkeypatch.undo()
    assert train_main(args) == 0
    ref, resumed = _masks(reference), _masks(run)
    assert ref.keys() == resumed.keys() and all(np.array_equal(ref[k], resumed[k]) for k in ref)


@pytest.mark.slow
def test_sigterm_between_pairs_exits_143_with_nothing_to_save_and_resumes(tiny_model, reference, tmp_path,
                                                                          monkeypatch):
    original = workers.optimize_batch

    def then_signal(*args, **kwargs):  # the signal lands after the first pair's record, before the next fit
        records = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return records

    monkeypatch.setattr(workers, "optimize_batch", then_signal)
    args = _args(tiny_model, tmp_path, "b")
    assert train_main(args) == EXIT_PREEMPTED
    run = tmp_path / "b"
    assert len(_done(run)) == 1 and not list(run.glob("pairs/*/ckpt/last.ckpt"))  # no fit was in flight
    monkeypatch.undo()
    assert train_main(args) == 0
    ref, resumed = _masks(reference), _masks(run)
    assert ref.keys() == resumed.keys() and all(np.array_equal(ref[k], resumed[k]) for k in ref)


@pytest.mark.slow
def test_ctrl_c_during_a_fit_exits_130_and_keeps_finished_pairs(tiny_model, reference, tmp_path, monkeypatch,
                                                                capsys):
    from peekaboo.optim.module import PeekabooModule

    original = PeekabooModule.training_step
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEPS + 2:  # two steps into the second pair
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeekabooModule, "training_step", interrupting)
    args = _args(tiny_model, tmp_path, "c")
    assert train_main(args) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    run = tmp_path / "c"
    first = _done(run)
    assert len(first) == 1
    kept = (run / "masks" / f"{first[0]}.png").read_bytes()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    monkeypatch.undo()
    assert train_main(args) == 0
    assert (run / "masks" / f"{first[0]}.png").read_bytes() == kept
    assert _masks(run).keys() == _masks(reference).keys()


def test_srun_ntasks_without_ntasks_per_node_builds_trainers(monkeypatch):
    # `srun --ntasks=2` alone: Lightning's SLURM environment refuses this layout, but each pair's Trainer drives
    # one device of its own process and must not read the job's layout at all.
    for key, value in {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_JOB_NAME": "peekaboo", "SLURM_JOB_ID": "42", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    trainer = engine.build_trainer(TrainerConfig(accelerator="cpu", max_steps=1))
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "LightningEnvironment"


def test_only_one_preempted_worker_requeues_the_job(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(workers.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(workers.subprocess, "run",
                        lambda cmd, **kwargs: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    rd = outputs.RunDir(tmp_path)
    for _ in range(3):  # three workers of one job, all preempted
        workers.requeue_once(rd)
    assert calls == [["scontrol", "requeue", "77"]]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job, preempted again, requeues again
    workers.requeue_once(rd)
    assert len(calls) == 2


def test_a_failed_requeue_is_a_warning_naming_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setattr(workers.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(workers.subprocess, "run",
                        lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 1, "", "Invalid job id\n"))
    with caplog.at_level(logging.WARNING):
        workers.requeue_once(outputs.RunDir(tmp_path))
    assert "scontrol requeue 78 failed (Invalid job id); resubmit the job" in caplog.text


def test_a_worker_killed_by_a_signal_is_named_with_the_fix():
    lines = workers.killed_workers([0, -9, 3, None, -15])
    assert len(lines) == 2
    assert lines[0].startswith("worker 1 was killed by SIGKILL (the out-of-memory killer's signal); if memory ran "
                               "out, lower data.pairs_per_step or trainer.devices, then rerun the same command")
    assert lines[1].startswith("worker 4 was killed by SIGTERM; ")


@pytest.mark.slow
def test_resume_accepts_speed_only_changes_and_rebalances(tiny_model, reference, tmp_path, monkeypatch):
    run = tmp_path / "r"
    args = _args(tiny_model, tmp_path, "r")
    # First attempt: worker 0 of a 2-process job (torchrun's environment) finishes its half, pairs 0, 2, 4.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert train_main(args) == 0
    assert len(_done(run)) == 3
    # Rerun with faster settings: the 3 remaining pairs, in batches of 2, are spread over both workers (worker 1
    # takes the second batch) instead of all falling to worker 1, whose share they were.
    faster = [*args, "data.pairs_per_step=2", "model.attention=classic", "model.channels_last=true"]
    monkeypatch.setenv("RANK", "1")
    assert train_main(faster) == 0
    assert len(_done(run)) == 4
    monkeypatch.setenv("RANK", "0")
    assert train_main(faster) == 0
    ref, resumed = _masks(reference), _masks(run)
    assert ref.keys() == resumed.keys()
    for k in ref:  # batching and kernels change float rounding only
        a, b = ref[k] > 127, resumed[k] > 127
        union = (a | b).sum()
        assert union == 0 or (a & b).sum() / union >= 0.99
    # A change that alters results is still refused.
    assert train_main([*args, "optimization.loss.gravity=0.5"]) == 2


def test_plan_keeps_an_interrupted_batch_whole(tmp_path):
    from peekaboo.data import Pair

    rd = outputs.RunDir(tmp_path)
    pairs = [(Pair(f"p{i}", "a red circle", load_image=None, load_target=lambda: None), f"p{i}") for i in range(5)]
    batch = tmp_path / "batches" / "p1+1-abc"
    (batch / "ckpt").mkdir(parents=True)
    (batch / "ckpt" / "last.ckpt").write_bytes(b"x")
    (batch / layout.BATCH_MEMBERS).write_text(json.dumps(["p1", "p3"]))
    units = planning.plan_units(pairs, rd, pairs_per_step=4)
    assert [[n for _, n in u] for u in units] == [["p0", "p2", "p4"], ["p1", "p3"]]


def test_worker_threads_follow_cpu_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert workers.usable_cpus() == 3


def test_resumed_tensorboard_run_has_no_duplicate_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make_logger("tensorboard", tmp_path, "pair")
    for step in range(10):
        first.log_metrics({"loss": float(step)}, step)
    first.finalize("success")
    # Resumed from a checkpoint at step 5: steps 5..9 are logged again and must replace the first ones.
    resumed = make_logger("tensorboard", tmp_path, "pair", resume_step=5)
    for step in range(5, 10):
        resumed.log_metrics({"loss": 100.0 + step}, step)
    resumed.finalize("success")
    acc = EventAccumulator(str(tmp_path / "pair"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(10))
    assert [e.value for e in events[5:]] == [100.0 + s for s in range(5, 10)]


def test_the_preemption_save_runs_after_the_steps_own_callbacks(tmp_path):
    # Saved before the early stop, early choice and loss curves had seen the step, the checkpoint would resume a
    # pair one update behind an uninterrupted run of it.
    import lightning as L

    from peekaboo.optim.preemption import SaveOnPreemption

    save, curves = SaveOnPreemption(tmp_path / "last.ckpt"), callbacks.LossCurves(4)
    trainer = L.Trainer(callbacks=[save, curves], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    assert trainer.callbacks.index(save) > trainer.callbacks.index(curves)


def test_a_checkpoint_callback_of_any_class_name_enables_checkpointing(tiny_backbone, tmp_path):
    # Detected by type: a renamed subclass used to leave enable_checkpointing off, which Lightning refuses.
    from peekaboo.config import OptimizationConfig

    class PairCheckpoint(ModelCheckpoint):
        pass

    opt = OptimizationConfig()
    opt.mask.kind, opt.mask.size = "raster", 16
    [result] = engine.optimize_pairs(torch.rand(1, 3, 16, 16), ["a red circle"], ["p"], opt,
                                     TrainerConfig(accelerator="cpu", max_steps=2, enable_progress_bar=False),
                                     tiny_backbone, callbacks=[PairCheckpoint(dirpath=tmp_path, save_last=True)])
    assert result.steps == 2 and (tmp_path / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_log_gets_one_job_wide_progress_line_not_bars(tiny_model, tmp_path, caplog, capsys):
    args = [*_args(tiny_model, tmp_path, "p", pairs=3), "run.progress_every_s=0", "trainer.enable_progress_bar=true"]
    with caplog.at_level("INFO", logger="peekaboo.runs.progress"):
        assert train_main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert lines[-1].startswith("progress: 3/3 pairs finished (100%)") and "ETA 0:00:00" in lines[-1]
    assert "pair/s" not in capsys.readouterr().err  # stderr is not a terminal here: no tqdm bar


def test_progress_line_counts_every_workers_pairs_and_estimates(tmp_path):
    rd = outputs.RunDir(tmp_path)
    names = [f"p{i}" for i in range(4)]
    progress = JobProgress(rd, names, every_s=0)
    for name in names[:2]:  # finished by other workers since this one started
        rd.done_path(name).parent.mkdir(parents=True)
        rd.done_path(name).write_text("{}")
    line = progress.line(progress.finished(), progress.start + 60.0)
    assert line == "progress: 2/4 pairs finished (50%), 0:01:00 elapsed, ETA 0:01:00"


@pytest.mark.slow
def test_a_batch_out_of_accelerator_memory_is_halved_with_the_same_masks(tiny_model, reference, tmp_path,
                                                                          monkeypatch, caplog):
    from peekaboo.diffusion.backbone import Backbone

    original = Backbone.predict_eps  # every UNet call of the dream loss

    def small_gpu(self, noisy, *args, **kwargs):  # holds at most 2 pairs per step
        if noisy[0].shape[0] > 2:  # noisy: per row group (B, C, h, w)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, noisy, *args, **kwargs)

    monkeypatch.setattr(Backbone, "predict_eps", small_gpu)
    with caplog.at_level("WARNING"):
        assert train_main([*_args(tiny_model, tmp_path, "oom"), "data.pairs_per_step=6"]) == 0
    assert "out of accelerator memory for 6 pairs in one batch; retrying as 3 + 3" in caplog.text
    assert "out of accelerator memory for 3 pairs in one batch; retrying as 1 + 2" in caplog.text
    ref, split = _masks(reference), _masks(tmp_path / "oom")
    assert ref.keys() == split.keys()
    for k in ref:  # batching changes float rounding only
        a, b = ref[k] > 127, split[k] > 127
        union = (a | b).sum()
        assert union == 0 or (a & b).sum() / union >= 0.99
    assert not list((tmp_path / "oom").glob("batches/*")), "the batches that ran out of memory left folders"
