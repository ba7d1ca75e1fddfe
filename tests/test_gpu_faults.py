"""What a GPU user hits at dataset scale, simulated on the CPU: out-of-memory back-off that frees the failed attempt,
early-stopping state that follows the module's device after a resume, no 16-mixed, non-finite model outputs that
fail a pair, the final mask rendered before Lightning's teardown (and a thread cap for GPU workers), and the
deterministic-kernel switch. ``tests/test_gpu.py`` checks the same on a real device."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tests_support import FAST, MODULE_SIZE, REPO_CONFIGS
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo import ops
from peekaboo.config import EarlyStopConfig, TrainConfig, TrainerConfig, load_config
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import ConfigError, NonFiniteError, PeekabooError
from peekaboo.optim.callbacks import StableMaskStop
from peekaboo.optim.engine import optimize_pair, optimize_pairs, split_on_oom
from peekaboo.optim.module import NONFINITE_STEPS, PeekabooModule

SIZE = MODULE_SIZE
OOM = "CUDA out of memory (simulated)"


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


# -- 1. out-of-memory back-off -----------------------------------------------------------------------------------
def test_an_out_of_memory_retry_starts_after_the_failed_attempt_is_freed():
    attempts: list[weakref.ref] = []  # the latents of each attempt that ran out of memory
    alive_at_retry: list[bool] = []

    def run(items: list[int]) -> list[int]:
        alive_at_retry.extend(ref() is not None for ref in attempts)
        if len(items) > 1:  # a device that holds one pair
            latents = torch.zeros(64)
            graph = {"latents": latents}
            graph["self"] = graph  # a reference cycle, as Lightning's trainer, module and callbacks make
            attempts.append(weakref.ref(latents))
            raise torch.cuda.OutOfMemoryError(OOM)
        return items

    assert split_on_oom([1, 2, 3], run) == [1, 2, 3]
    assert len(attempts) == 2 and alive_at_retry  # [1, 2, 3] and then [2, 3] ran out
    assert not any(alive_at_retry), "a retry ran while a failed attempt's tensors were still alive"


def test_a_pair_that_alone_does_not_fit_stops_with_one_line_and_no_chained_tracebacks():
    def never_fits(items):
        raise torch.cuda.OutOfMemoryError(OOM)

    with pytest.raises(PeekabooError, match="alone does not fit in accelerator memory") as info:
        split_on_oom([1, 2, 3, 4], never_fits)
    # No exception context: a chained out-of-memory error would keep the failed step's frames (and tensors) alive.
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert "\n" not in str(info.value)


def test_a_dataset_run_where_one_pair_does_not_fit_stops_with_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    from peekaboo.app.cli import train_main

    def no_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(Backbone, "predict_eps", no_memory)
    code = train_main([*FAST, f"model.pretrained={tiny_model}", f"run.root={tmp_path}", "run.name=oom", "data=shapes",
                       "data.num_pairs=2", "data.pairs_per_step=2"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "alone does not fit in accelerator memory" in lines[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "oom").glob("pairs/*/done.json"))  # nothing recorded as done: a rerun redoes them


# -- 2. early-stopping state after a resume ----------------------------------------------------------------------
def _stop_state(pairs: int, device: str = "cpu") -> dict:
    return {"calm": torch.zeros(pairs, dtype=torch.long, device=device),
            "previous": torch.zeros(pairs, SIZE * SIZE, dtype=torch.bool, device=device),
            "ema": torch.ones(pairs, device=device), "best": torch.ones(pairs, device=device),
            "since": torch.zeros(pairs, dtype=torch.long, device=device),
            "stopped": torch.zeros(pairs, dtype=torch.bool, device=device)}


def test_early_stop_state_loaded_on_the_cpu_follows_the_module_device(tiny_backbone, tmp_path, monkeypatch):
    # Lightning loads a checkpoint onto the CPU; on a GPU the module is elsewhere ("meta" stands in for it here).
    module = SimpleNamespace(device=torch.device("meta"))
    stop = StableMaskStop(EarlyStopConfig(enabled=True, loss_tolerance=0.01), 0.5)
    stop.load_state_dict(_stop_state(2))
    stop.on_fit_start(SimpleNamespace(), module)
    assert {k: v.device.type for k, v in stop.state_dict().items()} == dict.fromkeys(_stop_state(2), "meta")
    old = StableMaskStop(EarlyStopConfig(enabled=True), 0.5)  # a checkpoint of one batch-wide count
    old.load_state_dict({"previous": torch.zeros(2, SIZE * SIZE, dtype=torch.bool), "calm_steps": 3})
    old.on_fit_start(SimpleNamespace(), module)
    assert old.calm.device.type == old.previous.device.type == "meta"

    # And Lightning calls on_fit_start after it restores the callback's state and before the first step uses it.
    events: list[str] = []
    for name in ("load_state_dict", "on_fit_start", "on_train_batch_end"):
        original = getattr(StableMaskStop, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(StableMaskStop, name, spy)
    cfg = _cfg()
    cfg.early_stop.enabled, cfg.early_stop.tolerance = True, -1.0  # never settles: the run goes on
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    optimize_pairs(_images(2), ["a red circle", "a blue square"], ["a", "b"], cfg, _trainer(4), tiny_backbone,
                   callbacks=[ckpt])
    events.clear()
    optimize_pairs(_images(2), ["a red circle", "a blue square"], ["a", "b"], cfg, _trainer(4), tiny_backbone,
                   ckpt_path=tmp_path / "step=2.ckpt")
    assert events[:3] == ["load_state_dict", "on_fit_start", "on_train_batch_end"]


# -- 6. 16-mixed -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_16_mixed_is_refused_with_what_to_use_instead(precision):
    with pytest.raises(ConfigError, match=r"trainer\.precision") as info:
        load_config(TrainConfig, ["run.name=x", f"trainer.precision={precision}"], REPO_CONFIGS, "train")
    message = str(info.value)
    assert "bf16-mixed" in message and "32-true" in message and "GradScaler" in message
    load_config(TrainConfig, ["run.name=x", "trainer.precision=bf16-mixed"], REPO_CONFIGS, "train")


# -- 7. non-finite model outputs ---------------------------------------------------------------------------------
class _Guidance(Callback):
    """Each step's per-pair ``guidance/nonfinite`` values."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(pl_module.last_guidance["guidance/nonfinite"].tolist())


