"""Restarts: several independent optimizations of a pair, the kept one chosen by the frozen model.

One optimization of a pair sometimes settles on a look-alike object (a red square for "a red circle"), and
another random stream (backgrounds, timesteps, noise) often does not. With ``optimization.restarts.count=K``
each pair is optimized K times in the same batch, candidate ``k`` under the id :func:`candidate_ids` gives it
(candidate 0 keeps the pair's own id, so it is the single optimization's mask bit for bit), and the kept
candidate is the one whose composite the prompt explains best: the lowest denoising error of the model
under the prompt (:func:`prompt_fit`), over draws of background, timestep and noise that all of a pair's
candidates share, so they are compared on the same draws (``restarts.fit=error_ratio``: that error over the
error under the empty prompt, so a composite that is easy to denoise anyway gains nothing; ``objective``: the
guided objective whose gradient the runs follow, at their guidance scale). No label is used:
this is the model's own judgement of which mask shows what the prompt names, in the spirit of diffusion
classifiers (Li et al., arXiv:2303.16203).

The choice is only as good as the candidates: runs that all start from alpha 0.5 often settle on the same
look-alike. ``restarts.mask_inits`` gives candidates different starts (e.g. the cross-attention map for every
other one), so they begin apart and more often cover the named object between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peekaboo import ops
from peekaboo.config import OptimizationConfig, RestartsConfig
from peekaboo.diffusion.backbone import Backbone

__all__ = ["candidate_ids", "candidate_inits", "choose", "chooses_early", "pair_of", "prompt_fit"]

#: Suffix of candidate ``k >= 1``'s id: ``f"{pair_id}{CANDIDATE_SEP}{k}"``.
CANDIDATE_SEP = "#restart"


def candidate_ids(pair_ids: Sequence[str], count: int) -> list[str]:
    """The ids of each pair's ``count`` candidates, pair by pair: ``[id, id#restart1, ...]`` (``count * B``)."""
    return [pid if k == 0 else f"{pid}{CANDIDATE_SEP}{k}" for pid in pair_ids for k in range(count)]


def pair_of(candidate_id: str) -> str:
    """The pair id a candidate id of :func:`candidate_ids` belongs to (a pair id is its own candidate 0)."""
    return candidate_id.split(CANDIDATE_SEP)[0]


def candidate_inits(cfg: RestartsConfig, default: str) -> list[str]:
    """The mask init of each of one pair's ``cfg.count`` candidates: ``cfg.mask_inits`` cycled, or ``default``
    (``mask.init``) for all when it is empty."""
    inits = list(cfg.mask_inits) or [default]
    return [inits[k % len(inits)] for k in range(cfg.count)]


def chooses_early(cfg: RestartsConfig) -> bool:
    """Whether the kept candidate is chosen after ``cfg.choose_at`` steps rather than at the end (restarts only)."""
    return cfg.count > 1 and cfg.choose_at > 0


@torch.no_grad()
def prompt_fit(
    backbone: Backbone,
    images: torch.Tensor,
    alphas: torch.Tensor,
    prompts: Sequence[str],
    pair_ids: Sequence[str],
    cfg: RestartsConfig,
    seed: int,
    background: str = OptimizationConfig.background,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """How badly the prompt explains each masked image, over ``cfg.draws`` draws of the composite:
    ``cfg.fit="error"``, the mean denoising error of the model under the prompt,
    ``||eps_theta(z_t, t, prompt) - eps||^2``; ``"error_ratio"``, the mean of that error over the same draw's
    error under the empty prompt; ``"objective"``, the mean of the guided denoising objective whose gradient the
    optimization follows (:func:`peekaboo.ops.guided_denoising_objective` at ``guidance_scale``, the run's; here
    on the scoring draws, the posterior mean and ``t`` in ``[cfg.t_min, cfg.t_max)``).

    The draws (background, ``t ~ U[t_min, t_max)``, noise) come from a generator seeded by (``seed``, pair id),
    so candidates of one pair (same id) are scored on the same draws.

    Args:
        images: ``(N, 3, S, S)`` in [0, 1].
        alphas: ``(N, 1, S, S)`` in [0, 1].
        prompts / pair_ids: one per row.

    Returns:
        ``(N,)`` float32 on CPU; lower is a better fit.
    """
    if cfg.fit == "objective" and guidance_scale is None:
        raise ValueError("restarts.fit=objective needs the run's guidance_scale")
    if not images.shape[0] == alphas.shape[0] == len(prompts) == len(pair_ids):
        raise ValueError(f"{images.shape[0]} images, {alphas.shape[0]} alphas, {len(prompts)} prompts, "
                         f"{len(pair_ids)} ids")
    d = cfg.draws
    errors = []
    for image, alpha, prompt, pid in zip(images, alphas, prompts, pair_ids, strict=True):
        gen = ops.pair_generator(seed, f"restarts\x00{pid}")
        image_d = image[None].expand(d, -1, -1, -1)  # (D, 3, S, S)
        composite = ops.composite(image_d, alpha[None].expand(d, -1, -1, -1),
                                  ops.sample_background(background, image_d, gen))
        latents = backbone.encode_images(composite.to(backbone.device), mode="mean")  # (D, C, h, w)
        t = torch.cat([ops.draw_timestep(cfg.t_min, cfg.t_max, backbone.num_train_timesteps, gen)
                       for _ in range(d)])  # (D,)
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)  # (D, C, h, w)
        noisy = ops.add_noise(latents, noise, backbone.alphas_cumprod.to(latents.device)[t])
        t = t.to(latents.device)
        emb = backbone.encode_prompt(prompt)
        if cfg.fit == "error":
            (eps,) = backbone.predict_eps([noisy], [t], [emb.cond], pooled=[emb.pooled_cond])
            errors.append((eps - noise).pow(2).mean().float().cpu())
            continue
        eps_u, eps_c = backbone.predict_noise(noisy, t, emb)
        if cfg.fit == "objective":
            abar = backbone.alphas_cumprod.to(latents.device)[t]  # (D,)
            objective = ops.guided_denoising_objective(eps_u, eps_c, noise, abar, guidance_scale)  # (D,)
            errors.append(objective.mean().float().cpu())
            continue
        err_c = (eps_c - noise).pow(2).flatten(1).mean(1)  # (D,)
        err_u = (eps_u - noise).pow(2).flatten(1).mean(1)  # (D,)
        errors.append((err_c / err_u.clamp_min(torch.finfo(err_u.dtype).tiny)).mean().float().cpu())
    return torch.stack(errors)


def choose(fit: torch.Tensor, failed: torch.Tensor, count: int) -> torch.Tensor:
    """The kept candidate of each pair: the lowest ``fit`` among its candidates that did not fail (the first
    on ties; candidate 0 when all failed).

    Args:
        fit: ``(B * count,)`` candidates pair by pair (:func:`candidate_ids`' order).
        failed: ``(B * count,)`` bool.

    Returns:
        ``(B,)`` int64 candidate indices in ``0 .. count - 1``.
    """
    if fit.shape != failed.shape or fit.numel() % count:
        raise ValueError(f"fit {tuple(fit.shape)} and failed {tuple(failed.shape)}: not B * {count} candidates")
    scores = fit.float().masked_fill(failed, float("inf")).view(-1, count)  # (B, count)
    return scores.nan_to_num(nan=float("inf")).argmin(dim=1)
