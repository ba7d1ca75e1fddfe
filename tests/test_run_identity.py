"""A run's identity includes the weights it used: a run started with one model never resumes with another."""

from __future__ import annotations

import shutil

import pytest
from tests_support import REPO_CONFIGS

from peekaboo.app.cli import train_main
from peekaboo.diffusion.identity import model_fingerprint
from peekaboo.runs.layout import WEIGHTS_FILE

FAST = ["data=shapes", "data.num_pairs=1", "trainer.max_steps=1", "optimization.mask.size=16",
        "optimization.mask.init=constant", "run.logger=none", "data.pairs_per_step=1"]


def test_a_run_started_with_one_model_refuses_to_resume_with_other_weights(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    argv = [*FAST, f"model.pretrained={model}", f"run.root={tmp_path / 'runs'}", "run.name=r"]
    assert train_main(argv, REPO_CONFIGS) == 0
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / WEIGHTS_FILE).read_text().strip() == model_fingerprint(str(model))
    assert train_main(argv, REPO_CONFIGS) == 0  # same weights: resumes (here: finds the pair done)

    # Retrained weights at the same path (as `bundled` names other weights after a retraining).
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    model_fingerprint.cache_clear()
    capsys.readouterr()
    assert train_main(argv, REPO_CONFIGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was started with other model weights" in err[0] and "run.name" in err[0]


@pytest.mark.parametrize(("pretrained", "revision", "expected"), [
    ("org/some-model", None, "org/some-model"), ("org/some-model", "v1.0", "org/some-model@v1.0")])
def test_a_hub_id_is_identified_by_its_name_and_revision(pretrained, revision, expected):
    assert model_fingerprint(pretrained, revision) == expected
