"""SDXL-format checkpoints on a tiny SDXL built from config (tests/tiny.py): two text encoders, the UNet's
``text_time`` conditioning on every call, the float16 VAE upcast, and predict / a dataset run / a resume end to
end. diffusers' own ``StableDiffusionXLPipeline`` is the reference for the embeddings and the UNet's inputs.
What SDXL support still refuses is in tests/test_gpu_runs.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from tests_support import FAST, REPO, REPO_CONFIGS, write_scene

from peekaboo.app.cli import predict_main, train_main
from peekaboo.config import GuidanceConfig, ModelConfig, PredictConfig, RegionsConfig, RestartsConfig, load_config
from peekaboo.diffusion import checks
from peekaboo.diffusion.attention import cross_attention_map
from peekaboo.diffusion.loading import load_backbone
from peekaboo.diffusion.prompts import PromptEmbeddings
from peekaboo.errors import EXIT_PREEMPTED
from peekaboo.optim.regions import ranked_regions
from peekaboo.optim.restarts import prompt_fit

SIDE = 32  # the tiny SDXL's native canvas: UNet sample_size 8 x VAE factor 4
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_model):
    return load_backbone(ModelConfig(pretrained=str(tiny_sdxl_model)))


@pytest.fixture(scope="module")
def reference_pipe(tiny_sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)


def _copy_with(model: Path, tmp_path: Path, sub: str, name: str, **edits) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    file = folder / sub / name
    file.write_text(json.dumps({**json.loads(file.read_text()), **edits}))
    return folder


# -- loading and the embeddings ------------------------------------------------------------------------------------
def test_a_tiny_sdxl_loads_with_both_text_encoders_at_its_native_canvas(sdxl):
    from transformers import CLIPTextModelWithProjection

    assert sdxl.sdxl and isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl.native_resolution == sdxl.resolution == SIDE
    assert sdxl.zero_empty_prompt  # model_index.json: force_zeros_for_empty_prompt, as SDXL base's
    assert all(not p.requires_grad for m in sdxl.models for p in m.parameters())


def test_the_prompt_embeddings_are_diffusers_encode_prompt(sdxl, reference_pipe):
    emb = sdxl.encode_prompt(PROMPT)
    cond, uncond, pooled, pooled_uncond = reference_pipe.encode_prompt(PROMPT, device="cpu",
                                                                      do_classifier_free_guidance=True)
    assert emb.cond.shape == (1, 16, 32 + 48) and emb.pooled_cond.shape == (1, 24)  # both encoders, concatenated
    torch.testing.assert_close(emb.cond, cond)
    torch.testing.assert_close(emb.pooled_cond, pooled)
    torch.testing.assert_close(emb.uncond, uncond)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(emb.pooled_uncond, pooled_uncond)
    assert not emb.uncond.any() and not emb.pooled_uncond.any()


def test_without_force_zeros_the_unconditional_embedding_is_the_empty_prompts(tiny_sdxl_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = _copy_with(tiny_sdxl_model, tmp_path, "", "model_index.json", force_zeros_for_empty_prompt=False)
    backbone = load_backbone(ModelConfig(pretrained=str(folder)))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    _, uncond, _, pooled_uncond = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    emb = backbone.encode_prompt(PROMPT)
    assert not backbone.zero_empty_prompt and emb.uncond.any()
    torch.testing.assert_close(emb.uncond, uncond)
    torch.testing.assert_close(emb.pooled_uncond, pooled_uncond)


def test_the_unet_gets_diffusers_time_ids_and_pooled_embedding(sdxl, reference_pipe):
    gen = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700])
    emb = sdxl.encode_prompt(PROMPT)
    eps_u, eps_c = sdxl.predict_noise(noisy, t, emb)
    time_ids = reference_pipe._get_add_time_ids((SIDE, SIDE), (0, 0), (SIDE, SIDE), torch.float32,
                                                text_encoder_projection_dim=24)  # (1, 6)
    for eps, hidden, pooled in ((eps_u, emb.uncond, emb.pooled_uncond), (eps_c, emb.cond, emb.pooled_cond)):
        with torch.no_grad():
            expected = reference_pipe.unet(noisy, t, encoder_hidden_states=hidden.expand(2, -1, -1),
                                           added_cond_kwargs={"text_embeds": pooled.expand(2, -1),
                                                              "time_ids": time_ids.expand(2, -1)}).sample
        torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps_u, eps_c)


def test_a_unet_call_without_the_pooled_embedding_is_refused(sdxl):
    emb = sdxl.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match="pooled text embeddings"):
        sdxl.run_unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), emb.cond)
    with pytest.raises(ValueError, match="pooled text embeddings"):
        sdxl.predict_eps([torch.zeros(1, 4, 8, 8)], [torch.tensor([10])], [emb.cond])


class _UnetCalls:
    """Records the added conditioning of every UNet call (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls: list[tuple[int, dict]] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs.get("added_cond_kwargs")))

    def check(self, side: int = SIDE) -> None:
        assert self.calls
        for rows, added in self.calls:
            assert added is not None and added["text_embeds"].shape == (rows, 24)
            assert added["time_ids"].tolist() == [[side, side, 0, 0, side, side]] * rows
        self.calls.clear()


