"""Restarts (optimization.restarts): candidate ids, the choice, the model's prompt fit and the engine's wiring."""

import pytest
import torch
from omegaconf import OmegaConf
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo.config import RestartsConfig, validate_optimization
from peekaboo.errors import ConfigError
from peekaboo.optim import callbacks, engine
from peekaboo.optim.engine import optimize_pair, optimize_pairs
from peekaboo.optim.restarts import candidate_ids, candidate_inits, choose, pair_of, prompt_fit


def _images(n, seed=5):
    return torch.rand(n, 3, MODULE_SIZE, MODULE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_candidate_ids_keep_the_pair_id_first_and_go_pair_by_pair():
    assert candidate_ids(["a", "b"], 3) == ["a", "a#restart1", "a#restart2", "b", "b#restart1", "b#restart2"]
    assert candidate_ids(["a"], 1) == ["a"]


def test_choose_takes_the_lowest_fit_of_each_pair_and_skips_failed_candidates():
    fit = torch.tensor([0.3, 0.1, 0.2, 0.5, 0.5, 0.4])  # two pairs of three candidates
    none = torch.zeros(6, dtype=torch.bool)
    assert choose(fit, none, 3).tolist() == [1, 2]
    failed = torch.tensor([False, True, False, True, True, True])
    assert choose(fit, failed, 3).tolist() == [2, 0]  # all of pair 2 failed: candidate 0 (it reports failed)
    assert choose(torch.tensor([0.2, 0.2]), torch.zeros(2, dtype=torch.bool), 2).tolist() == [0]  # first on ties
    with pytest.raises(ValueError, match="B \\* 4"):
        choose(fit, none, 4)


def test_prompt_fit_shares_draws_within_a_pair_and_tells_masks_apart(tiny_backbone):
    cfg = RestartsConfig(count=2, draws=4)
    images = _images(1).expand(3, -1, -1, -1)
    full, empty = torch.ones(1, 1, MODULE_SIZE, MODULE_SIZE), torch.zeros(1, 1, MODULE_SIZE, MODULE_SIZE)
    alphas = torch.cat([full, full, empty])
    fit = prompt_fit(tiny_backbone, images, alphas, ["a red circle"] * 3, ["p", "p", "p"], cfg, seed=0)
    assert fit.shape == (3,) and torch.isfinite(fit).all()
    assert fit[0] == fit[1]  # same pair, same mask: the same draws give the same error
    assert fit[0] != fit[2]  # another mask, another composite
    other_draws = prompt_fit(tiny_backbone, images[:1], full, ["a red circle"], ["q"], cfg, seed=0)
    assert other_draws[0] != fit[0]  # another pair id draws other backgrounds, timesteps and noise
    # Deterministic, and a row's fit does not depend on the other rows.
    assert torch.equal(prompt_fit(tiny_backbone, images[2:], empty, ["a red circle"], ["p"], cfg, seed=0), fit[2:])


def test_the_error_ratio_fit_divides_by_the_empty_prompts_error_on_the_same_draw(tiny_backbone):
    images, alphas = _images(1).expand(2, -1, -1, -1), torch.full((2, 1, MODULE_SIZE, MODULE_SIZE), 0.5)
    alphas[1, :, : MODULE_SIZE // 2] = 1.0
    plain, ratio = RestartsConfig(draws=1), RestartsConfig(draws=1, fit="error_ratio")
    ids, prompt = ["p", "p"], ["a red circle"] * 2
    with_prompt = prompt_fit(tiny_backbone, images, alphas, prompt, ids, plain, seed=0)
    without = prompt_fit(tiny_backbone, images, alphas, ["", ""], ids, plain, seed=0)
    fit = prompt_fit(tiny_backbone, images, alphas, prompt, ids, ratio, seed=0)
    assert torch.allclose(fit, with_prompt / without, rtol=1e-4)
    assert not torch.allclose(fit, with_prompt)
    # The empty prompt explains a composite exactly as well as no prompt.
    assert torch.allclose(prompt_fit(tiny_backbone, images, alphas, ["", ""], ids, ratio, seed=0), torch.ones(2))


def test_the_objective_fit_is_the_guided_objective_on_the_same_draws(tiny_backbone):
    images, alphas = _images(1).expand(2, -1, -1, -1), torch.full((2, 1, MODULE_SIZE, MODULE_SIZE), 0.5)
    alphas[1, :, : MODULE_SIZE // 2] = 1.0
    ids, prompt = ["p", "p"], ["a red circle"] * 2
    objective = RestartsConfig(draws=1, fit="objective")
    error = prompt_fit(tiny_backbone, images, alphas, prompt, ids, RestartsConfig(draws=1), seed=0)
    # At guidance 1 the objective is (1 - abar_t) / 2 times the summed error under the prompt: with one draw, which
    # both rows share, the same multiple of the mean error for every mask.
    at_one = prompt_fit(tiny_backbone, images, alphas, prompt, ids, objective, seed=0, guidance_scale=1.0)
    assert torch.allclose(at_one[0] / error[0], at_one[1] / error[1], rtol=1e-4)
    # The guidance term weighs the prompt's error against the empty prompt's: it changes the fit...
    at_ten = prompt_fit(tiny_backbone, images, alphas, prompt, ids, objective, seed=0, guidance_scale=10.0)
    assert not torch.allclose(at_ten, at_one)
    # ...except for the empty prompt, whose two predictions coincide: s e - (s - 1) e = e.
    empty = ["", ""]
    assert torch.allclose(prompt_fit(tiny_backbone, images, alphas, empty, ids, objective, seed=0, guidance_scale=10.0),
                          prompt_fit(tiny_backbone, images, alphas, empty, ids, objective, seed=0, guidance_scale=1.0),
                          rtol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale"):
        prompt_fit(tiny_backbone, images, alphas, prompt, ids, objective, seed=0)


def test_restarts_keep_the_candidate_the_fit_prefers(tiny_backbone, monkeypatch):
    cfg = _cfg()
    cfg.restarts.count = 3
    single = _cfg()
    # Each candidate is the single optimization of its candidate id; candidate 0 is the pair's own run.
    runs = [optimize_pair(_images(1)[0], "a red circle", pid, single, _trainer(2), tiny_backbone).alpha
            for pid in ("p", "p#restart1", "p#restart2")]
    assert not torch.allclose(runs[0], runs[1])
    seen = {}

    def fake_fit(backbone, images, alphas, prompts, pair_ids, restarts_cfg, seed, background, guidance_scale):
        seen.update(n=len(pair_ids), ids=list(pair_ids), guidance_scale=guidance_scale)
        return torch.tensor([0.5, 0.5, 0.5, 0.9, 0.2, 0.9])  # pair p: a tie (first wins); pair q: candidate 1

    monkeypatch.setattr(engine, "prompt_fit", fake_fit)
    p, q = optimize_pairs(torch.cat([_images(1), _images(1, seed=6)]), ["a red circle", "a blue square"],
                          ["p", "q"], cfg, _trainer(2), tiny_backbone)
    # Scored on each pair's own draws, at the run's guidance scale (the objective fit's).
    assert seen == {"n": 6, "ids": ["p"] * 3 + ["q"] * 3, "guidance_scale": cfg.guidance.guidance_scale}
    assert p.losses["restart/kept"] == 0 and torch.allclose(p.alpha, runs[0], atol=1e-2)
    assert q.losses["restart/kept"] == 1 and q.losses["restart/fit"] == pytest.approx(0.2)
    q1 = optimize_pair(_images(1, seed=6)[0], "a blue square", "q#restart1", single, _trainer(2), tiny_backbone)
    assert torch.allclose(q.alpha, q1.alpha, atol=1e-2)
    assert p.steps == 2 and "loss/dream" in p.losses


def test_restarts_end_to_end_with_the_real_fit(tiny_backbone):
    cfg = _cfg()
    cfg.restarts.count, cfg.restarts.draws = 2, 2
    [result] = optimize_pairs(_images(1), ["a red circle"], ["p"], cfg, _trainer(2), tiny_backbone)
    assert result.losses["restart/kept"] in (0.0, 1.0) and torch.isfinite(result.alpha).all()


@pytest.mark.parametrize("run_name", [None, "p"])
def test_a_one_pair_restart_logs_each_candidate_and_the_means_to_runs_of_their_own(tiny_backbone, tmp_path, run_name):
    cfg = _cfg()
    cfg.restarts.count, cfg.restarts.draws = 2, 2
    optimize_pairs(_images(1), ["a red circle"], ["p"], cfg, _trainer(2), tiny_backbone, tb_dir=tmp_path,
                   run_name=run_name)
    # One writer per run: the pair's name (candidate 0) must not also receive the candidates' means.
    runs = {d.name: len(list(d.glob("events.out.tfevents*"))) for d in tmp_path.iterdir()}
    assert runs == {"p": 1, "p#restart1": 1, "p+1": 1}


def test_an_early_choice_keeps_its_candidate_and_runs_only_the_kept_ones_after_it(tiny_backbone, monkeypatch):
    cfg = _cfg()
    cfg.restarts.count, cfg.restarts.choose_at = 3, 2
    early_ids = []

    def early_fit(backbone, images, alphas, prompts, pair_ids, restarts_cfg, seed, background, guidance_scale):
        early_ids.append(list(pair_ids))  # scored on each pair's own draws, as at the end
        return torch.tensor([0.9, 0.9, 0.1, 0.9, 0.2, 0.9])  # pair p: candidate 2; pair q: candidate 1

    # The end's fit prefers candidate 0 of both: a pruned candidate (its mask two steps old) is never kept.
    monkeypatch.setattr(callbacks, "prompt_fit", early_fit)
    end_ids = []

    def end_fit(backbone, images, alphas, prompts, pair_ids, *args):
        end_ids.append(list(pair_ids))
        return torch.zeros(len(pair_ids))

    monkeypatch.setattr(engine, "prompt_fit", end_fit)
    rows = []
    dream_loss = type(tiny_backbone).dream_loss

    def counting(self, latents, *args, **kwargs):
        rows.append(latents.shape[0])
        return dream_loss(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(tiny_backbone), "dream_loss", counting)
    images = torch.cat([_images(1), _images(1, seed=6)])
    p, q = optimize_pairs(images, ["a red circle", "a blue square"], ["p", "q"], cfg, _trainer(4), tiny_backbone)
    assert early_ids == [["p"] * 3 + ["q"] * 3]
    assert end_ids == [["p", "q"]]  # at the end only the survivors are scored (for their records)
    assert rows == [6, 6, 2, 2]  # after step 2, one candidate per pair pays for the model
    assert (p.losses["restart/kept"], q.losses["restart/kept"]) == (2, 1) and p.steps == q.steps == 4
    # The kept candidate ran on undisturbed: it is its candidate id's single optimization.
    single = optimize_pair(_images(1)[0], "a red circle", "p#restart2", _cfg(), _trainer(4), tiny_backbone)
    assert torch.allclose(p.alpha, single.alpha, atol=1e-2)


def test_an_early_choice_of_a_candidate_that_stopped_early_ends_the_fit(tiny_backbone, monkeypatch):
    from types import SimpleNamespace

    from peekaboo.optim.module import PeekabooModule

    cfg = _cfg()
    cfg.restarts.count, cfg.restarts.choose_at = 2, 2
    module = PeekabooModule(_images(2), ["a", "a"], ["p", "p#restart1"], cfg, tiny_backbone)
    module.stop_pairs(torch.tensor([True, False]), 1)  # early stopping froze candidate 0 at step 1
    monkeypatch.setattr(callbacks, "prompt_fit", lambda *args: torch.tensor([0.0, 1.0]))  # and the choice keeps it
    trainer = SimpleNamespace(global_step=2, should_stop=False)
    callbacks.EarlyChoice().on_train_batch_end(trainer, module, None, None, 0)
    # No row is left running: the fit ends here instead of stepping an empty batch.
    assert module.pruned.tolist() == [False, True] and trainer.should_stop
    # A run resumed after the step of the choice, from a checkpoint written before it, still chooses once.
    late = PeekabooModule(_images(2), ["a", "a"], ["p", "p#restart1"], cfg, tiny_backbone)
    callbacks.EarlyChoice().on_train_batch_end(SimpleNamespace(global_step=3, should_stop=False), late, None, None, 0)
    assert late.pruned.tolist() == [False, True] and late.stopped_at.tolist() == [-1, 3]


def test_an_early_choice_is_kept_in_checkpoints(tiny_backbone):
    from peekaboo.optim.module import PeekabooModule

    cfg = _cfg()
    cfg.restarts.count, cfg.restarts.choose_at = 2, 3
    module = PeekabooModule(_images(2), ["a", "a"], ["p", "p#restart1"], cfg, tiny_backbone)
    module.prune(torch.tensor([False, True]), 3)
    state = module.state_dict()
    assert state["pruned"].tolist() == [False, True] and state["stopped_at"].tolist() == [-1, 3]
    cfg.restarts.choose_at = 0  # choosing at the end: the checkpoint holds what it held before the option
    assert "pruned" not in PeekabooModule(_images(2), ["a", "a"], ["p", "p#restart1"], cfg, tiny_backbone).state_dict()


@pytest.mark.parametrize(("key", "value"), [("count", 0), ("draws", 0), ("t_min", 0.9), ("fit", "loss"),
                                            ("choose_at", -1)])
def test_restarts_settings_out_of_range_are_refused(key, value):
    cfg = _cfg()
    setattr(cfg.restarts, key, value)
    with pytest.raises(ConfigError, match=f"optimization.restarts.{key}"):
        validate_optimization(cfg)


def test_pair_of_undoes_candidate_ids():
    ids = candidate_ids(["a", "b-1"], 3)
    assert ids == ["a", "a#restart1", "a#restart2", "b-1", "b-1#restart1", "b-1#restart2"]
    assert [pair_of(c) for c in ids] == ["a"] * 3 + ["b-1"] * 3


def test_candidate_inits_cycle_the_list_and_default_to_the_mask_init():
    assert candidate_inits(RestartsConfig(count=3), "constant") == ["constant"] * 3
    mixed = RestartsConfig(count=3, mask_inits=["constant", "cross_attention"])
    assert candidate_inits(mixed, "constant") == ["constant", "cross_attention", "constant"]


def test_mixed_starts_give_each_candidate_its_own_init(tiny_backbone, monkeypatch):
    cfg = _cfg("raster")
    cfg.restarts.count, cfg.restarts.mask_inits = 2, ["constant", "cross_attention"]
    # Candidate k is the single optimization of its candidate id from its own start: candidate 0 the default's
    # alpha-0.5 run, candidate 1 the cross-attention start's.
    constant, attention = _cfg("raster"), _cfg("raster")
    attention.mask.init = "cross_attention"
    runs = [optimize_pair(_images(1)[0], "a red circle", "p", constant, _trainer(2), tiny_backbone).alpha,
            optimize_pair(_images(1)[0], "a red circle", "p#restart1", attention, _trainer(2), tiny_backbone).alpha]
    for k in (0, 1):
        monkeypatch.setattr(engine, "prompt_fit", lambda *args, k=k: torch.tensor([0.0, 1.0] if k == 0 else [1.0, 0.0]))
        # As loaded from YAML (an OmegaConf node, the form runs pass), not only the dataclass.
        [result] = optimize_pairs(_images(1), ["a red circle"], ["p"], OmegaConf.structured(cfg), _trainer(2),
                                  tiny_backbone)
        assert result.losses["restart/kept"] == k and torch.allclose(result.alpha, runs[k], atol=1e-2)
    assert not torch.allclose(runs[0], runs[1], atol=1e-2)


@pytest.mark.parametrize(("kind", "inits", "match"), [
    ("raster", ["constant", "everywhere"], "allowed: a list of constant | cross_attention"),
    ("fourier", ["constant", "cross_attention"], "leave cross_attention out of optimization.restarts.mask_inits"),
])
def test_bad_mask_inits_are_refused_naming_the_key(kind, inits, match):
    cfg = _cfg(kind)
    cfg.restarts.mask_inits = inits
    with pytest.raises(ConfigError, match=match):
        validate_optimization(cfg)
