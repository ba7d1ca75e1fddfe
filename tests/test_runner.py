"""Dataset runs: sharding over workers, resume after kill -9 / SIGTERM, corrupt checkpoints, TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_support import REPO

from peekaboo.app.cli import train_main
from peekaboo.runs import evaluate

PAIRS = 4

# Dataset runs end to end, most in a real train.py process (signals, kill -9, several workers): the slow tier.
pytestmark = pytest.mark.slow


def _args(model, root, name, *extra, steps=6, pairs=PAIRS):
    # One pair per module unless a test says otherwise: the layout checks below are about single pairs.
    return [f"model.pretrained={model}", f"run.root={root}", f"run.name={name}", "data=shapes",
            f"data.num_pairs={pairs}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
            "optimization.mask.size=16", "trainer.enable_progress_bar=false", "data.pairs_per_step=1", *extra]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of one TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          cwd=REPO, **kw)


def _masks(run: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((run / "masks").glob("*.png"))}


def _results(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted single-worker run of PAIRS pairs, 30 steps each."""
    root = tmp_path_factory.mktemp("ref")
    proc = _train(*_args(tiny_model, root, "ref", steps=30))
    assert proc.returncode == 0, proc.stderr
    return root / "ref"


def test_single_worker_outputs(reference):
    results = _results(reference)
    assert len(results) == PAIRS and len({r["id"] for r in results}) == PAIRS
    assert all(r["status"] == "done" and r["steps"] == 30 and 0 <= r["iou"] <= 1 for r in results)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["done"] == PAIRS and summary["failed"] == 0 and summary["remaining"] == 0
    assert summary["miou"] == pytest.approx(np.mean([r["iou"] for r in results]))
    assert (reference / "config.yaml").is_file() and (reference / "cmd.txt").is_file()
    assert not list(reference.glob("pairs/*/ckpt"))  # checkpoints are deleted once a pair is done
    for r in results:
        assert (reference / r["outputs"]["mask"]).is_file() and (reference / r["outputs"]["overlay"]).is_file()


def test_two_workers_match_one(tiny_model, reference, tmp_path):
    proc = _train(*_args(tiny_model, tmp_path, "two", "trainer.devices=2", "trainer.enable_progress_bar=true",
                         steps=30))
    assert proc.returncode == 0, proc.stderr
    # The log (not a terminal) gets the parent's job-wide line, not one bar per worker.
    assert f"progress: {PAIRS}/{PAIRS} pairs finished (100%)" in proc.stderr and "pair/s" not in proc.stderr
    run = tmp_path / "two"
    assert sorted(r["id"] for r in _results(run)) == sorted(r["id"] for r in _results(reference))
    ref, two = _masks(reference), _masks(run)
    assert ref.keys() == two.keys()
    assert all(np.array_equal(ref[k], two[k]) for k in ref)
    # Every worker writes its job curves, and every pair its own run with the named scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for worker in ("worker0", "worker1"):
        acc = EventAccumulator(str(run / "tb" / worker))
        acc.Reload()
        assert {"job/pairs_done", "job/running_miou", "job/seconds_per_pair"} <= set(acc.Tags()["scalars"])
    for r in _results(run):
        acc = EventAccumulator(str(run / "tb" / r["name"]))
        acc.Reload()
        assert {"loss/dream", "loss/alpha", "loss/total", "mask/area"} <= set(acc.Tags()["scalars"])
        assert "mask/alpha" in acc.Tags()["images"]


def test_batched_run_matches_unbatched(tiny_model, reference, tmp_path):
    proc = _train(*_args(tiny_model, tmp_path, "b4", "data.pairs_per_step=2", steps=30))
    assert proc.returncode == 0, proc.stderr
    ref, batched = _masks(reference), _masks(tmp_path / "b4")
    assert ref.keys() == batched.keys()
    for k in ref:
        a, b = ref[k] > 127, batched[k] > 127
        union = (a | b).sum()
        assert union == 0 or (a & b).sum() / union >= 0.99
    # TensorBoard: each pair of a batch has its own run, with the curves it has when run alone: the same
    # logged steps, the same timesteps (its own random stream), and the same losses up to float noise.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in _results(reference):
        alone, in_batch = _scalars(reference / "tb" / r["name"]), _scalars(tmp_path / "b4" / "tb" / r["name"])
        assert set(alone) - {"epoch"} == set(in_batch) >= {"loss/dream", "loss/total", "mask/area", "guidance/t"}
        assert [s for s, _ in in_batch["loss/total"]] == [s for s, _ in alone["loss/total"]] == [9, 19, 29]
        assert in_batch["guidance/t"] == alone["guidance/t"]
        assert [v for _, v in in_batch["loss/total"]] == pytest.approx([v for _, v in alone["loss/total"]], rel=0.05)
        acc = EventAccumulator(str(tmp_path / "b4" / "tb" / r["name"]))
        acc.Reload()
        assert acc.Images("mask/alpha")[-1].step == 30
    # ... and each batch a run of its pairs' means.
    batch_runs = [d for d in (tmp_path / "b4" / "tb").iterdir() if "+" in d.name]
    assert len(batch_runs) == 2 and all("loss/total" in _scalars(d) for d in batch_runs)