@pytest.fixture
def unet_calls(sdxl):
    calls = _UnetCalls(sdxl.unet)
    yield calls
    calls.handle.remove()


@pytest.mark.parametrize("estimator,batch_cfg,draws", [("sds", True, 1), ("sds", False, 2), ("nfsd", True, 1),
                                                        ("full", True, 1)])
def test_every_dream_loss_unet_call_takes_the_added_conditioning(sdxl, unet_calls, estimator, batch_cfg, draws):
    cfg = GuidanceConfig(estimator=estimator, batch_cfg=batch_cfg, samples_per_step=draws,
                         nfsd_negative_prompt="a dog", guidance_scale=7.5)
    images = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    latents = sdxl.encode_images(images, "mean").requires_grad_()
    emb = PromptEmbeddings.stack([sdxl.encode_prompt(PROMPT), sdxl.encode_prompt("a blue square")])
    terms = sdxl.dream_loss(latents, emb, cfg, [torch.Generator().manual_seed(i) for i in range(2)])
    terms["loss"].sum().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    unet_calls.check()
    one = sdxl.dream_loss(latents[1:], emb.select(torch.tensor([1])), cfg, [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(one["loss"], terms["loss"][1:], rtol=1e-4, atol=1e-4)  # a pair's rows are its own
    unet_calls.check()


def test_cross_attention_restarts_and_regions_take_the_added_conditioning(sdxl, unet_calls):
    image = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    heat = cross_attention_map(sdxl, image, PROMPT)
    assert heat.shape == (SIDE, SIDE) and torch.isfinite(heat).all()
    unet_calls.check()
    for fit in ("error", "error_ratio"):
        scores = prompt_fit(sdxl, image[None].expand(2, -1, -1, -1), torch.rand(2, 1, SIDE, SIDE), [PROMPT] * 2,
                            ["p", "p"], RestartsConfig(draws=2, fit=fit), seed=0)
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        unet_calls.check()
    regions = ranked_regions(sdxl, image, PROMPT, "p", RegionsConfig(draws=2, scale=20.0, min_area=0.01), seed=0)
    assert len(regions) > 1 and regions.shape[1:] == (SIDE, SIDE)  # a noise image: many regions to rank
    unet_calls.check()


def test_the_time_ids_follow_the_encoded_side(sdxl, unet_calls):
    sdxl.check_encode_resolution(64)
    latents = sdxl.encode_images(torch.rand(1, 3, SIDE, SIDE), "mean", resolution=64)  # (1, 4, 16, 16)
    sdxl.dream_loss(latents, sdxl.encode_prompt(PROMPT), GuidanceConfig(), [torch.Generator().manual_seed(0)])
    unet_calls.check(side=64)


# -- the VAE's float16 limits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,dtype,vae_upcast,expected", [
    ("sdxl", "float16", None, torch.float32),  # SDXL's VAE config says force_upcast: it stays float32
    ("sdxl", "float16", False, torch.float16),  # a VAE fixed for float16 says force_upcast: false
    ("sdxl", "bfloat16", None, torch.bfloat16),  # bfloat16 has float32's range
    ("sd", "float16", None, torch.float16),  # SD 1.x/2.x VAEs run in float16, as diffusers runs them
])
def test_the_vae_dtype_follows_force_upcast_for_sdxl_in_float16(tiny_model, tiny_sdxl_model, tmp_path, monkeypatch,
                                                                model, dtype, vae_upcast, expected):
    monkeypatch.setattr(checks, "check_dtype", lambda *args: None)  # float16 is refused on CPU: loading only here
    folder = tiny_sdxl_model if model == "sdxl" else tiny_model
    if vae_upcast is not None:
        folder = _copy_with(folder, tmp_path, "vae", "config.json", force_upcast=vae_upcast)
    backbone = load_backbone(ModelConfig(pretrained=str(folder), dtype=dtype))
    assert backbone.dtype == getattr(torch, dtype) and backbone.vae.dtype == expected
    assert backbone._vae_input(torch.rand(1, 3, SIDE, SIDE)).dtype == expected  # what the encoder takes


