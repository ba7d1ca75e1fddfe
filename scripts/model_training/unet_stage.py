"""Stage 2: the CLIP text encoder and the conditional UNet, trained jointly on the cached latents.

The loss is Stable Diffusion's epsilon-prediction denoising loss, captions dropped some of the time for
classifier-free guidance, plus a caption contrast hinge (:func:`contrast_hinge`): a caption that names an object
the scene does not hold (or, for objects, leaves one out) must denoise worse than the true one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from model_training.config import Config
from model_training.models import make_text_encoder, make_train_scheduler, make_unet
from model_training.scenes import log, object_negative
from model_training.steps import Ema, atomic_save, batch_indices, lr_at, n_params, run_progress
from model_training.tokenizer import resize_vocabulary, tokenize
from model_training.vae_stage import cached_latents
from peekaboo.data.shapes import COLOURS, SHAPES

__all__ = ["contrast_hinge", "contrast_rows", "negative_rows", "swap_one_word", "train_unet", "word_kinds"]


def word_kinds(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the colour words and of the shape words (each scene word is one token)."""
    def ids(words) -> torch.Tensor:
        return torch.tensor([tokenizer.convert_tokens_to_ids(w + "</w>") for w in words])
    return ids(COLOURS), ids(SHAPES)


def swap_one_word(
    ids: torch.Tensor, kinds: tuple[torch.Tensor, ...], gen: torch.Generator, kind_weights: tuple[float, ...]
) -> torch.Tensor:
    """``ids`` [B, L] with, in each row, one colour or shape token replaced by another word of its kind: a
    caption that names an object the scene does not have.

    The word kind is drawn with ``kind_weights`` (one per entry of ``kinds``, renormalised over the kinds the
    row holds), then the position uniformly among that kind's tokens, then the new word uniformly among the
    kind's other words. Rows with no such token are returned unchanged. All rows are drawn at once (this runs
    on every training step).
    """
    if len(kind_weights) != len(kinds) or min(kind_weights) < 0 or sum(kind_weights) <= 0:
        raise ValueError(f"kind_weights {kind_weights} must be {len(kinds)} non-negative weights, not all zero")
    out = ids.clone()
    if len(ids) == 0:
        return out
    # word_of[k]: [B, L], the index of each token in kinds[k] (-1: not a word of that kind)
    matches = [ids[..., None] == kind for kind in kinds]  # each [B, L, words of the kind]
    word_of = [m.to(torch.long).argmax(-1).where(m.any(-1), -1) for m in matches]
    present = torch.stack([(w >= 0).any(1) for w in word_of], dim=1)  # [B, K]
    weights = present * torch.tensor(kind_weights, dtype=torch.float)  # [B, K]
    rows = torch.nonzero(weights.sum(1) > 0).flatten()  # [R] rows with a word to swap
    if len(rows) == 0:
        return out
    kind = torch.multinomial(weights[rows], 1, generator=gen).squeeze(1)  # [R]
    words = torch.stack(word_of)[kind, rows]  # [R, L] word indices in the drawn kind
    # A uniform position among the drawn kind's tokens: the largest of uniform scores over those positions.
    scores = torch.rand(words.shape, generator=gen).where(words >= 0, -1.0)
    pos = scores.argmax(1)  # [R]
    old = words[torch.arange(len(rows)), pos]  # [R]
    sizes = torch.tensor([len(k) for k in kinds])[kind]  # [R]
    # Another word of the same kind, uniformly: shift the old index by 1 .. size - 1 (mod size).
    shift = 1 + (torch.rand(len(rows), generator=gen) * (sizes - 1)).long()
    table = torch.nn.utils.rnn.pad_sequence(list(kinds), batch_first=True)  # [K, max words]
    out[rows, pos] = table[kind, (old + shift) % sizes]
    return out


def contrast_rows(cfg: Config) -> int:
    """How many scenes of each batch are also denoised under a wrong caption: ``contrast_fraction`` of the
    captioned ones, on average (0 with the contrast off)."""
    if cfg.contrast_weight <= 0:
        return 0
    return round(cfg.contrast_fraction * (1 - cfg.uncond_prob) * cfg.unet_batch)


