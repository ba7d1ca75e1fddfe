"""Checkpoints of a mask another version of Peekaboo wrote: refused with one line naming the fix (when the module
loads one, and by a dataset run before any work), while a checkpoint whose mask did not change still resumes."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests_support import FAST, REPO_CONFIGS
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo.app.cli import train_main
from peekaboo.config import MASK_KINDS
from peekaboo.errors import ConfigError
from peekaboo.optim.engine import optimize_pair
from peekaboo.optim.masks import LEGACY_REVISION, MASK_REVISIONS, REVISION_KEY

SIZE = 16
FIX = "rerun with a new run.name, or delete the run's checkpoints"


def _mid_run_checkpoint(kind: str, backbone, folder: Path, image: torch.Tensor):
    """A 4-step run of ``kind`` that checkpoints at step 2: ``(its result, the step-2 checkpoint's path)``."""
    ckpt = ModelCheckpoint(dirpath=folder, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    result = optimize_pair(image, "a red circle", "p", _cfg(kind), _trainer(4), backbone, callbacks=[ckpt])
    return result, folder / "step=2.ckpt"


def _as_revision_1_fourier(state: dict) -> dict:
    """What the last revision-1 version wrote for a Fourier mask: no revision, hidden layers ``Conv (no bias) ->
    BatchNorm -> ReLU`` (BatchNorms at Sequential indices 1, 4, 7; now ``Conv(+bias) -> ReLU -> BatchNorm``, at 2, 5,
    8)."""
    old = {}
    for key, value in state["state_dict"].items():
        parts = key.split(".")
        if key.startswith("mask.mlp.") and parts[2] in ("2", "5", "8"):
            parts[2] = str(int(parts[2]) - 1)  # the BatchNorm's old index
        elif key.startswith("mask.mlp.") and parts[2] in ("0", "3", "6") and parts[3] == "bias":
            continue  # the hidden convolutions had no bias
        old[".".join(parts)] = value
    return {k: v for k, v in state.items() if k != REVISION_KEY} | {"state_dict": old}


def test_a_fourier_checkpoint_of_revision_1_is_refused_with_one_line(tiny_backbone, tmp_path):
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    full, path = _mid_run_checkpoint("fourier", tiny_backbone, tmp_path, image)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state[REVISION_KEY] == MASK_REVISIONS["fourier"] == 2
    old = tmp_path / "old.ckpt"
    torch.save(_as_revision_1_fourier(state), old)
    with pytest.raises(ConfigError) as err:
        optimize_pair(image, "a red circle", "p", _cfg("fourier"), _trainer(4), tiny_backbone, ckpt_path=old)
    message = str(err.value)
    assert "\n" not in message and "pair(s) p" in message and "mask revision 1" in message and FIX in message
    # This version's own checkpoint resumes, to the mask of the uninterrupted run.
    resumed = optimize_pair(image, "a red circle", "p", _cfg("fourier"), _trainer(4), tiny_backbone, ckpt_path=path)
    assert resumed.steps == 4 and torch.allclose(resumed.alpha, full.alpha, atol=1e-6)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_a_checkpoint_without_a_revision_resumes_only_where_the_mask_did_not_change(kind, tiny_backbone, tmp_path):
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    _, path = _mid_run_checkpoint(kind, tiny_backbone, tmp_path, image)
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state[REVISION_KEY]  # written before revisions were recorded
    torch.save(state, path)
    resume = lambda: optimize_pair(image, "a red circle", "p", _cfg(kind), _trainer(4), tiny_backbone,  # noqa: E731
                                   ckpt_path=path)
    if MASK_REVISIONS[kind] == LEGACY_REVISION:  # the plain raster: the same logits, the same mask
        assert resume().steps == 4
    else:
        with pytest.raises(ConfigError, match=FIX):
            resume()


@pytest.mark.slow
def test_a_run_with_an_old_fourier_checkpoint_is_refused_before_any_work(tiny_model, tmp_path, capsys, monkeypatch):
    argv = [f"model.pretrained={tiny_model}", f"run.root={tmp_path}", "run.name=r", "data=shapes", "data.num_pairs=1",
            *FAST, "run.logger=none", "data.pairs_per_step=1", "run.checkpoint_every_n_steps=1",
            "run.keep_checkpoints=true", "optimization.mask.kind=fourier_bilateral", "optimization.mask.init=constant",
            "optimization.mask.fourier.hidden=8", "optimization.mask.fourier.num_features=8"]
    assert train_main(argv, REPO_CONFIGS) == 0, capsys.readouterr().err
    (ckpt,) = (tmp_path / "r" / "pairs").glob("*/ckpt/last.ckpt")
    torch.save(_as_revision_1_fourier(torch.load(ckpt, map_location="cpu", weights_only=True)), ckpt)
    # A finished pair's kept checkpoint is never resumed: the rerun has nothing to refuse (and nothing to do).
    assert train_main(argv, REPO_CONFIGS) == 0, capsys.readouterr().err
    (ckpt.parents[1] / "done.json").unlink()  # now the pair is unfinished, with that checkpoint to resume from

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started work")

    monkeypatch.setattr("peekaboo.runs.runner.run_worker", must_not_run)
    capsys.readouterr()
    assert train_main(argv, REPO_CONFIGS) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"Checkpoint {ckpt}" in lines[0] and "fourier_bilateral mask of mask revision 1" in lines[0]
    assert FIX in lines[0]
