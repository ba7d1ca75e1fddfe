"""On a real CUDA device (skipped without one, ``tests/conftest.py``): what ``tests/test_gpu_faults.py`` simulates on
the CPU, where the device adds something: memory that a retry gets back, a checkpoint loaded onto the CPU, the
device the final mask is rendered on, float16 overflow, and the masks of deterministic kernels.

Run them with ``pytest -m gpu tests/test_gpu.py`` on a machine with a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests_support import MODULE_SIZE
from tests_support import small_optimization_config as _cfg

from peekaboo.config import ModelConfig, TrainerConfig
from peekaboo.diffusion.loading import load_backbone, shared_backbone
from peekaboo.optim.engine import optimize_pair, optimize_pairs, split_on_oom
from peekaboo.optim.module import PeekabooModule

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
SIZE = MODULE_SIZE
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# What README's GPU section promises with trainer.deterministic=true: a resumed pair, and a pair in a batch, get
# the mask of an uninterrupted pair alone up to float rounding, at most this far apart in alpha, and with binary
# masks at this IoU or more.
ALPHA_TOLERANCE = 1e-2
MIN_IOU = 0.99


@pytest.fixture(scope="module")
def backbone(tiny_model):
    """The tiny model on the GPU as runs get it (shared, TF32 as model.tf32 says)."""
    return shared_backbone(ModelConfig(pretrained=str(tiny_model)), DEVICE)


def _trainer(steps: int, deterministic: bool = True) -> TrainerConfig:
    return TrainerConfig(accelerator="gpu", max_steps=steps, enable_progress_bar=False, log_every_n_steps=1,
                         deterministic=deterministic)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def _same_mask(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= ALPHA_TOLERANCE and _iou(a, b) >= MIN_IOU


# -- 1. out-of-memory back-off -----------------------------------------------------------------------------------
def test_a_retry_after_out_of_memory_gets_the_failed_attempts_memory_back():
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    chunk = int(0.6 * free) // 4  # float32 elements filling 60% of the free memory: two never fit
    base = torch.cuda.memory_allocated()
    at_start = []

    def run(items: list[int]) -> list[int]:
        at_start.append(torch.cuda.memory_allocated() - base)
        latents = torch.empty(chunk, device=DEVICE)
        if len(items) > 1:
            graph = {"latents": latents}
            graph["self"] = graph  # a reference cycle, as Lightning's trainer, module and callbacks make
            torch.empty(chunk, device=DEVICE)  # a real torch.cuda.OutOfMemoryError
        return items

    assert split_on_oom([1, 2], run) == [1, 2]  # each half fits once the failed attempt's 60% is back
    assert at_start == [0, 0, 0]


# -- 2. early-stopping state after a resume ----------------------------------------------------------------------
def test_a_resumed_fit_with_early_stopping_finishes_on_the_gpu(backbone, tmp_path):
    cfg = _cfg()
    es = cfg.early_stop
    es.enabled, es.tolerance, es.patience, es.min_steps, es.loss_tolerance = True, 1.0, 4, 0, 1.0
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    whole = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], cfg, _trainer(20), backbone, callbacks=[ckpt])
    state = torch.load(tmp_path / "step=2.ckpt", map_location="cpu", weights_only=True)
    assert any(isinstance(v, dict) and "calm" in v for v in state["callbacks"].values())  # mid-count, on the CPU
    resumed = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], cfg, _trainer(20), backbone,
                             ckpt_path=tmp_path / "step=2.ckpt")
    assert [r.steps for r in resumed] == [r.steps for r in whole] == [5, 5]
    for a, b in zip(resumed, whole, strict=True):
        _same_mask(a.alpha, b.alpha)


# -- 7. float16 overflow -----------------------------------------------------------------------------------------
def test_a_float16_model_that_overflows_on_one_pair_fails_that_pair(tiny_model):
    half = load_backbone(ModelConfig(pretrained=str(tiny_model), dtype="float16"), DEVICE)

    def overflow_pair_0(module, args, out):  # rows [uncond a, uncond b, cond a, cond b]: pair a's overflow
        out = out.clone()
        out[0::2] = out[0::2] * 1e6  # far above float16's 65504: inf, then nan
        return out

    hook = half.unet.conv_in.register_forward_hook(overflow_pair_0)
    try:
        results = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], _cfg(), _trainer(12, False), half)
    finally:
        hook.remove()
    assert results[0].failed and not results[1].failed
    assert torch.isfinite(results[1].alpha).all()


# -- 9. the final mask -------------------------------------------------------------------------------------------
def test_the_final_mask_is_rendered_on_the_gpu(backbone, monkeypatch):
    devices = []
    forward = PeekabooModule.forward

    def spy(self):
        devices.append(next(self.mask.parameters()).device.type)
        return forward(self)

    monkeypatch.setattr(PeekabooModule, "forward", spy)
    result = optimize_pair(_images(1)[0], PROMPTS[0], "a", _cfg("fourier_bilateral"), _trainer(3, False), backbone)
    assert devices and set(devices) == {"cuda"}
    assert result.alpha.device.type == "cpu"


# -- 13. deterministic kernels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["raster", "fourier_bilateral"])
def test_deterministic_masks_after_a_resume_and_in_a_batch(backbone, tmp_path, kind, caplog):
    cfg, images, ids = _cfg(kind), _images(3), ["a", "b", "c"]
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=10)
    with caplog.at_level(logging.WARNING):
        whole = optimize_pair(images[0], PROMPTS[0], ids[0], cfg, _trainer(20), backbone, callbacks=[ckpt])
    # The bilinear resize before the VAE has no deterministic CUDA backward: deterministic runs resize by matrix
    # products instead (ops.resample), so PyTorch has nothing to warn about there.
    assert "upsample_bilinear2d_backward" not in caplog.text
    resumed = optimize_pair(images[0], PROMPTS[0], ids[0], cfg, _trainer(20), backbone,
                            ckpt_path=tmp_path / "step=10.ckpt")
    _same_mask(resumed.alpha, whole.alpha)
    batch = optimize_pairs(images, PROMPTS, ids, cfg, _trainer(20), backbone)
    for i in range(3):
        alone = whole if i == 0 else optimize_pair(images[i], PROMPTS[i], ids[i], cfg, _trainer(20), backbone)
        _same_mask(batch[i].alpha, alone.alpha)