def negative_rows(drop: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` rows (fewer only when fewer are captioned) drawn uniformly from the rows whose caption is kept
    (``~drop``, ``drop`` (B,) bool), in random order: (N,) indices.

    A fixed count keeps every step's batch the same shape: oneDNN builds its kernels per shape, and a batch size
    that changed from step to step (one Bernoulli draw per scene) cost about a fifth of the step time on this CPU.
    """
    order = torch.randperm(len(drop), generator=gen)
    return order[~drop[order]][:count]


def contrast_hinge(mse_true: torch.Tensor, mse_wrong: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-scene hinge ``relu(margin * sg(mse_true) + mse_true - mse_wrong)`` [N]: zero once the wrong caption's
    denoising error exceeds the true caption's by the relative margin.

    The two errors get equal and opposite gradients, so the only way down is to tell the captions apart: a
    model that merely grew every error would gain nothing. (Pushing the wrong caption's error alone, against a
    detached target, did exactly that: the denoising loss rose tenfold within 100 steps.)
    """
    return F.relu(margin * mse_true.detach() + mse_true - mse_wrong)


def _negatives(cfg: Config, tokenizer: CLIPTokenizer, captions: list[str]):
    """The step's wrong captions: ``negatives(ids (N, L), scene indices (N,), generator) -> ids (N, L)``.

    Shapes swap one colour or shape token (:func:`swap_one_word`); objects name a kind the scene does not hold,
    often a look-alike partner, or leave one of its objects out (:func:`model_training.scenes.object_negative`),
    re-tokenized.
    """
    if cfg.scenes == "shapes":
        kinds = word_kinds(tokenizer)  # (colours, shapes)
        kind_weights = (1.0 - cfg.contrast_shape_share, cfg.contrast_shape_share)
        return lambda ids, scenes, gen: swap_one_word(ids, kinds, gen, kind_weights)

    def objects(ids: torch.Tensor, scenes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if len(scenes) == 0:
            return ids
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
        wrong = [object_negative(captions[i], rng, cfg.contrast_lookalike_share, cfg.contrast_omission_share)
                 for i in scenes.tolist()]
        return tokenize(cfg, tokenizer, wrong)
    return objects


def train_unet(
    cfg: Config,
    work: Path,
    vae: AutoencoderKL,
    images: np.ndarray,
    captions: list[str],
    tokenizer: CLIPTokenizer,
    minutes: float,
    max_steps: int | None,
    init: Path | None = None,
    first_step: int = 0,
    device: torch.device | None = None,
) -> tuple[CLIPTextModel, UNet2DConditionModel, int, float]:
    """Stage 2, on ``device`` (the CPU by default). Returns the EMA text encoder and UNet (on the CPU), the
    number of steps and the wall time (s).

    With ``init`` (a finished pipeline folder), training continues from its (EMA) text encoder and UNet
    with a fresh optimizer: a warm restart of the cosine schedule (short warmup, then decay over the new
    budget). Steps are numbered from ``first_step`` (the steps the pipeline already had), so the batches
    and noise of the continuation are new ones, and ``max_steps`` / ``minutes`` count this run only.
    """
    device = device or torch.device("cpu")
    latents = cached_latents(cfg, work, vae, images, device)  # [N, C, h, w] on device
    ids_all = tokenize(cfg, tokenizer, captions)
    ids_uncond = tokenize(cfg, tokenizer, [""])
    negatives = _negatives(cfg, tokenizer, captions)
    torch.manual_seed(cfg.seed + 1)
    if init is None:
        text_encoder, unet = make_text_encoder(cfg, tokenizer), make_unet(cfg, tokenizer)
    else:
        text_encoder = CLIPTextModel.from_pretrained(init, subfolder="text_encoder")
        resize_vocabulary(text_encoder, tokenizer, init)
        unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet")
        log(f"UNet: continuing from {init} (step {first_step})")
    text_encoder.to(device)
    unet.to(device)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ema = Ema(params, cfg.ema_decay)
    scheduler = make_train_scheduler(cfg)
    abar = scheduler.alphas_cumprod.to(device)
    progress_path = work / "unet_progress.pt"
    step, elapsed = first_step, 0.0
    if progress_path.exists():
        state = torch.load(progress_path, weights_only=False, map_location=device)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        step, elapsed = state["step"], state["elapsed"]
        log(f"UNet: resuming at step {step}, {elapsed / 60:.1f} min done")
    log(
        f"text encoder {n_params(text_encoder) / 1e6:.3f}M, UNet {n_params(unet) / 1e6:.3f}M parameters; "
        f"budget {minutes} min, max steps {max_steps}"
    )

    def save_progress() -> None:
        atomic_save(
            {
                "text_encoder": text_encoder.state_dict(),
                "unet": unet.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.shadow,
                "step": step,
                "elapsed": elapsed,
            },
            progress_path,
        )

    text_encoder.train()
    unet.train()
    t_start, last_ckpt = time.time() - elapsed, time.time()
    # EMAs of the denoising loss, the hinge and of true < wrong, kept on the device: reading them every step
    # would wait for the GPU each time.
    running, contrast_running, beaten = (torch.zeros((), device=device) for _ in range(3))
    warmup = cfg.unet_warmup_steps if init is None else cfg.continue_warmup_steps
    while (max_steps is None and elapsed < minutes * 60) or (max_steps is not None and step - first_step < max_steps):
        done = step - first_step
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, done, run_progress(done, elapsed, minutes, max_steps), cfg.unet_lr, warmup)
        # The step's draws (scenes, caption drop, t, noise, negatives) come from CPU generators seeded by the
        # step, so they are the same on every device and after a resume.
        idx = torch.from_numpy(batch_indices(cfg, "unet", step, len(latents), cfg.unet_batch))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        ids = ids_all[idx].clone()  # [B, L]
        drop = torch.rand(len(idx), generator=gen) < cfg.uncond_prob
        ids[drop] = ids_uncond
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)  # [B]
        noise = torch.randn((len(idx), *latents.shape[1:]), generator=gen).to(device)  # [B, C, h, w]
        z0 = latents[idx.to(device)]  # [B, C, h, w]
        t = t.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        # Hard negatives ride in the same forward pass: the same z_t, t and noise under a one-word-wrong caption.
        neg = negative_rows(drop, contrast_rows(cfg), gen)  # [N]
        ids_neg = negatives(ids[neg], idx[neg], gen)  # [N, L]
        neg = neg.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.unet_bf16_autocast):
            hidden = text_encoder(torch.cat([ids, ids_neg]).to(device)).last_hidden_state
            pred = unet(torch.cat([zt, zt[neg]]), torch.cat([t, t[neg]]), encoder_hidden_states=hidden).sample
        # The errors in float32: the contrast hinge compares two of them that differ by a few percent.
        sq_err = ((pred.float() - torch.cat([noise, noise[neg]])) ** 2).mean(dim=(1, 2, 3))  # [B + N]
        loss = denoise = sq_err[: len(idx)].mean()
        if len(neg):
            hinge = contrast_hinge(sq_err[neg], sq_err[len(idx):], cfg.contrast_margin)  # [N]
            loss = denoise + cfg.contrast_weight * hinge.mean()
            contrast_running.lerp_(hinge.detach().mean(), 0.02)
            beaten.lerp_((sq_err[len(idx):] > sq_err[neg]).float().mean(), 0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)
        step += 1
        elapsed = time.time() - t_start
        if step == first_step + 1:
            running.copy_(denoise.detach())
        else:
            running.lerp_(denoise.detach(), 0.02)
        if step % cfg.log_every == 0:
            contrast = (
                f" contrast={contrast_running.item():.4f} true<wrong={beaten.item():.0%}"
                if cfg.contrast_weight > 0 else ""
            )
            log(
                f"UNet step {step} loss={denoise.item():.4f} ema_loss={running.item():.4f}{contrast} "
                f"| {elapsed / (step - first_step):.2f}s/step, {elapsed / 60:.1f} min"
            )
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            save_progress()
            last_ckpt = time.time()
    save_progress()
    ema.copy_to_params()
    log(f"UNet done: {step} steps, {elapsed / 60:.1f} min")
    return text_encoder.eval().cpu(), unet.eval().cpu(), step, elapsed




