"""Where the mask starts (``optimization.mask.init``): the map-to-logits mapping against hand values, and on the
tiny model the cross-attention start, its independence of the batch, resuming, the unchanged default, and
the config errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests_support import MODULE_SIZE, small_optimization_config
from tests_support import cpu_trainer_config as _trainer

from peekaboo import ops
from peekaboo.config import OptimizationConfig, validate_optimization
from peekaboo.diffusion.attention import cross_attention_map
from peekaboo.errors import ConfigError
from peekaboo.optim import module as module_lib
from peekaboo.optim.engine import optimize_pair
from peekaboo.optim.masks import map_logits
from peekaboo.optim.module import PeekabooModule

SIZE = MODULE_SIZE
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _cfg(kind: str = "raster", init: str = "cross_attention") -> OptimizationConfig:
    cfg = small_optimization_config(kind)
    cfg.mask.init = init
    return cfg


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))  # (n, 3, S, S)


def _expected_logits(backbone, image: torch.Tensor, prompt: str, pair_id: str, cfg: OptimizationConfig):
    """The logits the init should give: the mapping of the pair's map, its noise seeded by (seed, pair id)."""
    gen = torch.Generator().manual_seed(ops.pair_seed(cfg.seed, pair_id))
    heat = cross_attention_map(backbone, image, prompt, generator=gen)  # (S, S)
    return map_logits(heat, cfg.mask.init_scale, cfg.mask.init_threshold)


# -- the mapping ------------------------------------------------------------------------------------------------
def test_map_logits_hand_values():
    m = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    assert map_logits(m, 8.0, 0.5).tolist() == [[-4.0, -2.0], [0.0, 4.0]]
    assert map_logits(m, 2.0, 0.25).tolist() == [[-0.5, 0.0], [0.5, 1.5]]
    # sigmoid(8 * (1 - 0.5)) = 1 / (1 + e^-4) = 0.98201...: the defaults start the map's peak nearly opaque.
    assert torch.sigmoid(map_logits(torch.tensor(1.0), 8.0, 0.5)).item() == pytest.approx(0.982014, abs=1e-6)


# -- the start on the tiny model --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["raster", "raster_bilateral"])
def test_cross_attention_init_starts_from_the_mapped_map(tiny_backbone, kind):
    cfg = _cfg(kind)
    image = _images(1)[0]
    module = PeekabooModule(image, PROMPTS[0], "p", cfg, tiny_backbone)
    assert not module.initialized
    module.on_fit_start()
    expected = _expected_logits(tiny_backbone, image, PROMPTS[0], "p", cfg)
    assert expected.min() == -4 and expected.max() == 4  # a normalized map: its extremes at -+ init_scale/2
    assert torch.equal(module.mask.raster[0, 0], expected)
    assert module.initialized
    if kind == "raster":
        with torch.no_grad():
            alpha = module()[0, 0]  # (S, S)
        assert torch.equal(alpha, torch.sigmoid(expected))
        constant = PeekabooModule(image, PROMPTS[0], "p", _cfg(kind, "constant"), tiny_backbone)
        constant.on_fit_start()
        with torch.no_grad():
            assert not torch.allclose(alpha, constant()[0, 0])  # that one is 0.5 everywhere


def test_each_pair_starts_as_it_would_alone(tiny_backbone):
    cfg = _cfg()
    images, ids = _images(3), ["a", "b", "c"]
    batch = PeekabooModule(images, PROMPTS, ids, cfg, tiny_backbone)
    batch.on_fit_start()
    for i in range(3):
        alone = PeekabooModule(images[i], PROMPTS[i], ids[i], cfg, tiny_backbone)
        alone.on_fit_start()
        assert torch.equal(batch.mask.raster[i], alone.mask.raster[0])
    assert not torch.equal(batch.mask.raster[0], batch.mask.raster[1])  # each pair has its own map


