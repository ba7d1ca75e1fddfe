"""The frozen backbone: loading, errors, and the dream-loss gradient against a hand computation."""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from peekaboo import ops
from peekaboo.config import GuidanceConfig, ModelConfig
from peekaboo.diffusion.loading import load_backbone
from peekaboo.errors import ModelError


def _hand_gradient(backbone, latents, prompt, cfg, seed):
    """w(t) (eps_u + s (eps_c - eps_u) - eps), replaying the generator's draws in the backbone's order."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(latents.shape[0])]
    t = torch.cat([backbone.sample_timestep(cfg, g) for g in gens])
    eps = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
    abar = backbone.alphas_cumprod[t]
    zt = abar.sqrt().view(-1, 1, 1, 1) * latents + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    emb = backbone.encode_prompt(prompt)
    b = latents.shape[0]
    with torch.no_grad():
        out_u = backbone.unet(zt, t, encoder_hidden_states=emb.uncond.expand(b, -1, -1)).sample
        out_c = backbone.unet(zt, t, encoder_hidden_states=emb.cond.expand(b, -1, -1)).sample
    if backbone.prediction_type == "v_prediction":
        a = abar.view(-1, 1, 1, 1)
        out_u = a.sqrt() * out_u + (1 - a).sqrt() * zt
        out_c = a.sqrt() * out_c + (1 - a).sqrt() * zt
    w = (1 - abar).view(-1, 1, 1, 1)
    return w * (out_u + cfg.guidance_scale * (out_c - out_u) - eps)


@pytest.mark.parametrize("fixture,prediction", [("tiny_model", "epsilon"), ("tiny_v_model", "v_prediction")])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_dream_loss_gradient_matches_hand_computation(request, fixture, prediction, batch_cfg):
    backbone = load_backbone(ModelConfig(pretrained=str(request.getfixturevalue(fixture))))
    assert backbone.prediction_type == prediction
    cfg = GuidanceConfig(guidance_scale=7.5, batch_cfg=batch_cfg)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    terms = backbone.dream_loss(latents, backbone.encode_prompt("a red circle"), cfg, gens)
    terms["loss"].sum().backward()
    expected = _hand_gradient(backbone, latents.detach(), "a red circle", cfg, seed=7)
    assert torch.allclose(latents.grad, expected, atol=1e-5)
    lo, hi = int(0.02 * 1000), int(0.98 * 1000)
    assert ((terms["t"] >= lo) & (terms["t"] < hi)).all()


def test_backbone_is_frozen_and_not_a_module(tiny_backbone):
    assert not isinstance(tiny_backbone, torch.nn.Module)
    for model in (tiny_backbone.vae, tiny_backbone.unet, tiny_backbone.text_encoder):
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())


def test_native_resolution_and_encoding(tiny_backbone):
    assert tiny_backbone.resolution == 32  # unet sample_size 8 x VAE factor 4
    images = torch.rand(2, 3, 20, 20, requires_grad=True)
    latents = tiny_backbone.encode_images(images, "mean")
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    latents.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # gradients flow through the encoder
    a = tiny_backbone.encode_images(images, "sample", [torch.Generator().manual_seed(i) for i in range(2)])
    b = tiny_backbone.encode_images(images, "sample", [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(a, b)


def test_prompt_embeddings_are_cached(tiny_backbone):
    a = tiny_backbone.encode_prompt("a red circle")
    b = tiny_backbone.encode_prompt("a red circle")
    assert a.cond is b.cond and a.uncond is b.uncond
    assert not torch.equal(a.cond, a.uncond)


def test_long_prompt_is_truncated_with_warning(tiny_backbone, caplog):
    ids = tiny_backbone.tokenize(" ".join(["red circle"] * 20))
    assert ids.shape == (1, 16)
    assert "truncated to its first 14 tokens" in caplog.text


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_backbone(ModelConfig(pretrained=str(tmp_path / "nope")))


def test_missing_component(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path / "m")
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelError, match="vae/"):
        load_backbone(ModelConfig(pretrained=str(model)))


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ModelError, match=r"model_index\.json"):
        load_backbone(ModelConfig(pretrained=str(tmp_path)))


def test_non_sd_pipeline(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path / "m")
    index = json.loads((model / "model_index.json").read_text())
    index = {"_class_name": "DDPMPipeline", "unet": index["unet"], "scheduler": index["scheduler"]}
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="DDPMPipeline pipeline without vae, text_encoder, tokenizer"):
        load_backbone(ModelConfig(pretrained=str(model)))


def test_unsupported_prediction_type(tiny_model, tmp_path):
    model = _copy(tiny_model, tmp_path / "m")
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ModelError, match="predicts 'sample'"):
        load_backbone(ModelConfig(pretrained=str(model)))


def test_float16_on_cpu_is_refused(tiny_model):
    with pytest.raises(ModelError, match="float16 is not supported on CPU"):
        load_backbone(ModelConfig(pretrained=str(tiny_model), dtype="float16"))


def test_sds_gradient_and_backbone_agree_on_weighting(tiny_backbone):
    abar = tiny_backbone.alphas_cumprod[torch.tensor([500])]
    grad = ops.sds_gradient(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), torch.ones(1, 4, 1, 1), abar, 100.0)
    assert torch.allclose(grad, -(1 - abar) * torch.ones(1, 4, 1, 1))


def test_attention_switch_sets_the_processors_and_keeps_the_outputs(tiny_model):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    outputs = {}
    for kind, processor in (("sdpa", AttnProcessor2_0), ("classic", AttnProcessor)):
        backbone = load_backbone(ModelConfig(pretrained=str(tiny_model), attention=kind))
        for model in (backbone.unet, backbone.vae):
            assert model.attn_processors and all(type(p) is processor for p in model.attn_processors.values())
        torch.manual_seed(0)
        images = torch.rand(2, 3, 32, 32)
        noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
        latents = backbone.encode_images(images, "mean")
        eps_u, eps_c = backbone.predict_noise(noisy, t, backbone.encode_prompt("a red circle"))
        outputs[kind] = (latents.detach(), eps_u, eps_c)
    for fast, classic in zip(outputs["sdpa"], outputs["classic"], strict=True):
        assert torch.allclose(fast, classic, atol=1e-5)


def test_building_components_keeps_the_callers_random_state():
    from tiny import write_clip_tokenizer
    from transformers import CLIPTokenizer

    from peekaboo.diffusion.components import TINY, build_components

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    arch = dataclasses.replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": len(tokenizer)})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_components(arch, tokenizer, seed=0)
    assert torch.equal(torch.rand(3), expected)
    again = build_components(arch, tokenizer, seed=0)  # the seed alone gives the weights
    assert all(torch.equal(a, b) for a, b in zip(first["unet"].state_dict().values(),
                                                 again["unet"].state_dict().values(), strict=True))