def test_launcher_rank_does_not_silence_logging(tiny_model, tmp_path):
    # torchrun / SLURM set RANK for every process; Lightning reads it and mutes loggers off rank 0, but here
    # each worker is its own job, so worker 1 must still write its pairs' curves.
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    proc = _train(*_args(tiny_model, tmp_path, "r1", "trainer.log_every_n_steps=2"), env=env)
    assert proc.returncode == 0, proc.stderr
    results = _results(tmp_path / "r1")
    assert len(results) == PAIRS // 2  # worker 1 of 2: every second pair
    for r in results:
        assert "loss/total" in _scalars(tmp_path / "r1" / "tb" / r["name"])


def _wait_for(predicate, proc, timeout=120.0, poll=0.05):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _start(*args):
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _in_flight(run: Path):
    """At least one pair finished and another one's fit has begun (its TensorBoard run logged its hparams)."""
    def predicate() -> bool:
        done = {p.parent.name for p in run.glob("pairs/*/done.json")}
        started = {p.parent.name for p in run.glob("tb/*/hparams.yaml")} - {"worker0"}
        return (run / "results.jsonl").is_file() and bool(started - done)
    return predicate


def _half_way(run: Path):
    """At least one pair finished and another has a checkpoint."""
    return lambda: (run / "results.jsonl").is_file() and bool(list(run.glob("pairs/*/ckpt/last.ckpt")))


def test_kill9_then_rerun_finishes_each_pair_once_with_identical_masks(tiny_model, reference, tmp_path):
    args = _args(tiny_model, tmp_path, "k", "run.checkpoint_every_n_steps=3", steps=30)
    proc = _start(*args)
    assert _wait_for(_half_way(tmp_path / "k"), proc), "the run never reached a checkpoint"
    proc.kill()
    proc.wait()
    assert 1 <= len(_results(tmp_path / "k")) < PAIRS
    rerun = _train(*args)
    assert rerun.returncode == 0, rerun.stderr
    results = _results(tmp_path / "k")
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in _results(reference))
    ref, resumed = _masks(reference), _masks(tmp_path / "k")
    assert all(np.array_equal(ref[k], resumed[k]) for k in ref)


def test_sigterm_checkpoints_and_exits_non_zero(tiny_model, reference, tmp_path):
    args = _args(tiny_model, tmp_path, "t", "run.checkpoint_every_n_steps=1000", steps=30)
    proc = _start(*args)
    # A signal between pairs rightly saves nothing (nothing is in flight): wait until a pair's fit has begun.
    assert _wait_for(_in_flight(tmp_path / "t"), proc, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    ckpts = list((tmp_path / "t").glob("pairs/*/ckpt/last.ckpt"))
    assert ckpts, err  # saved on the signal, although no periodic checkpoint was due
    rerun = _train(*args)
    assert rerun.returncode == 0, rerun.stderr
    ref, resumed = _masks(reference), _masks(tmp_path / "t")
    assert all(np.array_equal(ref[k], resumed[k]) for k in ref)


def test_corrupt_checkpoint_restarts_that_pair(tiny_model, reference, tmp_path):
    run = tmp_path / "c"
    first = _results(reference)[0]["name"]
    ckpt = run / "pairs" / first / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated checkpoint")
    proc = _train(*_args(tiny_model, tmp_path, "c", steps=30))
    assert proc.returncode == 0, proc.stderr
    assert "unreadable" in proc.stderr and "restarting that pair from scratch" in proc.stderr
    ref, rerun = _masks(reference), _masks(run)
    assert all(np.array_equal(ref[k], rerun[k]) for k in ref)


def test_changed_settings_refuse_to_mix_into_a_run(tiny_model, reference, capsys):
    assert train_main(_args(tiny_model, reference.parent, "ref", "optimization.loss.gravity=0.5", steps=30)) == 2
    assert "different optimization settings" in capsys.readouterr().err


def test_evaluate_rescores_from_saved_masks(reference, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    assert evaluate.main([str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["miou"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["miou"])


def test_manifest_with_a_missing_image_finishes_the_others(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(3):
        if i != 1:  # image 1 is listed but missing
            arr = np.full((20, 24, 3), 60 * i, np.uint8)
            arr[5:15, 5:15] = (220, 30, 30)
            Image.fromarray(arr).save(data / f"img{i}.png")
        mask = np.zeros((20, 24), np.uint8)
        mask[5:15, 5:15] = 255
        Image.fromarray(mask).save(data / f"mask{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": "a red square", "mask": f"mask{i}.png", "id": f"p{i}"})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_main([f"model.pretrained={tiny_model}", f"run.root={tmp_path}", "run.name=m", "data=manifest",
                       f"data.manifest={data / 'pairs.jsonl'}", "trainer.max_steps=3", "trainer.accelerator=cpu",
                       "optimization.mask.size=16", "trainer.enable_progress_bar=false"]) == 0
    results = {r["id"]: r for r in _results(tmp_path / "m")}
    assert results["p0"]["status"] == results["p2"]["status"] == "done"
    assert results["p0"]["iou"] is not None
    assert results["p1"]["status"] == "failed: input" and "img1.png" in results["p1"]["error"]
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["done"] == 2 and summary["failed"] == 1
    assert Image.open(tmp_path / "m" / "masks" / "p0.png").size == (24, 20)
