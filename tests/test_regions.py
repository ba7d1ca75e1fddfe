"""Region starts (``mask.init=region``): the proposals of a hand-drawn scene, their ranking by the prompt fit,
which row starts on which region (per pair, across restarts), resuming, and the config errors."""

from __future__ import annotations

import pytest
import torch
from tests_support import MODULE_SIZE, small_optimization_config
from tests_support import cpu_trainer_config as _trainer

from peekaboo.config import OptimizationConfig, RegionsConfig, RestartsConfig, validate_optimization
from peekaboo.errors import ConfigError
from peekaboo.optim import engine
from peekaboo.optim import module as module_lib
from peekaboo.optim import regions as regions_lib
from peekaboo.optim.engine import optimize_pair, optimize_pairs
from peekaboo.optim.masks import map_logits
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.regions import RANKING_KEY, ranked_regions, region_proposals
from peekaboo.optim.restarts import prompt_fit

SIZE = MODULE_SIZE


@pytest.fixture(autouse=True)
def _fresh_rankings():
    """Each test ranks anew: the per-process ranking cache would hand a faked fit's order to the next test."""
    regions_lib._ORDERS.clear()
    yield
    regions_lib._ORDERS.clear()


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A grey canvas with a red 4x4 square, a blue 6x5 rectangle and a single green pixel: (image, red, blue)."""
    image = torch.full((3, SIZE, SIZE), 0.5)
    red, blue = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)
    red[2:6, 2:6] = 1
    blue[8:14, 9:14] = 1
    image[:, red.bool()] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    image[:, blue.bool()] = torch.tensor([0.1, 0.1, 0.9])[:, None]
    image[:, 14, 2] = torch.tensor([0.1, 0.9, 0.1])
    return image, red, blue


def _cfg(init: str = "region", kind: str = "raster") -> OptimizationConfig:
    cfg = small_optimization_config(kind)
    cfg.mask.init = init
    cfg.mask.regions.min_area = 0.02  # at 16x16: segments under 5 pixels
    cfg.mask.regions.sigma = 0.0  # no smoothing: the drawn edges are sharp
    return cfg


# -- proposals and ranking --------------------------------------------------------------------------------------
def test_proposals_are_the_objects_not_the_background_or_specks():
    image, red, blue = _scene()
    found = region_proposals(image, _cfg().mask.regions)  # (M, S, S)
    assert found.shape == (2, SIZE, SIZE)
    as_set = {tuple(m.flatten().tolist()) for m in found}
    assert as_set == {tuple(red.flatten().tolist()), tuple(blue.flatten().tolist())}
    # The canvas (about 80% of the image) comes back once max_area allows it; the 1-pixel speck never does.
    wide = RegionsConfig(sigma=0.0, min_area=0.02, max_area=1.0)
    assert len(region_proposals(image, wide)) == 3
    with pytest.raises(ValueError, match=r"expected \(3, H, W\)"):
        region_proposals(image[None], wide)


def test_ranking_orders_regions_by_the_prompt_fit_on_shared_draws(tiny_backbone):
    image, _, _ = _scene()
    cfg = _cfg()
    regions = region_proposals(image, cfg.mask.regions)  # (2, S, S)
    rg = cfg.mask.regions
    fit_cfg = RestartsConfig(draws=rg.draws, t_min=rg.t_min, t_max=rg.t_max, fit="error")
    fit = prompt_fit(tiny_backbone, image[None].expand(2, -1, -1, -1), regions[:, None], ["a blue square"] * 2,
                     ["p" + RANKING_KEY] * 2, fit_cfg, cfg.seed)  # (2,)
    ranked = ranked_regions(tiny_backbone, image, "a blue square", "p", rg, cfg.seed)
    assert torch.equal(ranked, regions[fit.argsort()])


def test_ranking_follows_the_fit_best_first(tiny_backbone, monkeypatch):
    image, red, blue = _scene()
    cfg = _cfg()
    order = [tuple(m.flatten().tolist()) for m in region_proposals(image, cfg.mask.regions)]
    for favoured in (red, blue):
        # A fake fit: 0 for the favoured region, 1 for the other.
        def fake(backbone, images, alphas, prompts, ids, fit_cfg, seed, background, favoured=favoured):
            return torch.tensor([0.0 if torch.equal(a[0], favoured) else 1.0 for a in alphas])
        monkeypatch.setattr(regions_lib, "prompt_fit", fake)
        regions_lib._ORDERS.clear()  # else the first fake's order is reused: same inputs
        ranked = ranked_regions(tiny_backbone, image, "x", "p", cfg.mask.regions, 0)
        assert torch.equal(ranked[0], favoured) and len(ranked) == len(order) == 2


def test_a_ranking_is_computed_once_per_inputs(tiny_backbone, monkeypatch):
    image, _, _ = _scene()
    rg = _cfg().mask.regions
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])  # prompts
        return prompt_fit(*args, **kwargs)

    monkeypatch.setattr(regions_lib, "prompt_fit", counting)
    first = ranked_regions(tiny_backbone, image, "a blue square", "p", rg, 0)
    assert torch.equal(ranked_regions(tiny_backbone, image.clone(), "a blue square", "p", rg, 0), first)
    assert len(calls) == 1
    # Anything the order depends on ranks again: the prompt, the pixels, the pair id, the draws, the seed.
    other_pixels = image.clone()
    other_pixels[:, 0, 0] = 0.0
    ranked_regions(tiny_backbone, image, "a red square", "p", rg, 0)
    ranked_regions(tiny_backbone, other_pixels, "a blue square", "p", rg, 0)
    ranked_regions(tiny_backbone, image, "a blue square", "q", rg, 0)
    ranked_regions(tiny_backbone, image, "a blue square", "p", RegionsConfig(**{**vars(rg), "draws": 4}), 0)
    ranked_regions(tiny_backbone, image, "a blue square", "p", rg, 1)
    assert len(calls) == 6


def test_the_ranking_cache_keeps_the_most_recently_used(tiny_backbone, monkeypatch):
    image, _, _ = _scene()
    rg = _cfg().mask.regions
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[4][0])  # pair ids
        return prompt_fit(*args, **kwargs)

    monkeypatch.setattr(regions_lib, "prompt_fit", counting)
    monkeypatch.setattr(regions_lib, "MAX_RANKINGS", 2)
    for pid in ("a", "b", "a", "c", "a", "b"):  # "a" stays recent; "b" is dropped when "c" comes
        ranked_regions(tiny_backbone, image, "a blue square", pid, rg, 0)
    assert [c.removesuffix(RANKING_KEY) for c in calls] == ["a", "b", "c", "b"]
    assert len(regions_lib._ORDERS[tiny_backbone]) == 2


def test_forgotten_rankings_are_ranked_again(tiny_backbone, monkeypatch):
    image, _, _ = _scene()
    rg = _cfg().mask.regions
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[4][0])
        return prompt_fit(*args, **kwargs)

    monkeypatch.setattr(regions_lib, "prompt_fit", counting)
    first = ranked_regions(tiny_backbone, image, "a blue square", "p", rg, 0)
    ranked_regions(tiny_backbone, image, "a blue square", "p", rg, 0)
    assert len(calls) == 1  # kept
    regions_lib.forget_rankings(tiny_backbone)
    again = ranked_regions(tiny_backbone, image, "a blue square", "p", rg, 0)
    assert len(calls) == 2 and torch.equal(again, first)  # ranked anew, to the same order
    regions_lib.forget_rankings(tiny_backbone)
    regions_lib.forget_rankings(tiny_backbone)  # nothing kept: no error


# -- the start in the module ------------------------------------------------------------------------------------
def test_each_region_start_takes_its_pairs_next_best_region(tiny_backbone, monkeypatch):
    image, red, blue = _scene()
    cfg = _cfg("constant")
    calls = []

    def fake_rank(backbone, img, prompt, pid, regions_cfg, seed, background):
        calls.append(pid)
        return torch.stack([blue, red]) if pid == "p" else torch.stack([red])

    monkeypatch.setattr(module_lib, "ranked_regions", fake_rank)
    images = image[None].expand(5, -1, -1, -1)
    ids = ["p", "p#restart1", "p#restart2", "q", "q#restart1"]
    inits = ["region", "constant", "region", "region", "region"]
    module = PeekabooModule(images, ["a blue square"] * 3 + ["a red square"] * 2, ids, cfg, tiny_backbone,
                            mask_inits=inits)
    assert "initialized" in module.state_dict()  # a resumed run must know the starts were made
    module.on_fit_start()
    assert calls == ["p", "q"]  # one ranking per pair, under the pair's own id
    start = map_logits(torch.stack([blue, red, red]), cfg.mask.init_scale, cfg.mask.init_threshold)
    raster = module.mask.raster[:, 0]  # (5, S, S)
    assert torch.equal(raster[0], start[0]) and torch.equal(raster[2], start[1]) and torch.equal(raster[3], start[2])
    constant = torch.full((SIZE, SIZE), cfg.mask.init_logit)
    assert torch.equal(raster[1], constant)  # not a region start
    assert torch.equal(raster[4], constant)  # q has one region: its second region start keeps the constant one
    assert module.initialized
    calls.clear()
    module.on_fit_start()  # a resumed run (initialized) ranks nothing again
    assert calls == []


def test_a_region_start_optimizes_from_the_best_region(tiny_backbone):
    image, _, _ = _scene()
    cfg = _cfg()
    module = PeekabooModule(image, "a red square", "p", cfg, tiny_backbone)
    module.on_fit_start()
    best = ranked_regions(tiny_backbone, image, "a red square", "p", cfg.mask.regions, cfg.seed)[0]
    with torch.no_grad():
        alpha = module()[0, 0]  # (S, S)
    assert torch.equal(alpha > 0.5, best.bool())


def test_restarts_with_a_region_start_keep_the_candidate_the_fit_prefers(tiny_backbone, monkeypatch):
    image, _, _ = _scene()
    cfg = _cfg("constant")
    cfg.restarts.count, cfg.restarts.mask_inits = 2, ["constant", "region"]
    alone = _cfg("region")  # candidate 1 is the region start's own optimization, under the candidate's id
    expected = optimize_pair(image, "a red square", "p#restart1", alone, _trainer(2), tiny_backbone).alpha
    monkeypatch.setattr(engine, "prompt_fit", lambda *args: torch.tensor([1.0, 0.0]))
    [result] = optimize_pairs(image[None], ["a red square"], ["p"], cfg, _trainer(2), tiny_backbone)
    assert result.losses["restart/kept"] == 1 and torch.allclose(result.alpha, expected, atol=1e-2)


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fourier", "fourier_bilateral"])
def test_a_region_start_of_a_fourier_mask_is_a_config_error(kind):
    with pytest.raises(ConfigError, match=r"'optimization.mask.init' = 'region' supports the raster kinds only"):
        validate_optimization(_cfg("region", kind))
    cfg = _cfg("constant", kind)
    cfg.restarts.count, cfg.restarts.mask_inits = 2, ["constant", "region"]
    with pytest.raises(ConfigError, match=r"leave region out of optimization\.restarts\.mask_inits"):
        validate_optimization(cfg)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("scale", 0.0, r"mask\.regions\.scale"), ("sigma", -1.0, r"mask\.regions\.sigma"),
    ("min_area", 0.6, r"mask\.regions\.min_area/max_area"), ("max_area", 1.5, r"mask\.regions\.min_area/max_area"),
    ("draws", 0, r"mask\.regions\.draws"), ("t_min", 0.99, r"mask\.regions\.t_min/t_max"),
])
def test_region_keys_are_validated(key, value, match):
    cfg = _cfg()
    validate_optimization(cfg)
    setattr(cfg.mask.regions, key, value)
    with pytest.raises(ConfigError, match=match):
        validate_optimization(cfg)