def test_float16_sampling_never_casts_the_backbones_float32_vae(tiny_sdxl_model, monkeypatch):
    """diffusers' SDXL pipelines cast their VAE to float16 and back; they get a copy, so the segmentation's VAE keeps
    its float32 weights (float16 on the CPU is refused for users; these kernels exist on the CPU, so it runs here)."""
    from peekaboo.app import edit
    from peekaboo.config import EditConfig, SamplingConfig
    from peekaboo.diffusion import pipelines

    monkeypatch.setattr(checks, "check_dtype", lambda *args: None)
    cfg = ModelConfig(pretrained=str(tiny_sdxl_model), dtype="float16")
    backbone = load_backbone(cfg)
    before = {k: v.clone() for k, v in backbone.vae.state_dict().items()}
    latents = backbone.encode_images(torch.rand(1, 3, SIDE, SIDE), "mean").requires_grad_()
    backbone.dream_loss(latents, backbone.encode_prompt(PROMPT), GuidanceConfig(),
                        [torch.Generator().manual_seed(0)])["loss"].sum().backward()
    assert torch.isfinite(latents.grad).all()
    assert pipelines.generate(backbone, PROMPT, SamplingConfig(steps=2), cfg).size == (SIDE, SIDE)
    image = Image.fromarray(np.zeros((30, 52, 3), np.uint8))
    edited = edit.edit_region(backbone, image, np.ones((30, 52), bool), "a dog", EditConfig(), SamplingConfig(steps=2),
                              cfg)
    assert edited.image.size == (52, 30)
    assert backbone.vae.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in backbone.vae.state_dict().items())


# -- the model=sdxl preset -----------------------------------------------------------------------------------------
def test_the_sdxl_preset_scales_sd15s_settings_to_the_1024_canvas():
    base = ["image=x.png", "prompt=a"]
    sd15 = load_config(PredictConfig, [*base, "model=sd15"], REPO_CONFIGS, "predict")
    sdxl = load_config(PredictConfig, [*base, "model=sdxl"], REPO_CONFIGS, "predict")
    assert sdxl.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    a, b = sd15.optimization, sdxl.optimization
    assert b.mask.size == 2 * a.mask.size and b.mask.bilateral.iterations == 4 * a.mask.bilateral.iterations
    assert b.optim.lr == pytest.approx(a.optim.lr / 4)
    assert (b.mask.kind, b.loss, b.guidance, sdxl.trainer.max_steps) == (a.mask.kind, a.loss, a.guidance,
                                                                        sd15.trainer.max_steps)


# -- end to end: predict.py, a dataset run, a resume ---------------------------------------------------------------
PREDICT = [*FAST, "trainer.max_steps=3", "tensorboard=false"]


@pytest.mark.parametrize("starts", [
    [],  # the bundled preset's region start
    ["optimization.mask.init=cross_attention"],
    ["optimization.mask.init=constant", "optimization.restarts.count=2", "optimization.restarts.fit=error_ratio"],
    ["optimization.guidance.estimator=nfsd", "optimization.guidance.nfsd_negative_prompt=a dog"],
    ["model=sdxl", "optimization.mask.size=16", "optimization.mask.bilateral.iterations=3",  # the preset, made tiny
     "optimization.mask.fourier.hidden=8"],
])
def test_predict_segments_with_a_tiny_sdxl(tiny_sdxl_model, tmp_path, starts):
    image = write_scene(tmp_path / "scene.png")
    out = tmp_path / "out"
    code = predict_main([f"image={image}", f"prompt={PROMPT}", "prompt=a blue square",
                         f"model.pretrained={tiny_sdxl_model}", f"output_dir={out}", *PREDICT, *starts], REPO_CONFIGS)
    assert code == 0
    for prompt in ("a_red_circle", "a_blue_square"):
        mask = Image.open(out / "scene" / prompt / "mask.png")
        assert mask.size == (52, 30) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_predict_edits_and_generates_with_a_tiny_sdxl(tiny_sdxl_model, tmp_path):
    image = write_scene(tmp_path / "scene.png")
    sampling = ["sampling.steps=2", "optimization.mask.init=constant", "optimization.mask.init_logit=3",
                "optimization.loss.gravity=0"]  # a full mask: the edit has a region to regenerate
    code = predict_main([f"image={image}", f"prompt={PROMPT}", "edit.prompt=a blue square",
                         f"model.pretrained={tiny_sdxl_model}", f"output_dir={tmp_path / 'edit'}", *PREDICT, *sampling],
                        REPO_CONFIGS)
    assert code == 0
    edited = Image.open(tmp_path / "edit" / "scene" / "a_red_circle" / "edited.png")
    assert edited.size == (52, 30)
    assert not np.array_equal(np.asarray(edited), np.asarray(Image.open(image)))
    code = predict_main([f"generate={PROMPT}", f"model.pretrained={tiny_sdxl_model}",
                         f"output_dir={tmp_path / 'gen'}", *PREDICT, "sampling.steps=2"], REPO_CONFIGS)
    assert code == 0
    assert Image.open(tmp_path / "gen" / "a_red_circle" / "sample.png").size == (SIDE, SIDE)