def test_a_resumed_run_keeps_its_checkpointed_mask(tiny_backbone, tmp_path, monkeypatch):
    cfg, image = _cfg(), _images(1)[0]
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    whole = optimize_pair(image, PROMPTS[0], "p", cfg, _trainer(4), tiny_backbone, callbacks=[ckpt])
    state = torch.load(tmp_path / "step=2.ckpt", map_location="cpu", weights_only=True)
    assert set(state["state_dict"]) == {"mask.raster", "failed", "nonfinite_steps", "initialized"}
    assert bool(state["state_dict"]["initialized"])
    # A checkpoint without the flag (written before it existed) is of a run that started: also kept.
    del state["state_dict"]["initialized"]
    torch.save(state, tmp_path / "old.ckpt")
    calls = []
    monkeypatch.setattr(module_lib, "cross_attention_map", lambda *a, **k: calls.append(1))
    for path in ("step=2.ckpt", "old.ckpt"):
        resumed = optimize_pair(image, PROMPTS[0], "p", cfg, _trainer(4), tiny_backbone, ckpt_path=tmp_path / path)
        assert torch.equal(resumed.alpha, whole.alpha)
    assert calls == []  # no map was computed again


# -- the default and the errors ---------------------------------------------------------------------------------
def test_the_default_start_is_unchanged(tiny_backbone, monkeypatch):
    default = OptimizationConfig().mask
    assert (default.init, default.init_scale, default.init_threshold) == ("constant", 8.0, 0.5)
    monkeypatch.setattr(module_lib, "cross_attention_map", lambda *a, **k: pytest.fail("no map for constant"))
    raster = PeekabooModule(_images(1), PROMPTS[0], "p", _cfg("raster", "constant"), tiny_backbone)
    raster.on_fit_start()
    assert torch.equal(raster.mask.raster, torch.zeros(1, 1, SIZE, SIZE))  # init_logit 0
    assert set(raster.state_dict()) == {"mask.raster", "failed", "nonfinite_steps"}  # no flag for a constant start
    fourier = PeekabooModule(_images(1), PROMPTS[0], "p", _cfg("fourier", "constant"), tiny_backbone)
    before = {k: v.clone() for k, v in fourier.mask.state_dict().items()}
    fourier.on_fit_start()
    assert all(torch.equal(v, before[k]) for k, v in fourier.mask.state_dict().items())


@pytest.mark.parametrize("kind", ["fourier", "fourier_bilateral"])
def test_cross_attention_init_of_a_fourier_mask_is_a_config_error(tiny_backbone, kind):
    with pytest.raises(ConfigError, match=r"'optimization.mask.init' = 'cross_attention' supports the raster kinds"):
        validate_optimization(_cfg(kind))
    with pytest.raises(ConfigError, match=r"mask.kind=raster or raster_bilateral, or optimization.mask.init=constant"):
        PeekabooModule(_images(1), PROMPTS[0], "p", _cfg(kind), tiny_backbone)


@pytest.mark.parametrize(("key", "value"), [("init", "attention"), ("init_scale", 0.0), ("init_threshold", 1.5)])
def test_init_keys_are_validated(key, value):
    cfg = _cfg()
    validate_optimization(cfg)  # the raster kind with cross_attention is fine
    setattr(cfg.mask, key, value)
    with pytest.raises(ConfigError, match=f"'optimization.mask.{key}'"):
        validate_optimization(cfg)


def test_per_pair_inits_start_only_their_rows_from_the_map(tiny_backbone):
    cfg = _cfg("raster", "constant")
    images, ids = _images(2), ["a", "b"]
    module = PeekabooModule(images, PROMPTS[:2], ids, cfg, tiny_backbone, mask_inits=["constant", "cross_attention"])
    assert "initialized" in module.state_dict()  # a resumed run must know row b has had its start
    module.on_fit_start()
    assert torch.equal(module.mask.raster[1, 0], _expected_logits(tiny_backbone, images[1], PROMPTS[1], "b", cfg))
    assert torch.equal(module.mask.raster[0], torch.full_like(module.mask.raster[0], cfg.mask.init_logit))
    with pytest.raises(ValueError, match="1 mask inits for 2 pairs"):
        PeekabooModule(images, PROMPTS[:2], ids, cfg, tiny_backbone, mask_inits=["constant"])
