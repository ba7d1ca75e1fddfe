"""Fewer, better steps: the learning-rate and timestep schedules, several draws per step, and per-pair early
stopping (hand-computed values where the math allows, the tiny model where the wiring matters)."""

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo import ops
from peekaboo.config import EarlyStopConfig, GuidanceConfig, OptimConfig
from peekaboo.optim.callbacks import StableMaskStop, loss_plateau_update
from peekaboo.optim.engine import optimize_pair, optimize_pairs
from peekaboo.optim.module import PeekabooModule
from peekaboo.optim.optimizer import lr_factor

SIZE = MODULE_SIZE
PROMPTS = ["a red circle", "a blue square", "a green triangle"]





def _images(n):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


# -- learning-rate schedule -------------------------------------------------------------------------------------
def test_lr_factor_hand_values():
    constant = OptimConfig()
    assert [lr_factor(k, 10, constant) for k in range(10)] == [1.0] * 10
    warm = OptimConfig(warmup_steps=4)
    assert [lr_factor(k, 10, warm) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine over 5 steps to 0.1: p = k / 4; f + (1 - f) (1 + cos(pi p)) / 2
    cosine = OptimConfig(schedule="cosine", final_lr_fraction=0.1)
    got = [lr_factor(k, 5, cosine) for k in range(5)]
    half = 0.5 * (1 + math.cos(math.pi / 4))  # 0.853553...
    assert got == pytest.approx([1.0, 0.1 + 0.9 * half, 0.55, 0.1 + 0.9 * (1 - half), 0.1])
    # warm-up of 2, then a cosine over the remaining 4 steps (p = (k - 2) / 3), ending exactly at f = 0
    warm_cosine = OptimConfig(schedule="cosine", warmup_steps=2)
    assert [lr_factor(k, 6, warm_cosine) for k in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.25, 0.0])
    step = OptimConfig(schedule="step", step_every=2, step_gamma=0.5)
    assert [lr_factor(k, 10, step) for k in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


class _RecordLR(Callback):
    """The learning rate each step ran with."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def test_schedule_reaches_the_optimizer_step_by_step(tiny_backbone):
    cfg = _cfg()
    module = PeekabooModule(_images(1), PROMPTS[0], "p", cfg, tiny_backbone)
    assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)  # constant: no scheduler at all
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction = "cosine", 2, 0.2
    with pytest.raises(ValueError, match="run's length"):
        PeekabooModule(_images(1), PROMPTS[0], "p", cfg, tiny_backbone).configure_optimizers()
    conf = PeekabooModule(_images(1), PROMPTS[0], "p", cfg, tiny_backbone, max_steps=6).configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    record = _RecordLR()
    optimize_pair(_images(1)[0], PROMPTS[0], "p", cfg, _trainer(6), tiny_backbone, callbacks=[record])
    assert [s for s, _ in record.lrs] == list(range(6))
    assert [lr for _, lr in record.lrs] == pytest.approx([0.05 * lr_factor(k, 6, cfg.optim) for k in range(6)])
    assert record.lrs[-1][1] == pytest.approx(0.05 * 0.2)


def test_resumed_schedule_continues_where_it_stopped(tiny_backbone, tmp_path):
    cfg = _cfg()
    cfg.optim.schedule, cfg.optim.warmup_steps = "cosine", 1
    image = _images(1)[0]
    whole = _RecordLR()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    full = optimize_pair(image, PROMPTS[0], "p", cfg, _trainer(5), tiny_backbone, callbacks=[ckpt, whole])
    resumed_lr = _RecordLR()
    resumed = optimize_pair(image, PROMPTS[0], "p", cfg, _trainer(5), tiny_backbone, callbacks=[resumed_lr],
                            ckpt_path=tmp_path / "step=2.ckpt")
    assert resumed_lr.lrs == whole.lrs[2:]  # steps 2, 3, 4 at the uninterrupted run's rates
    assert resumed.steps == full.steps == 5
    assert torch.equal(resumed.alpha, full.alpha)


# -- timestep schedule ------------------------------------------------------------------------------------------
def test_timestep_range_hand_values():
    assert ops.timestep_range("uniform", 3, None, 0.02, 0.98) == (0.02, 0.98)
    # annealed over 5 draws from 0.8 to 0.2: centres 0.8, 0.65, 0.5, 0.35, 0.2, band +-0.1, clipped
    ranges = [ops.timestep_range("annealed", i, 5, 0.2, 0.8, jitter=0.1) for i in range(5)]
    assert [r[0] for r in ranges] == pytest.approx([0.7, 0.55, 0.4, 0.25, 0.2])
    assert [r[1] for r in ranges] == pytest.approx([0.8, 0.75, 0.6, 0.45, 0.3])
    with pytest.raises(ValueError, match="run's length"):
        ops.timestep_range("annealed", 0, None, 0.2, 0.8)
    # 4 slices of [0.2, 0.6): draw 5 takes slice 1
    assert ops.timestep_range("stratified", 5, None, 0.2, 0.6, strata=4) == pytest.approx((0.3, 0.4))


def test_uniform_draws_are_the_papers_draws(tiny_backbone):
    cfg = GuidanceConfig()
    draws = [tiny_backbone.sample_timestep(cfg, torch.Generator().manual_seed(s)) for s in range(20)]
    expected = [torch.randint(20, 980, (1,), generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(draws, expected, strict=True))


def test_annealed_falls_and_stratified_covers(tiny_backbone):
    annealed = GuidanceConfig(t_schedule="annealed", t_min=0.2, t_max=0.8, t_anneal_jitter=0.0)
    gen = torch.Generator().manual_seed(0)
    ts = [int(tiny_backbone.sample_timestep(annealed, gen, i, 5)) for i in range(5)]
    assert ts == [800, 650, 500, 350, 200]  # no jitter: exactly the line (int(centre * 1000))
    stratified = GuidanceConfig(t_schedule="stratified", t_min=0.2, t_max=0.6, t_strata=4)
    ts = [int(tiny_backbone.sample_timestep(stratified, gen, i)) for i in range(8)]
    for i, t in enumerate(ts):  # two cycles, one draw in each 100-step slice
        assert 200 + 100 * (i % 4) <= t < 300 + 100 * (i % 4)


def test_module_passes_its_step_and_length_to_the_schedule(tiny_backbone):
    cfg = _cfg()
    cfg.guidance.t_schedule, cfg.guidance.t_anneal_jitter = "annealed", 0.0
    seen = _RecordT()
    optimize_pair(_images(1)[0], PROMPTS[0], "p", cfg, _trainer(3), tiny_backbone, callbacks=[seen])
    assert seen.ts == [980.0, 500.0, 20.0]  # t_max, the middle, t_min over a 3-step run


class _RecordT(Callback):
    def __init__(self):
        self.ts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ts.append(float(pl_module.last_guidance["guidance/t"][0]))


# -- several draws per step -------------------------------------------------------------------------------------
def test_one_draw_per_step_is_the_single_draw_computation(tiny_backbone):
    """K = 1 runs exactly the single-draw dream loss: the same draws, tensors and result, bit for bit."""
    cfg = GuidanceConfig(guidance_scale=7.5, samples_per_step=1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    emb = tiny_backbone.encode_prompt("a red circle")
    terms = tiny_backbone.dream_loss(latents, emb, cfg, [torch.Generator().manual_seed(7 + i) for i in range(2)])
    terms["loss"].sum().backward()
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    draws = [(torch.randint(20, 980, (1,), generator=g), torch.randn(4, 8, 8, generator=g)) for g in gens]
    t = torch.cat([d[0] for d in draws])
    noise = torch.stack([d[1] for d in draws])
    abar = tiny_backbone.alphas_cumprod[t]
    eps_u, eps_c = tiny_backbone.predict_noise(ops.add_noise(latents.detach(), noise, abar), t, emb)
    grad = ops.sds_gradient(eps_u, eps_c, noise, abar, 7.5)
    replica = latents.detach().clone().requires_grad_()
    loss = ops.dream_loss(replica, grad)
    loss.sum().backward()
    assert torch.equal(terms["t"], t.float())
    assert torch.equal(terms["loss"].detach(), loss.detach())
    assert torch.equal(latents.grad, replica.grad)


def test_k_draws_average_the_single_draw_gradients_in_one_unet_call(tiny_backbone):
    cfg1 = GuidanceConfig(guidance_scale=7.5)
    cfg2 = GuidanceConfig(guidance_scale=7.5, samples_per_step=2)
    emb = tiny_backbone.encode_prompt("a red circle")
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sizes = []
    hook = tiny_backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        latents = start.clone().requires_grad_()
        terms = tiny_backbone.dream_loss(latents, emb, cfg2, [torch.Generator().manual_seed(7 + i) for i in range(2)])
        terms["loss"].sum().backward()
        assert sizes == [2 * 2 * 2]  # one UNet call: [uncond, cond] x B pairs x K draws
        # The same draws one at a time: each pair's generator makes draw 1, then draw 2.
        gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
        singles = []
        for _ in range(2):
            z = start.clone().requires_grad_()
            single = tiny_backbone.dream_loss(z, emb, cfg1, gens)
            single["loss"].sum().backward()
            singles.append((z.grad, single["t"]))
    finally:
        hook.remove()
    assert torch.allclose(latents.grad, (singles[0][0] + singles[1][0]) / 2, atol=1e-6)
    assert torch.equal(terms["t"], (singles[0][1] + singles[1][1]) / 2)
    assert not torch.allclose(singles[0][0], singles[1][0])  # two different draws, so the mean means something


# -- per-pair early stopping ------------------------------------------------------------------------------------
def test_loss_plateau_update_hand_values():
    ema = best = since = None
    out = []
    for loss in (4.0, 2.0, 2.0, 2.0, 2.0, 2.0):
        ema, best, since = loss_plateau_update(torch.tensor([loss]), ema, best, since, decay=0.5, tolerance=0.05)
        out.append((ema.item(), best.item(), since.item()))
    # EMA 4, 3, 2.5, 2.25, 2.125, 2.0625; each fall beyond 5% of the best resets the count
    assert out == [(4.0, 4.0, 0), (3.0, 3.0, 0), (2.5, 2.5, 0), (2.25, 2.25, 0), (2.125, 2.125, 0),
                   (2.0625, 2.125, 1)]  # 2.0625 is within 5% of 2.125: no improvement


def _run_stop(cfg, losses):
    """Drive StableMaskStop over per-step dream losses ``losses[k]`` ``(B,)`` with a mask that never flips;
    returns (the steps at which stop_pairs froze pairs, and the step the fit ended, or None)."""
    stop = StableMaskStop(cfg, threshold=0.5)
    froze = []
    b = len(losses[0])
    module = SimpleNamespace(last_alpha=torch.zeros(b, 1, 2, 2), failed=torch.zeros(b, dtype=torch.bool),
                             stopped_at=torch.full((b,), -1), loggers=(), logged_this_step=True,
                             stop_pairs=lambda pairs, step: froze.append((step, pairs.tolist())))
    for k, loss in enumerate(losses):
        module.last_losses = {"loss/dream": torch.tensor(loss)}
        trainer = SimpleNamespace(global_step=k + 1, should_stop=False)
        stop.on_train_batch_end(trainer, module, None, None, k)
        if trainer.should_stop:
            return froze, k + 1
    return froze, None


def test_a_pair_stops_when_mask_and_loss_have_settled_and_not_while_its_loss_improves():
    cfg = EarlyStopConfig(enabled=True, tolerance=0.0, patience=3, min_steps=0, loss_tolerance=0.01, loss_ema=0.0)
    constant, improving = 1.0, [0.9**k for k in range(40)]
    # Pair 0's loss is flat and its mask never flips: after its first step both counts reach 3 at step 4.
    froze, end = _run_stop(cfg, [[constant, improving[k]] for k in range(40)])
    assert froze == [(4, [True, False])] and end is None  # pair 1's loss keeps falling 10% a step
    # Once pair 1's loss flattens (from step 21 on), it stops 3 steps later and the fit ends.
    froze, end = _run_stop(cfg, [[constant, improving[min(k, 20)]] for k in range(40)])
    assert froze == [(4, [True, False]), (24, [False, True])] and end == 24
    cfg.min_steps = 10  # never before min_steps
    assert _run_stop(cfg, [[constant]] * 40) == ([(10, [True])], 10)
    cfg.loss_tolerance = None  # the mask test alone (the behaviour before the loss test existed)
    cfg.min_steps = 0
    assert _run_stop(cfg, [[improving[k]] for k in range(40)]) == ([(4, [True])], 4)


def test_constant_dream_loss_stops_on_the_tiny_model(tiny_backbone):
    cfg = _cfg()
    cfg.loss.lambda_dream = 0.0  # the dream loss is exactly 0 at every step: it cannot improve
    es = cfg.early_stop
    es.enabled, es.tolerance, es.patience, es.min_steps, es.loss_tolerance = True, 1.0, 3, 2, 0.01
    results = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], cfg, _trainer(20), tiny_backbone)
    assert [r.steps for r in results] == [4, 4]  # patience + 1: the first step starts both counts
    assert all(r.curve["step"][-1] == 4 for r in results)


class _StopAt(Callback):
    """Stops pair ``pair`` after ``step`` steps, as StableMaskStop would, and keeps its mask then."""

    def __init__(self, pair, step):
        self.pair, self.step, self.alpha = pair, step, None
        self.later = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            alpha = pl_module()[self.pair].clone()
        if trainer.global_step == self.step:
            pairs = torch.zeros(pl_module.batch_size, dtype=torch.bool)
            pairs[self.pair] = True
            pl_module.stop_pairs(pairs, trainer.global_step)
            self.alpha = alpha
        elif trainer.global_step > self.step:
            self.later.append(alpha)


def _never_settles(kind="raster"):
    cfg = _cfg(kind)
    cfg.optim.weight_decay = 0.1  # so that a zero gradient alone would still move a parameter
    cfg.early_stop.enabled, cfg.early_stop.tolerance = True, -1.0  # the mask test never passes
    return cfg


@pytest.mark.parametrize("kind", ["raster", "fourier"])
def test_a_stopped_pair_is_frozen_while_the_others_go_on(tiny_backbone, kind):
    cfg = _never_settles(kind)
    ids = ["a", "b", "c"]
    free = optimize_pairs(_images(3), PROMPTS, ids, cfg, _trainer(5), tiny_backbone)
    stop = _StopAt(pair=1, step=2)
    sizes = []
    hook = tiny_backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        results = optimize_pairs(_images(3), PROMPTS, ids, cfg, _trainer(5), tiny_backbone, callbacks=[stop])
    finally:
        hook.remove()
    assert [r.steps for r in results] == [5, 2, 5]
    assert len(stop.later) == 3 and all(torch.equal(a, stop.alpha) for a in stop.later)
    assert torch.equal(results[1].alpha, stop.alpha[0])
    assert sizes == [6, 6, 4, 4, 4]  # from step 2 on, the UNet sees the two running pairs only
    assert results[1].curve["step"][-1] <= 2 and math.isfinite(results[1].losses["loss/dream"])
    for i in (0, 2):  # the others are untouched (up to the float noise of a smaller batch)
        assert torch.allclose(results[i].alpha, free[i].alpha, atol=1e-2)


def test_a_stopped_pair_stays_stopped_after_a_resume(tiny_backbone, tmp_path):
    cfg = _never_settles()
    ids = ["a", "b"]
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=3)
    whole = optimize_pairs(_images(2), PROMPTS[:2], ids, cfg, _trainer(5), tiny_backbone,
                           callbacks=[ckpt, _StopAt(pair=0, step=2)])
    state = torch.load(tmp_path / "step=3.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"]["stopped_at"].tolist() == [2, -1]
    resumed = optimize_pairs(_images(2), PROMPTS[:2], ids, cfg, _trainer(5), tiny_backbone,
                             ckpt_path=tmp_path / "step=3.ckpt")
    assert [r.steps for r in resumed] == [r.steps for r in whole] == [2, 5]
    for a, b in zip(resumed, whole, strict=True):
        assert torch.equal(a.alpha, b.alpha)
    # A checkpoint saved on the step the last running pair stopped resumes with nothing left to run.
    state["state_dict"]["stopped_at"] = torch.tensor([2, 3])
    torch.save(state, tmp_path / "all-stopped.ckpt")
    done = optimize_pairs(_images(2), PROMPTS[:2], ids, cfg, _trainer(5), tiny_backbone,
                          ckpt_path=tmp_path / "all-stopped.ckpt")
    assert [r.steps for r in done] == [2, 3]
    # A checkpoint from before pairs could stop (no stopped_at) resumes with every pair running.
    del state["state_dict"]["stopped_at"]
    torch.save(state, tmp_path / "old.ckpt")
    old = optimize_pairs(_images(2), PROMPTS[:2], ids, cfg, _trainer(5), tiny_backbone, ckpt_path=tmp_path / "old.ckpt")
    assert [r.steps for r in old] == [5, 5]


def test_a_run_folder_from_before_the_new_keys_still_resumes(tmp_path):
    from omegaconf import OmegaConf

    from peekaboo.config import TrainConfig, to_yaml
    from peekaboo.errors import ConfigError
    from peekaboo.runs.planning import check_same_run

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": {"source": "shapes"}, "run": {"name": "x"}})
    saved = OmegaConf.to_container(cfg)
    for section, key in (("optim", "schedule"), ("guidance", "samples_per_step"), ("early_stop", "loss_tolerance")):
        del saved["optimization"][section][key]  # what a folder started before these keys holds
    (tmp_path / "config.yaml").write_text(to_yaml(OmegaConf.create(saved)))
    check_same_run(tmp_path, cfg)  # the defaults are what that run did: the same run
    cfg.optimization.guidance.samples_per_step = 2
    with pytest.raises(ConfigError, match="different optimization settings"):
        check_same_run(tmp_path, cfg)
