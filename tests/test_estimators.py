"""Lower-variance dream-loss estimators (guidance.estimator: nfsd, dds) and DDIM-inversion noise
(guidance.noise): hand-computed values for the pure math, the tiny model for the wiring."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo import ops
from peekaboo.config import GuidanceConfig, OptimizationConfig, PredictConfig, load_config, validate_optimization
from peekaboo.errors import ConfigError
from peekaboo.optim.engine import optimize_pair, optimize_pairs

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# Each switch (guidance key -> value) and the UNet rows per draw of the dream loss's own call.
SWITCHES = {
    "nfsd": ({"estimator": "nfsd"}, 2),
    "nfsd_negative": ({"estimator": "nfsd", "nfsd_negative_prompt": "a dog"}, 3),
    "dds_background": ({"estimator": "dds"}, 3),
    "dds_image": ({"estimator": "dds", "dds_reference": "image"}, 4),
    "ddim_inversion": ({"noise": "ddim_inversion", "inversion_steps": 2}, 2),
}


def _one(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 1, 1), value)


# -- the pure math ----------------------------------------------------------------------------------------------
def test_guided_score_and_sds_hand_values():
    assert ops.guided_score(_one(0.1), _one(0.3), 10.0).item() == pytest.approx(2.1)  # 0.1 + 10 * 0.2
    # sds_gradient is unchanged: 0.25 * (2.1 - 0.5)
    assert ops.sds_gradient(_one(0.1), _one(0.3), _one(0.5), torch.tensor([0.75]), 10.0).item() == pytest.approx(0.4)


def test_nfsd_gradient_hand_values():
    eps_u, eps_c, eps_neg = _one(0.1, 2), _one(0.3, 2), _one(0.4, 2)
    abar = torch.tensor([0.75, 0.75])  # w = 0.25
    small_t = torch.tensor([True, False])
    grad = ops.nfsd_gradient(eps_u, eps_c, eps_neg, small_t, abar, 10.0).flatten()
    # small t: delta_D = eps_u = 0.1; large t: delta_D = 0.1 - 0.4 = -0.3; s * delta_C = 10 * 0.2 = 2
    assert grad.tolist() == pytest.approx([0.25 * 2.1, 0.25 * 1.7])
    # An empty negative prompt (eps_neg = eps_u): delta_D = 0 at large t, only the condition direction is left.
    grad = ops.nfsd_gradient(eps_u, eps_c, eps_u, small_t, abar, 10.0).flatten()
    assert grad.tolist() == pytest.approx([0.25 * 2.1, 0.25 * 2.0])


def test_dds_gradient_hand_values_and_the_noise_cancels():
    abar = torch.tensor([0.75])
    assert ops.dds_gradient(_one(2.1), _one(0.5), abar).item() == pytest.approx(0.4)  # 0.25 * (2.1 - 0.5)
    # The same noise on both branches: the dds gradient is the difference of the two sds gradients.
    main = ops.sds_gradient(_one(0.1), _one(0.3), _one(0.7), abar, 10.0)
    ref = ops.sds_gradient(_one(0.2), _one(0.2), _one(0.7), abar, 10.0)
    assert ops.dds_gradient(_one(2.1), _one(0.2), abar).item() == pytest.approx((main - ref).item())


def test_ddim_inversion_step_and_implied_noise_hand_values():
    # abar 0.64 -> 0.36: x0_hat = (1 - 0.6 * 0.5) / 0.8 = 0.875; z_next = 0.6 * 0.875 + 0.8 * 0.5 = 0.925
    z_next = ops.ddim_inversion_step(_one(1.0), _one(0.5), torch.tensor([0.64]), torch.tensor([0.36]))
    assert z_next.item() == pytest.approx(0.925)
    # The implied noise from x0 = 0.875 at abar 0.36: (0.925 - 0.6 * 0.875) / 0.8 = 0.5, the prediction used.
    assert ops.implied_noise(z_next, _one(0.875), torch.tensor([0.36])).item() == pytest.approx(0.5)
    # From the clean latents (abar = 1), x0_hat is the latents themselves; a step to the same abar is a no-op.
    first = ops.ddim_inversion_step(_one(2.0), _one(0.5), torch.tensor([1.0]), torch.tensor([0.36]))
    assert first.item() == pytest.approx(0.6 * 2.0 + 0.8 * 0.5)
    same = ops.ddim_inversion_step(_one(2.0), _one(0.5), torch.tensor([0.36]), torch.tensor([0.36]))
    assert same.item() == pytest.approx(2.0)


def test_inversion_timesteps_hand_values():
    steps = ops.inversion_timesteps(torch.tensor([400, 3]), 4)
    assert [s.tolist() for s in steps] == [[100, 0], [200, 1], [300, 2], [400, 3]]


# -- config -----------------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_sds():
    g = GuidanceConfig()
    assert (g.estimator, g.noise, g.nfsd_t_threshold, g.nfsd_negative_prompt, g.dds_reference, g.inversion_steps) == (
        "sds", "random", 0.2, "", "background", 4)
    assert g.inversion_guidance_scale == -7.5  # SDI's default, apart from the dream loss's scale


@pytest.mark.parametrize(("key", "value"), [("estimator", "vsd"), ("nfsd_t_threshold", 1.0),
                                            ("nfsd_t_threshold", 0.0), ("dds_reference", "mask"),
                                            ("noise", "sobol"), ("inversion_steps", 0)])
def test_bad_values_name_the_key(key, value):
    cfg = OptimizationConfig()
    setattr(cfg.guidance, key, value)
    with pytest.raises(ConfigError, match=f"optimization.guidance.{key}"):
        validate_optimization(cfg)


def test_switches_are_set_from_the_command_line():
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=a", "optimization.guidance.estimator=dds",
                                      "optimization.guidance.dds_reference=image",
                                      "optimization.guidance.noise=ddim_inversion"])
    g = cfg.optimization.guidance
    assert (g.estimator, g.dds_reference, g.noise) == ("dds", "image", "ddim_inversion")


# -- the tiny model ---------------------------------------------------------------------------------------------
def _guidance(**switches) -> GuidanceConfig:
    return GuidanceConfig(guidance_scale=7.5, **switches)


def _dream(backbone, cfg, latents, reference=None, seed=7):
    """The dream loss's gradient w.r.t. ``latents`` ``(B, 4, 8, 8)``, its terms, and the UNet calls' batch sizes."""
    z = latents.clone().requires_grad_()
    sizes = []
    hook = backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(latents.shape[0])]
        terms = backbone.dream_loss(z, backbone.encode_prompt("a red circle"), cfg, gens, reference=reference)
        terms["loss"].sum().backward()
    finally:
        hook.remove()
    return z.grad, terms, sizes


def _latents(n=2, seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_default_is_todays_sds_bit_for_bit(tiny_backbone):
    latents = _latents()
    grad, terms, sizes = _dream(tiny_backbone, _guidance(), latents)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    draws = [(torch.randint(20, 980, (1,), generator=g), torch.randn(4, 8, 8, generator=g)) for g in gens]
    t, noise = torch.cat([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    abar = tiny_backbone.alphas_cumprod[t]
    emb = tiny_backbone.encode_prompt("a red circle")
    eps_u, eps_c = tiny_backbone.predict_noise(ops.add_noise(latents, noise, abar), t, emb)
    replica = latents.clone().requires_grad_()
    ops.dream_loss(replica, ops.sds_gradient(eps_u, eps_c, noise, abar, 7.5)).sum().backward()
    assert sizes == [4]  # one call, [uncond, cond] x 2 pairs
    assert torch.equal(grad, replica.grad)
    assert torch.equal(terms["t"], t.float())


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_changes_the_gradient_in_its_unet_rows(tiny_backbone, name):
    switches, rows = SWITCHES[name]
    cfg = _guidance(**switches)
    latents = _latents()
    reference = _latents(seed=2) if cfg.estimator == "dds" else None
    sds, sds_terms, _ = _dream(tiny_backbone, _guidance(), latents)
    grad, terms, sizes = _dream(tiny_backbone, cfg, latents, reference)
    calls = cfg.inversion_steps + 1 if cfg.noise == "ddim_inversion" else 1
    assert sizes == [2 * rows] * calls  # batched into one call (plus the inversion's own)
    assert torch.equal(terms["t"], sds_terms["t"])  # the same draws: only the estimate differs
    assert torch.isfinite(grad).all() and not torch.allclose(grad, sds)


def test_dds_image_reference_on_its_own_latents_is_zero(tiny_backbone):
    """The reference branch sees the same latents, noise, t and prompt: everything cancels."""
    latents = _latents()
    grad, _, _ = _dream(tiny_backbone, _guidance(estimator="dds", dds_reference="image"), latents, latents)
    assert grad.abs().max() < 1e-5
    with pytest.raises(ValueError, match="reference"):
        _dream(tiny_backbone, _guidance(estimator="dds"), latents)


@pytest.mark.parametrize("scale", [1.0, -7.5])
def test_one_inversion_step_is_one_guided_ddim_step_from_the_clean_latents(tiny_backbone, scale):
    clean, t = _latents(), torch.tensor([300, 700])
    emb = tiny_backbone.encode_prompt("a red circle")
    cfg = _guidance(noise="ddim_inversion", inversion_steps=1, inversion_guidance_scale=scale)
    z_t = tiny_backbone.invert(clean, t, emb, cfg)
    eps_u, eps_c = tiny_backbone.predict_noise(clean, torch.zeros_like(t), emb)
    eps_hat = ops.guided_score(eps_u, eps_c, scale)  # the inversion's scale, not the dream loss's 7.5
    abar = tiny_backbone.alphas_cumprod[t]
    assert torch.allclose(z_t, ops.add_noise(clean, eps_hat, abar), atol=1e-5)
    assert torch.allclose(ops.implied_noise(z_t, clean, abar), eps_hat, atol=1e-4)


def _images(n):
    return torch.rand(n, 3, MODULE_SIZE, MODULE_SIZE, generator=torch.Generator().manual_seed(5))


def _switched(*names):
    cfg = _cfg()
    cfg.guidance.guidance_scale = 7.5
    for name in names:
        for key, value in SWITCHES[name][0].items():
            setattr(cfg.guidance, key, value)
    return cfg


@pytest.mark.parametrize("names", [("nfsd_negative", "ddim_inversion"), ("dds_background",)])
def test_switches_run_end_to_end_and_keep_pairs_independent(tiny_backbone, names):
    """(dds_image runs end to end, with early stopping, in the next test.)"""
    cfg = _switched(*names)
    batched = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], cfg, _trainer(2), tiny_backbone)
    alone = optimize_pair(_images(2)[1], PROMPTS[1], "b", cfg, _trainer(2), tiny_backbone)
    assert batched[1].steps == 2 and torch.isfinite(batched[1].alpha).all()
    assert torch.allclose(batched[1].alpha, alone.alpha, atol=1e-2)  # float noise of a batch only


class _StopPair(Callback):
    """Freezes pair ``pair`` after step ``step``, as early stopping would."""

    def __init__(self, pair, step):
        self.pair, self.step = pair, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pairs = torch.zeros(pl_module.batch_size, dtype=torch.bool)
            pairs[self.pair] = True
            pl_module.stop_pairs(pairs, trainer.global_step)


def test_dds_image_reference_follows_the_running_rows(tiny_backbone):
    cfg = _switched("dds_image")
    cfg.early_stop.enabled, cfg.early_stop.tolerance = True, -1.0  # only the callback stops a pair
    ids = ["a", "b", "c"]
    free = optimize_pairs(_images(3)[1:], PROMPTS[1:], ids[1:], cfg, _trainer(3), tiny_backbone)
    sizes = []
    hook = tiny_backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        results = optimize_pairs(_images(3), PROMPTS, ids, cfg, _trainer(3), tiny_backbone,
                                 callbacks=[_StopPair(pair=0, step=1)])
    finally:
        hook.remove()
    assert sizes == [12, 8, 8]  # 4 rows per pair: [uncond, cond] on the composite and on the image
    assert [r.steps for r in results] == [1, 3, 3]
    for i in (1, 2):  # pair 0's reference rows left with it: the others keep their own image's reference
        assert torch.allclose(results[i].alpha, free[i - 1].alpha, atol=1e-2)