def _first_pair_outputs_nan(monkeypatch) -> None:
    original = Backbone.predict_eps

    def first_pair_nan(self, noisy, *args, **kwargs):  # an fp16 UNet that overflows on pair 0's latents only
        outs = original(self, noisy, *args, **kwargs)
        for out in outs:  # per row group, rows in pair order
            out[0] = float("nan")
        return outs

    monkeypatch.setattr(Backbone, "predict_eps", first_pair_nan)


def test_non_finite_model_outputs_are_counted_logged_and_fail_their_pair(tiny_backbone, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _first_pair_outputs_nan(monkeypatch)
    seen = _Guidance()
    steps = NONFINITE_STEPS + 2
    results = optimize_pairs(_images(2), ["a red circle", "a blue square"], ["a", "b"], _cfg(), _trainer(steps),
                             tiny_backbone, tb_dir=tmp_path, callbacks=[seen])
    assert results[0].failed and not results[1].failed
    latent = 4 * (32 // 4) ** 2  # every entry of the tiny model's (4, 8, 8) latents
    assert [s[0] for s in seen.steps[:NONFINITE_STEPS]] == [latent] * NONFINITE_STEPS
    assert all(s[1] == 0 for s in seen.steps)
    acc = EventAccumulator(str(tmp_path / "a"))  # the pair's own run
    acc.Reload()
    assert [e.value for e in acc.Scalars("guidance/nonfinite")][:3] == [latent] * 3
    # A one-pair fit whose every step is non-finite fails, with the hint, even when shorter than NONFINITE_STEPS.
    with pytest.raises(NonFiniteError, match=r"non-finite loss or mask .*model output.*lower optimization\.optim\.lr"):
        optimize_pair(_images(1)[0], "a red circle", "a", _cfg(), _trainer(3), tiny_backbone)


def test_a_resumed_pair_keeps_its_non_finite_streak(tiny_backbone, tmp_path, monkeypatch):
    # Resumed after 4 of NONFINITE_STEPS + 2 steps, pair "a" has only NONFINITE_STEPS - 2 left: it fails only if
    # the streak of the first 4 came back with the checkpoint.
    _first_pair_outputs_nan(monkeypatch)
    images, prompts, ids, steps = _images(2), ["a red circle", "a blue square"], ["a", "b"], NONFINITE_STEPS + 2
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=4)
    optimize_pairs(images, prompts, ids, _cfg(), _trainer(steps), tiny_backbone, callbacks=[ckpt])
    state = torch.load(tmp_path / "step=4.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"]["nonfinite_steps"].tolist() == [4, 0]
    streak = state["state_dict"].pop("nonfinite_steps")
    torch.save(state | {"nonfinite_steps": streak}, tmp_path / "beside.ckpt")  # where older versions kept it
    torch.save(state, tmp_path / "none.ckpt")  # from before it was counted: no streak
    for name, fails in (("step=4.ckpt", True), ("beside.ckpt", True), ("none.ckpt", False)):
        results = optimize_pairs(images, prompts, ids, _cfg(), _trainer(steps), tiny_backbone,
                                 ckpt_path=tmp_path / name)
        assert [r.failed for r in results] == [fails, False], name


def test_a_pair_with_a_few_non_finite_steps_goes_on(tiny_backbone, monkeypatch):
    original, calls = Backbone.predict_eps, []

    def sometimes_nan(self, noisy, *args, **kwargs):
        outs = original(self, noisy, *args, **kwargs)
        calls.append(1)
        if len(calls) % 2:  # every other step
            outs[0][0, 0, 0, 0] = float("inf")
        return outs

    monkeypatch.setattr(Backbone, "predict_eps", sometimes_nan)
    seen = _Guidance()
    result = optimize_pair(_images(1)[0], "a red circle", "a", _cfg(), _trainer(NONFINITE_STEPS + 2), tiny_backbone,
                           callbacks=[seen])
    assert not result.failed and torch.isfinite(result.alpha).all()
    assert [s[0] for s in seen.steps[:4]] == [1, 0, 1, 0]


# -- 9. the final mask and the workers' threads ------------------------------------------------------------------
def test_the_final_mask_is_rendered_before_lightning_moves_the_module_to_the_cpu(tiny_backbone, tmp_path,
                                                                                  monkeypatch):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    torn_down, renders = [False], []
    teardown = SingleDeviceStrategy.teardown

    def spy_teardown(self):  # on a GPU this moves the module (and its mask) to the CPU
        torn_down[0] = True
        return teardown(self)

    forward = PeekabooModule.forward

    def spy_forward(self):
        renders.append(torn_down[0])
        return forward(self)

    monkeypatch.setattr(SingleDeviceStrategy, "teardown", spy_teardown)
    monkeypatch.setattr(PeekabooModule, "forward", spy_forward)
    cfg = _cfg("fourier_bilateral")
    result = optimize_pair(_images(1)[0], "a red circle", "a", cfg, _trainer(2), tiny_backbone)
    assert torn_down[0] and renders
    assert not any(renders), "the mask was rendered after Lightning's teardown"
    assert result.alpha.device.type == "cpu" and result.alpha.shape == (SIZE, SIZE)
    # A checkpoint with no step left: no loop runs, and the module goes back to the fit's device to render.
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    whole = optimize_pair(_images(1)[0], "a red circle", "a", cfg, _trainer(2), tiny_backbone, callbacks=[ckpt])
    again = optimize_pair(_images(1)[0], "a red circle", "a", cfg, _trainer(2), tiny_backbone,
                          ckpt_path=tmp_path / "step=2.ckpt")
    assert torch.equal(whole.alpha, again.alpha) and again.steps == 2


def test_a_gpu_worker_caps_its_cpu_threads_as_a_cpu_worker_does(monkeypatch):
    from omegaconf import OmegaConf

    from peekaboo.config import to_yaml
    from peekaboo.runs import workers

    threads = []
    monkeypatch.setattr(workers, "run_worker", lambda cfg, world, spawned=False: 0)
    monkeypatch.setattr(workers, "setup_logging", lambda: None)
    monkeypatch.setattr(workers, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cfg = OmegaConf.structured(TrainConfig)
    cfg.trainer.accelerator = "gpu"
    with pytest.raises(SystemExit):
        workers._worker_entry(to_yaml(cfg), workers.World(1, 4, 1))
    assert threads == [4]


# -- 13. deterministic kernels -----------------------------------------------------------------------------------
class _Flags(Callback):
    def __init__(self) -> None:
        self.flags: list[tuple[bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flags.append((torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled()))


def test_trainer_deterministic_reaches_the_fit_and_a_resume_gives_the_same_mask(tiny_backbone, tmp_path):
    assert load_config(TrainConfig, ["run.name=x", "trainer.deterministic=true"], REPO_CONFIGS,
                       "train").trainer.deterministic is True
    det = TrainerConfig(accelerator="cpu", max_steps=4, enable_progress_bar=False, deterministic=True)
    image, cfg = _images(1)[0], _cfg("fourier_bilateral")
    flags = _Flags()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=2)
    whole = optimize_pair(image, "a red circle", "a", cfg, det, tiny_backbone, callbacks=[flags, ckpt])
    # PyTorch's deterministic kernels where they exist; an operation without one warns (in the log) instead of
    # stopping the run.
    assert flags.flags == [(True, True)] * 4
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back after the fit
    resumed = optimize_pair(image, "a red circle", "a", cfg, det, tiny_backbone, ckpt_path=tmp_path / "step=2.ckpt")
    assert torch.equal(whole.alpha, resumed.alpha)
    off = _Flags()
    free = optimize_pair(image, "a red circle", "a", cfg, _trainer(4), tiny_backbone, callbacks=[off])
    assert off.flags == [(False, False)] * 4
    assert torch.equal(whole.alpha, free.alpha)  # on the CPU the kernels were deterministic already


def test_the_resampling_of_deterministic_runs_is_bilinear_and_area_resizing_as_matrix_products():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 12, generator=gen, requires_grad=True)
    up = torch.randn(2, 3, 32, 32, generator=gen)
    for side, mode, reference in ((32, "bilinear", lambda t: F.interpolate(t, size=(32, 32), mode="bilinear",
                                                                           align_corners=False)),
                                  (8, "bilinear", lambda t: F.interpolate(t, size=(8, 8), mode="bilinear",
                                                                          align_corners=False)),
                                  (5, "area", lambda t: F.adaptive_avg_pool2d(t, (5, 5)))):
        mine = ops.resample(x, (side, side), mode, matrices=True)
        theirs = reference(x)
        assert torch.allclose(mine, theirs, atol=1e-6), (side, mode)
        (g_mine,) = torch.autograd.grad(mine, x, up[..., :side, :side])
        (g_theirs,) = torch.autograd.grad(theirs, x, up[..., :side, :side])
        assert torch.allclose(g_mine, g_theirs, atol=1e-5), (side, mode)
        assert torch.equal(ops.resample(x, (side, side), mode), theirs)  # the default: PyTorch's own kernels
