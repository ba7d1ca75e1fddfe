"""The guidance estimators: how one UNet call's noise predictions become the dream-loss gradient on the latents.

:func:`gradient` is the one entry point (:meth:`~peekaboo.diffusion.backbone.Backbone.dream_loss` calls it);
``guidance.estimator`` picks the estimator:

- ``sds``: score distillation, the paper's: ``w(t) (eps_u + s (eps_c - eps_u) - eps)``, UNet rows
  ``[uncond, cond]`` per draw.
- ``nfsd``: Noise-Free Score Distillation (Katzir et al., 2023, arXiv:2310.17590): ``w(t) (delta_D + s delta_C)``,
  no noise term; rows ``[uncond, cond]``, plus one for a non-empty ``guidance.nfsd_negative_prompt``.
- ``full``: the gradient of the objective ``sds`` approximates (``ops.guided_denoising_objective``), through the
  UNet: score distillation drops the UNet's Jacobian, this keeps it, at the cost of a backward pass through the
  UNet and of its activations in memory; rows ``[uncond, cond]``.

The math of each gradient is in :mod:`peekaboo.ops` (``sds_gradient``, ``nfsd_gradient``,
``guided_denoising_objective``); this module chooses the UNet rows it needs and runs them in one call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peekaboo import ops
from peekaboo.config import GuidanceConfig

if TYPE_CHECKING:
    from peekaboo.diffusion.backbone import Backbone
    from peekaboo.diffusion.prompts import PromptEmbeddings


def gradient(
    backbone: Backbone,
    noisy: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    abar: torch.Tensor,
    emb: PromptEmbeddings,
    cfg: GuidanceConfig,
) -> torch.Tensor:
    """``cfg.estimator``'s gradient on the latents from one UNet call.

    Args:
        noisy: ``(N, C, h, w)`` noisy latents ``z_t``.
        noise: ``(N, C, h, w)`` the noise that made them.
        t: ``(N,)`` integer timesteps; ``abar`` ``(N,)`` their ``alphas_cumprod``.
        emb: ``[uncond, cond]`` embeddings, each ``(N, L, D)`` or a shared ``(1, L, D)`` (SDXL: with the pooled
            ones, which every UNet call takes).

    Returns:
        ``(N, C, h, w)`` float32, non-finite entries as the model's outputs made them:
        :meth:`~peekaboo.diffusion.backbone.Backbone.dream_loss` counts them, then zeroes them.

    Raises:
        ValueError: an estimator this module does not know (the config's validation names the allowed ones).
    """
    if cfg.estimator == "sds":
        return _sds(backbone, noisy, noise, t, abar, emb, cfg)
    if cfg.estimator == "nfsd":
        return _nfsd(backbone, noisy, t, abar, emb, cfg)
    if cfg.estimator == "full":
        return _full(backbone, noisy, noise, t, abar, emb, cfg)
    raise ValueError(f"unknown guidance estimator {cfg.estimator!r}")


def _sds(
    backbone: Backbone, noisy: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
    emb: PromptEmbeddings, cfg: GuidanceConfig,
) -> torch.Tensor:
    """Score distillation: rows ``[uncond, cond]`` on ``noisy``; ``w(t) (eps_hat - eps)``."""
    eps_u, eps_c = backbone.predict_noise(noisy, t, emb, cfg.batch_cfg)
    return ops.sds_gradient(eps_u, eps_c, noise, abar, cfg.guidance_scale, zero_nonfinite=False)


def _nfsd(
    backbone: Backbone, noisy: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, emb: PromptEmbeddings,
    cfg: GuidanceConfig,
) -> torch.Tensor:
    """Noise-Free Score Distillation: rows ``[uncond, cond]`` on ``noisy``, and the negative prompt's when
    ``cfg.nfsd_negative_prompt`` is not empty (an empty one makes ``eps_neg = eps_u``); the domain term is
    ``eps_u`` below ``cfg.nfsd_t_threshold`` of the training timesteps, ``eps_u - eps_neg`` above it."""
    hidden, pooled = [emb.uncond, emb.cond], [emb.pooled_uncond, emb.pooled_cond]
    if cfg.nfsd_negative_prompt:
        negative = backbone.encode_prompt(cfg.nfsd_negative_prompt)  # cached: encoded once
        hidden.append(negative.cond)
        pooled.append(negative.pooled_cond)
    eps = backbone.predict_eps([noisy] * len(hidden), [t] * len(hidden), hidden, cfg.batch_cfg, pooled)
    small_t = t < cfg.nfsd_t_threshold * backbone.num_train_timesteps  # (N,)
    return ops.nfsd_gradient(eps[0], eps[1], eps[-1] if len(eps) == 3 else eps[0], small_t, abar,
                             cfg.guidance_scale, zero_nonfinite=False)


def _full(
    backbone: Backbone, noisy: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
    emb: PromptEmbeddings, cfg: GuidanceConfig,
) -> torch.Tensor:
    """The guided denoising objective's gradient w.r.t. the clean latents, through the UNet: rows
    ``[uncond, cond]`` on ``noisy`` with the graph kept, then ``sqrt(abar_t) d objective / d z_t``
    (``z_t = sqrt(abar_t) z + ...``)."""
    with torch.enable_grad():
        z_t = noisy.detach().requires_grad_(True)
        eps_u, eps_c = backbone.predict_noise(z_t, t, emb, cfg.batch_cfg, grad=True)
        objective = ops.guided_denoising_objective(eps_u, eps_c, noise, abar, cfg.guidance_scale)  # (N,)
        (grad,) = torch.autograd.grad(objective.sum(), z_t)  # rows are independent: the sum's gradient is each row's
    return grad.float() * abar.float().sqrt().view(-1, 1, 1, 1)
