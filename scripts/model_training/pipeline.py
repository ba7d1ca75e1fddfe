"""A bundled model's training from end to end: scenes, tokenizer, VAE, text encoder + UNet, and the exported
Stable-Diffusion-format pipeline with its training log. ``scripts/train_bundled_model.py`` is the command line.

Every stage is resumable (progress checkpoints in the work folder every few minutes) and budgeted in wall-clock
minutes or exact steps; calling :func:`train` again with the same folder continues. Training runs on the CPU by
default and on any torch device: batches and noise are drawn on the CPU from per-step seeds either way, so a
run's data does not depend on where it trains.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from model_training.config import STAGES, Config
from model_training.models import make_sampling_scheduler
from model_training.scenes import load_scenes, log
from model_training.steps import n_params
from model_training.tokenizer import build_tokenizer
from model_training.unet_stage import train_unet
from model_training.vae_stage import train_vae
from peekaboo.diffusion.components import save_pipeline

__all__ = ["export", "train"]


def export(
    cfg: Config,
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    tokenizer_dir: Path,
    train_log: dict,
) -> dict:
    """Save the Stable-Diffusion pipeline (fp16 weights only if fp32 would exceed the size cap); returns the
    training log as written to ``out/training_log.json``."""
    total = sum(n_params(m) for m in (vae, text_encoder, unet))
    fp32_mb = total * 4 / 2**20
    dtype = torch.float16 if fp32_mb > cfg.save_fp16_above_mb else torch.float32
    save_pipeline(out, {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
                        "scheduler": make_sampling_scheduler(cfg)}, dtype=dtype)
    # The legacy vocab.json / merges.txt too, for tokenizer versions that read those.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, out / "tokenizer" / name)
    train_log = {**train_log, "params": total, "weights_dtype": str(dtype).replace("torch.", "")}
    (out / "training_log.json").write_text(json.dumps(train_log, indent=2))
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    log(f"saved pipeline to {out} ({total / 1e6:.2f}M parameters, {size_mb:.1f} MB of {dtype} weights)")
    return train_log


def train(
    cfg: Config,
    work: Path,
    out: Path,
    stage: str = "all",
    vae_minutes: float = 12.0,
    unet_minutes: float = 43.0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    continue_from: Path | None = None,
    command: str = "",
    *,
    vae_from: Path | None = None,
    device: str = "cpu",
    workers: int = 1,
) -> dict:
    """Train (or continue training) the bundled model and write the pipeline to ``out``.

    Args:
        cfg: every hyperparameter.
        work: progress checkpoints and caches; calling again with the same folder resumes.
        out: the finished Stable-Diffusion pipeline folder (replaced if it exists).
        stage: one of :data:`STAGES`.
        vae_minutes / unet_minutes: wall-clock budgets of the stages (cumulative over resumes).
        vae_steps / unet_steps: exact step counts instead of the budgets.
        continue_from: a finished pipeline (e.g. the bundled one): keep its VAE, grow its tokenizer by
            ``cfg.added_words``, and train its text encoder + UNet further (a warm restart of the lr
            schedule; step numbers continue from the pipeline's).
        command: the command line, recorded in ``training_log.json``.
        vae_from: a finished pipeline whose VAE is kept while a new text encoder + UNet (``cfg``'s
            architecture) are trained from scratch.
        device: the torch device of the VAE encoding and of stage 2 (the VAE stage trains on the CPU).
        workers: processes that render the training scenes.

    Returns:
        The training log written to ``out/training_log.json`` (empty for ``stage="scenes"`` / ``"vae"``).

    Raises:
        ValueError: an unknown stage, ``stage="vae"`` with ``continue_from`` / ``vae_from``, or both of them.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    if continue_from is not None and vae_from is not None:
        raise ValueError("continue_from already keeps the pipeline's VAE; give continue_from or vae_from, not both")
    source = continue_from or vae_from
    if source is not None and stage == "vae":
        raise ValueError("continue_from / vae_from keep the VAE of the pipeline; use stage 'unet'")
    torch.set_num_threads(cfg.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions: fp32 range, ~fp16 speed
        torch.backends.cudnn.allow_tf32 = True
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, captions = load_scenes(cfg, work, workers)
    if stage == "scenes":
        return {}
    tokenizer = build_tokenizer(cfg, work / "tokenizer_src")
    previous: dict = {}
    if source is not None:
        previous = json.loads((source / "training_log.json").read_text())
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        (work / "vae_stats.json").write_text(
            json.dumps({**previous["vae"], "psnr": previous["vae"]["psnr_posterior_mean"]}, indent=2)
        )
        if vae_from is not None:  # a new text encoder + UNet: their history starts here
            previous = {"vae": previous["vae"]}
    else:
        vae = train_vae(cfg, work, images, tokenizer, vae_minutes, vae_steps)
    if stage == "vae":
        return {}
    first_step = previous.get("unet", {}).get("steps", 0)
    text_encoder, unet, steps, wall = train_unet(
        cfg, work, vae, images, captions, tokenizer, unet_minutes, unet_steps, continue_from, first_step,
        torch.device(device),
    )
    vae_stats = json.loads((work / "vae_stats.json").read_text())
    earlier = previous.get("unet", {})
    rounds = earlier.get("rounds", [{"command": previous["command"], **earlier}] if earlier else [])
    train_log = {
        "command": command,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "vae": {
            "steps": vae_stats["steps"],
            "wall_s": round(vae_stats["wall_s"], 1),
            "psnr_posterior_mean": vae_stats["psnr"],
            "posterior_std": vae_stats["posterior_std"],
            "latent_std": vae_stats["latent_std"],
            "scaling_factor": vae_stats["scaling_factor"],
        },
        "unet": {
            "steps": steps,
            "wall_s": round(wall + earlier.get("wall_s", 0.0), 1),
            "rounds": [
                *rounds,
                {
                    "command": command,
                    "scenes": cfg.scenes,
                    "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
                    "steps": steps - first_step,
                    "wall_s": round(wall, 1),
                },
            ],
        },
        "torch_threads": cfg.threads,
    }
    full_log = export(cfg, out, vae, text_encoder, tokenizer, unet, work / "tokenizer_src", train_log)
    log(f"all done in {(time.time() - t0) / 60:.1f} min (this invocation)")
    return full_log
