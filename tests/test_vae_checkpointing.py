"""``model.vae_gradient_checkpointing``: the VAE encoder recomputes its activations in the backward pass, and the
gradient that reaches the mask is the same."""

import torch
from tests_support import REPO_CONFIGS

from peekaboo.bench.throughput.harness import Bench
from peekaboo.config import ModelConfig
from peekaboo.diffusion.loading import load_backbone


def _encode(backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Latents, the gradient at ``images`` and the bytes the forward pass saved for the backward pass."""
    x = images.clone().requires_grad_(True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latents = backbone.encode_images(x, mode="mean")
    latents.square().sum().backward()
    return latents.detach(), x.grad, sum(saved)


def test_checkpointing_recomputes_the_encoder_for_the_same_gradient(tiny_model, monkeypatch):
    backbone = load_backbone(ModelConfig(pretrained=str(tiny_model)))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents, grad, saved = _encode(backbone, images)
    block = backbone.vae.encoder.down_blocks[0]
    calls = []

    def counted(*args, forward=block.forward, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", counted)
    backbone.set_vae_gradient_checkpointing(True)
    latents_ckpt, grad_ckpt, saved_ckpt = _encode(backbone, images)
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass
    assert saved_ckpt < saved / 2
    torch.testing.assert_close(latents_ckpt, latents)
    torch.testing.assert_close(grad_ckpt, grad)
    backbone.set_vae_gradient_checkpointing(False)
    assert not backbone.vae.encoder.gradient_checkpointing


def test_the_benchmarks_backbones_follow_the_config_key(tiny_model):
    bench = Bench(str(tiny_model), torch.device("cpu"), warmup=0, steps=1, config_dir=REPO_CONFIGS)
    assert not bench.backbone(bench.config()).vae.encoder.gradient_checkpointing
    cfg = bench.config("model.vae_gradient_checkpointing=true")
    assert cfg.model.vae_gradient_checkpointing and bench.backbone(cfg).vae.encoder.gradient_checkpointing