@pytest.mark.slow
def test_predict_py_runs_a_tiny_sdxl(tiny_sdxl_model, tmp_path):
    image = write_scene(tmp_path / "scene.png")
    proc = subprocess.run([sys.executable, str(REPO / "predict.py"), f"image={image}", f"prompt={PROMPT}",
                           f"model.pretrained={tiny_sdxl_model}", f"output_dir={tmp_path / 'out'}", *PREDICT],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "out" / "scene" / "a_red_circle" / "mask.png").size == (52, 30)


STEPS = 6


def _train_args(model: Path, root: Path, name: str) -> list[str]:
    return [*FAST, f"model.pretrained={model}", f"run.root={root}", f"run.name={name}", "data=shapes",
            "data.num_pairs=2", f"trainer.max_steps={STEPS}", "data.pairs_per_step=1",
            f"run.checkpoint_every_n_steps={STEPS // 2}", "run.logger=none"]


def _masks(run: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((run / "masks").glob("*.png"))}


def _done(run: Path) -> list[str]:
    return sorted(p.parent.name for p in run.glob("pairs/*/done.json"))


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_model, tmp_path_factory) -> Path:
    """An uninterrupted dataset run (train.py's train_main) of two pairs on the tiny SDXL."""
    root = tmp_path_factory.mktemp("sdxl-run")
    assert train_main(_train_args(tiny_sdxl_model, root, "ref"), REPO_CONFIGS) == 0
    return root / "ref"


def test_a_dataset_run_on_a_tiny_sdxl(sdxl_run):
    assert len(_done(sdxl_run)) == 2 and len(_masks(sdxl_run)) == 2
    results = [json.loads(line) for line in (sdxl_run / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and not any(r.get("failed") for r in results)


def test_an_interrupted_sdxl_run_resumes_from_its_checkpoint_to_the_same_masks(tiny_sdxl_model, sdxl_run, tmp_path,
                                                                                 monkeypatch):
    from peekaboo.optim.module import PeekabooModule

    original, saves = ModelCheckpoint._save_checkpoint, {"mid": 0}

    def preempted_after_a_checkpoint(self, trainer, *args, **kwargs):
        result = original(self, trainer, *args, **kwargs)
        if trainer.global_step == STEPS // 2:
            saves["mid"] += 1
            if saves["mid"] == 2:  # the second pair's mid-run checkpoint is on disk: SIGTERM, as a scheduler sends
                os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", preempted_after_a_checkpoint)
    args = _train_args(tiny_sdxl_model, tmp_path, "r")
    assert train_main(args, REPO_CONFIGS) == EXIT_PREEMPTED
    run = tmp_path / "r"
    assert len(_done(run)) == 1 and list(run.glob("pairs/*/ckpt/last.ckpt"))
    monkeypatch.undo()
    step, steps = PeekabooModule.training_step, []

    def counted(self, *args, **kwargs):
        steps.append(self.global_step)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(PeekabooModule, "training_step", counted)
    assert train_main(args, REPO_CONFIGS) == 0
    assert steps and steps[0] >= STEPS // 2 and len(steps) <= STEPS - STEPS // 2  # resumed, not restarted
    assert _done(run) == _done(sdxl_run)
    ref, resumed = _masks(sdxl_run), _masks(run)
    assert ref.keys() == resumed.keys() and all(np.array_equal(ref[k], resumed[k]) for k in ref)
