"""Stage 1: the VAE, trained on the training scenes' pixels; then the scaled latents the UNet stage learns."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from model_training.config import Config
from model_training.models import make_vae
from model_training.scenes import digest, log, scenes_key, to_tensor
from model_training.steps import atomic_save, batch_indices, lr_at, n_params, run_progress

__all__ = ["cached_latents", "latent_stats", "train_vae", "vae_loss"]


def vae_loss(cfg: Config, vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (L1 + MSE, per pixel) + KL (per latent element) of a batch in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - x).abs().mean()
    mse = F.mse_loss(recon, x)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    loss = l1 + cfg.vae_mse_weight * mse + cfg.vae_kl_weight * kl
    return loss, {
        "loss": loss.item(),
        "l1": l1.item(),
        "mse": mse.item(),
        "kl": kl.item(),
        "post_std": posterior.std.mean().item(),
    }


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: np.ndarray) -> dict[str, float]:
    """Std of posterior-mean latents, mean posterior std, and posterior-mean round-trip PSNR."""
    x = to_tensor(images)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
    mse01 = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on the [0, 1] scale
    return {
        "latent_std": posterior.mean.std().item(),
        "latent_mean": posterior.mean.mean().item(),
        "posterior_std": posterior.std.mean().item(),
        "psnr": (10 * torch.log10(1.0 / mse01.clamp_min(1e-10))).mean().item(),
    }


def train_vae(cfg: Config, work: Path, images: np.ndarray, tokenizer: CLIPTokenizer, minutes: float,
              max_steps: int | None) -> AutoencoderKL:
    """Stage 1. Returns the trained VAE with scaling_factor set, also saved to ``work/vae``."""
    final_dir = work / "vae"
    if (final_dir / "config.json").exists():
        log(f"VAE stage already finished ({final_dir}); loading it")
        return AutoencoderKL.from_pretrained(final_dir)
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg, tokenizer)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    progress_path = work / "vae_progress.pt"
    step, elapsed = 0, 0.0
    if progress_path.exists():
        state = torch.load(progress_path, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        log(f"VAE: resuming at step {step}, {elapsed / 60:.1f} min done")
    log(f"VAE: {n_params(vae) / 1e6:.2f}M parameters; budget {minutes} min, max steps {max_steps}")

    def save_progress() -> None:
        atomic_save(
            {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, progress_path
        )

    vae.train()
    t_start, last_ckpt = time.time() - elapsed, time.time()
    while (max_steps is None and elapsed < minutes * 60) or (max_steps is not None and step < max_steps):
        for group in opt.param_groups:
            progress = run_progress(step, elapsed, minutes, max_steps)
            group["lr"] = lr_at(cfg, step, progress, cfg.vae_lr, cfg.vae_warmup_steps)
        x = to_tensor(images[batch_indices(cfg, "vae", step, len(images), cfg.vae_batch)])
        loss, parts = vae_loss(cfg, vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        elapsed = time.time() - t_start
        if step % cfg.log_every == 0:
            log(
                f"VAE step {step} "
                + " ".join(f"{k}={v:.4g}" for k, v in parts.items())
                + f" | {elapsed / step:.2f}s/step, {elapsed / 60:.1f} min"
            )
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            save_progress()
            last_ckpt = time.time()
    save_progress()

    vae.eval()
    stats = latent_stats(vae, images[: cfg.scale_scenes])
    scaling = 1.0 / stats["latent_std"]
    vae.register_to_config(scaling_factor=scaling)
    log(f"VAE done: {step} steps, {elapsed / 60:.1f} min; {stats}; scaling_factor={scaling:.4f}")
    vae.save_pretrained(final_dir)
    (work / "vae_stats.json").write_text(
        json.dumps({"steps": step, "wall_s": elapsed, **stats, "scaling_factor": scaling}, indent=2)
    )
    return vae




@torch.no_grad()
def cached_latents(
    cfg: Config, work: Path, vae: AutoencoderKL, images: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Scaled posterior-mean latents [N, C, h, w] of all training scenes (encoded once on ``device``, cached
    on disk), returned on ``device``.

    The cache is keyed by the scenes (:func:`scenes_key`) and the VAE's weights, so new scenes or another
    VAE re-encode.
    """
    path, key_path = work / "latents.pt", work / "latents_key.json"
    weights = sum(float(t.double().sum()) for t in vae.state_dict().values())  # identifies the VAE cheaply
    key = digest({"scenes": scenes_key(cfg), "vae": weights, "scale": vae.config.scaling_factor})
    if path.exists() and key_path.exists() and key_path.read_text() == key:
        return torch.load(path).to(device)
    t0 = time.time()
    vae.eval().to(device)
    chunks = []
    for start in range(0, len(images), cfg.encode_batch):
        x = to_tensor(images[start : start + cfg.encode_batch]).to(device)
        chunks.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    latents = torch.cat(chunks)
    vae.cpu()
    atomic_save(latents.cpu(), path)
    key_path.write_text(key)
    log(
        f"encoded {len(images)} scenes to latents {tuple(latents.shape)} in {time.time() - t0:.1f}s "
        f"(std {latents.std().item():.3f})"
    )
    return latents
