"""PeekabooModule: only the mask trains, checkpoints hold no backbone, seeds reproduce, and the dream loss moves a
mask toward the object its prompt names (the bundled shapes model)."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo.config import ModelConfig, OptimizationConfig, TrainerConfig
from peekaboo.data.shapes import make_scene
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.optim.engine import FitOptions, optimize_pair, optimize_pairs
from peekaboo.optim.module import PeekabooModule

SIZE = MODULE_SIZE


def test_state_dict_holds_the_mask_and_loop_state_only(tiny_backbone):
    for kind in ("raster", "fourier_bilateral"):
        module = PeekabooModule(torch.rand(3, SIZE, SIZE), "a red circle", "p", _cfg(kind), tiny_backbone)
        assert list(module.state_dict()) and all(k.startswith("mask.") or k in ("failed", "nonfinite_steps")
                                               for k in module.state_dict())
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in module.mask.named_parameters(prefix="mask")}


def test_a_checkpoint_holding_the_nonfinite_streak_beside_its_state_dict_resumes_it(tiny_backbone):
    # Checkpoints written before the streak was a buffer: beside the state dict, or (older) nowhere.
    module = PeekabooModule(torch.rand(3, SIZE, SIZE), "a red circle", "p", _cfg(), tiny_backbone)
    for beside, expected in ((torch.tensor([3]), [3]), (None, [0])):
        state = {k: v.clone() for k, v in module.state_dict().items() if k != "nonfinite_steps"}
        checkpoint = {"state_dict": state} | ({} if beside is None else {"nonfinite_steps": beside})
        module.nonfinite_steps.fill_(7)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        assert module.nonfinite_steps.tolist() == expected


def test_only_mask_receives_gradients(tiny_backbone):
    module = PeekabooModule(torch.rand(3, SIZE, SIZE), "a red circle", "p", _cfg(), tiny_backbone)
    module.on_fit_start()
    loss = module.training_step(0, 0)
    loss.backward()
    assert module.mask.raster.grad is not None and module.mask.raster.grad.abs().sum() > 0
    for model in (tiny_backbone.vae, tiny_backbone.unet, tiny_backbone.text_encoder):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_checkpoint_is_small_has_no_backbone_and_restores_mask(tiny_backbone, tmp_path):
    image = torch.rand(3, SIZE, SIZE)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    result = optimize_pair(image, "a red circle", "p", _cfg(), _trainer(), tiny_backbone, callbacks=[ckpt])
    path = tmp_path / "last.ckpt"
    assert path.is_file() and path.stat().st_size < 64 * 1024  # mask (16x16) + Adam state + loop state
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state["state_dict"]) == {"mask.raster", "failed", "nonfinite_steps"}
    module = PeekabooModule(image, "a red circle", "p", _cfg(), tiny_backbone)
    module.load_state_dict(state["state_dict"])
    with torch.no_grad():
        assert torch.equal(module()[0, 0], result.alpha)
    assert result.steps == 4


def test_same_seed_same_mask_different_seed_different_mask(tiny_backbone):
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    runs = [optimize_pair(image, "a red circle", "p", _cfg("fourier", seed), _trainer(), tiny_backbone).alpha
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (SIZE, SIZE)


def test_optimization_moves_the_mask_and_logs(tiny_backbone, tmp_path):
    image = torch.rand(3, SIZE, SIZE)
    result = optimize_pair(image, "a red circle", "p", _cfg(), _trainer(3), tiny_backbone, tb_dir=tmp_path)
    assert not torch.allclose(result.alpha, torch.full_like(result.alpha, 0.5))
    assert {"loss/dream", "loss/alpha", "loss/total", "mask/area"} <= set(result.losses)
    assert list((tmp_path / "p").glob("events.out.tfevents.*"))


def _four_pairs():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3, SIZE, SIZE, generator=gen)
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    return images, prompts, [f"pair{i}" for i in range(4)]


def _iou(a, b, threshold=0.5):
    a, b = a > threshold, b > threshold
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def test_batched_pairs_match_unbatched(tiny_backbone):
    images, prompts, ids = _four_pairs()
    for kind in ("raster", "fourier_bilateral"):
        cfg = _cfg(kind)
        batched = optimize_pairs(images, prompts, ids, cfg, _trainer(5), tiny_backbone)
        for i in range(4):
            alone = optimize_pair(images[i], prompts[i], ids[i], cfg, _trainer(5), tiny_backbone)
            # Float noise only: batched and lone convolutions round differently, and Adam turns a gradient
            # near zero into a step of up to lr either way (seen: 2e-3 on one Intel CPU). Coupled pairs (a
            # batch-wide norm, a shared draw) differ by far more.
            assert torch.allclose(batched[i].alpha, alone.alpha, atol=1e-2), kind
            assert _iou(batched[i].alpha, alone.alpha) >= 0.99


def test_non_finite_pair_does_not_stop_the_others(tiny_backbone):
    images, prompts, ids = _four_pairs()
    module = PeekabooModule(images, prompts, ids, _cfg(), tiny_backbone)
    with torch.no_grad():
        module.mask.raster[1] = float("nan")
    before = module.mask.raster.detach().clone()
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    module.training_step(0, 0).backward()
    optimizer.step()
    assert module.failed.tolist() == [False, True, False, False]
    for i in (0, 2, 3):
        assert not torch.equal(module.mask.raster[i], before[i])  # the healthy pairs moved
        assert torch.isfinite(module.mask.raster[i]).all()


def test_all_pairs_non_finite_raises(tiny_backbone):
    from peekaboo.errors import NonFiniteError

    module = PeekabooModule(torch.rand(3, SIZE, SIZE), "a red circle", "p", _cfg(), tiny_backbone)
    with torch.no_grad():
        module.mask.raster.fill_(float("nan"))
    module.on_fit_start()
    with pytest.raises(NonFiniteError, match="non-finite"):
        module.training_step(0, 0)


def test_early_stopping_stops_a_settled_mask(tiny_backbone):
    cfg = _cfg()
    cfg.early_stop.enabled, cfg.early_stop.patience, cfg.early_stop.min_steps = True, 3, 5
    cfg.early_stop.tolerance = 1.0  # every step counts as settled: stops at min_steps
    result = optimize_pair(torch.rand(3, SIZE, SIZE), "a red circle", "p", cfg, _trainer(40), tiny_backbone)
    assert result.steps == 5
    cfg.early_stop.tolerance = -1.0  # never settled: runs to max_steps
    result = optimize_pair(torch.rand(3, SIZE, SIZE), "a red circle", "p", cfg, _trainer(8), tiny_backbone)
    assert result.steps == 8


def _logged_steps(run) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars("loss/total")]


def test_curves_are_built_only_on_the_steps_lightning_writes(tiny_backbone, tmp_path, monkeypatch):
    calls = []
    log_dict = PeekabooModule.log_dict
    monkeypatch.setattr(PeekabooModule, "log_dict",
                        lambda self, *a, **k: (calls.append(self.global_step), log_dict(self, *a, **k)))
    trainer = TrainerConfig(accelerator="cpu", max_steps=12, enable_progress_bar=False, log_every_n_steps=5)
    optimize_pair(torch.rand(3, SIZE, SIZE), "a red circle", "p", _cfg(), trainer, tiny_backbone, tb_dir=tmp_path)
    assert calls == [4, 9]  # steps 5 and 10, counted from 1: what Lightning writes, and nothing else
    assert _logged_steps(tmp_path / "p") == [4, 9]
    calls.clear()
    optimize_pair(torch.rand(3, SIZE, SIZE), "a red circle", "q", _cfg(), trainer, tiny_backbone)
    assert calls == []  # no logger: nothing to build
    # An early-stopped pair also logs the step it stopped at, as Lightning writes that step.
    cfg = _cfg()
    cfg.early_stop.enabled, cfg.early_stop.patience, cfg.early_stop.min_steps = True, 3, 7
    cfg.early_stop.tolerance = 1.0
    result = optimize_pair(torch.rand(3, SIZE, SIZE), "a red circle", "e", cfg, trainer, tiny_backbone, tb_dir=tmp_path)
    assert result.steps == 7
    assert _logged_steps(tmp_path / "e") == [4, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "e"))
    acc.Reload()
    assert acc.Images("mask/alpha")[-1].step == 7  # and its final mask


def test_fit_options_or_their_fields_as_keywords(tiny_backbone, tmp_path):
    image = torch.rand(3, SIZE, SIZE)
    options = FitOptions(tb_dir=tmp_path, enable_progress_bar=False)
    # Keywords replace the options' fields: here the run name, under the options' log folder.
    optimize_pair(image, "a red circle", "p", _cfg(), _trainer(1), tiny_backbone, options, run_name="named")
    assert list((tmp_path / "named").glob("events.out.tfevents.*"))
    with pytest.raises(TypeError, match="tb_dri"):
        optimize_pair(image, "a red circle", "p", _cfg(), _trainer(1), tiny_backbone, tb_dri=tmp_path)


# -- the dream loss points at the named object (the bundled shapes model) -----------------------------------------
# A scene of two objects that differ only in colour ("a green square and a yellow square"): each prompt names one.
SHAPES_SCENE = 6
SHAPES_STEPS = 8  # one cycle of the stratified timesteps (guidance.t_strata = 8)
# How far above the rest of the image, and above the other object, the named object's mean alpha must end (alpha
# starts at 0.5 everywhere). Seen after 8 steps: 0.17 to 0.19 for these pair ids; 0.07 to 0.21 over 16 other
# random streams (pair ids) of either prompt. With no dream-loss gradient, gravity alone moves every pixel alike: 0.
TOWARD_MARGIN = 0.05


@pytest.fixture(scope="module")
def shapes_backbone():
    return shared_backbone(ModelConfig(pretrained="bundled-shapes"))


def _toward_settings() -> OptimizationConfig:
    """A free per-pixel mask from alpha 0.5, so only the losses shape it; otherwise the bundled preset's settings
    (configs/model/shapes.yaml)."""
    cfg = OptimizationConfig(seed=0)
    cfg.mask.kind, cfg.mask.size, cfg.mask.init = "raster", 64, "constant"
    cfg.optim.name, cfg.optim.lr = "adam", 0.2
    cfg.guidance.guidance_scale, cfg.guidance.latent_mode, cfg.guidance.t_schedule = 15.0, "mean", "stratified"
    cfg.loss.gravity = 0.0125
    return cfg


def test_the_dream_loss_moves_the_mask_toward_the_named_object(shapes_backbone):
    scene = make_scene(SHAPES_SCENE, size=64, n_objects=2)
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255  # (3, 64, 64)
    masks = [torch.from_numpy(obj.mask) for obj in scene.objects]  # (64, 64) bool each
    prompts = [obj.prompt for obj in scene.objects]
    assert len(set(prompts)) == 2 and not (masks[0] & masks[1]).any()
    trainer = TrainerConfig(accelerator="cpu", max_steps=SHAPES_STEPS, enable_progress_bar=False)
    results = optimize_pairs(image.expand(2, -1, -1, -1).contiguous(), prompts, ["named0", "named1"],
                             _toward_settings(), trainer, shapes_backbone)
    for named, result in enumerate(results):
        alpha, other = result.alpha, masks[1 - named]  # (64, 64)
        inside, outside = alpha[masks[named]].mean(), alpha[~masks[named]].mean()
        assert inside - outside > TOWARD_MARGIN, (prompts[named], float(inside), float(outside))
        # The other object's prompt ranks the two objects the other way round.
        assert inside - alpha[other].mean() > TOWARD_MARGIN, (prompts[named], float(inside), float(alpha[other].mean()))
