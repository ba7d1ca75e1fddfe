"""Pure tensor functions for the Peekaboo math (DESIGN.md steps 2, 3, 5, 6), and the blend of an edit's
regenerated region into the image.

Nothing here holds state or touches a model, so each function is unit-tested against hand-computed values.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F


def composite(image: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Alpha-composite ``image`` over ``background``: ``alpha * image + (1 - alpha) * background``.

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        alpha: ``(B, 1, H, W)`` in [0, 1].
        background: ``(B, 3, H, W)``.

    Returns:
        ``(B, 3, H, W)``.
    """
    if image.shape[0] != alpha.shape[0] or alpha.shape[1] != 1 or image.shape[-2:] != alpha.shape[-2:]:
        raise ValueError(f"composite: image {tuple(image.shape)} and alpha {tuple(alpha.shape)} do not match")
    if background.shape != image.shape:
        raise ValueError(f"composite: background {tuple(background.shape)} != image {tuple(image.shape)}")
    return alpha * image + (1.0 - alpha) * background


def sample_background(
    kind: str, image: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw one random background per image.

    Args:
        kind: ``"solid"`` (a uniform random RGB colour: the paper's), ``"noise"`` (uniform per-pixel noise)
            or ``"blur"`` (the image blurred heavily, then tinted by a random colour).
        image: ``(B, 3, H, W)``; only its shape, device and (for ``blur``) content are used.
        generator: a CPU generator, so draws do not depend on the device.

    Returns:
        ``(B, 3, H, W)`` in [0, 1], float32, on ``image.device``.
    """
    b, c, h, w = image.shape
    if kind == "solid":
        colour = torch.rand(b, c, 1, 1, generator=generator)
        return colour.expand(b, c, h, w).to(image.device, torch.float32)
    if kind == "noise":
        return torch.rand(b, c, h, w, generator=generator).to(image.device, torch.float32)
    if kind == "blur":
        k = max(3, (min(h, w) // 8) | 1)
        blurred = F.avg_pool2d(image.float(), k, stride=1, padding=k // 2, count_include_pad=False)
        tint = torch.rand(b, c, 1, 1, generator=generator).to(image.device)
        return 0.5 * blurred + 0.5 * tint
    raise ValueError(f"unknown background kind {kind!r}")


def guided_score(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + s (eps_c - eps_u)``, float32; inputs ``(B, C, h, w)``."""
    return eps_uncond.float() + guidance_scale * (eps_cond.float() - eps_uncond.float())


def _weighted(direction: torch.Tensor, alphas_cumprod_t: torch.Tensor, zero: bool = True) -> torch.Tensor:
    """``w(t) * direction`` with ``w = 1 - abar_t`` (``(B,)``), non-finite entries zeroed unless ``zero`` is
    False: ``(B, C, h, w)``."""
    w = (1.0 - alphas_cumprod_t.float()).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return drop_nonfinite(w * direction)[0] if zero else w * direction


def drop_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` ``(N, ...)`` with its non-finite entries (nan, inf) set to 0, and how many there were in each
    row: ``(N,)`` int64."""
    bad = ~torch.isfinite(grad)
    return grad.masked_fill(bad, 0.0), bad.flatten(1).sum(1)


def sds_gradient(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    guidance_scale: float,
    zero_nonfinite: bool = True,
) -> torch.Tensor:
    """The dream-loss gradient on the latents: ``w(t) * (eps_u + s (eps_c - eps_u) - eps)``, ``w = 1 - abar_t``.

    Args:
        eps_uncond, eps_cond: ``(B, C, h, w)`` noise predictions for the empty and the real prompt.
        noise: ``(B, C, h, w)`` the noise that was added.
        alphas_cumprod_t: ``(B,)`` ``abar_t`` of each sample's timestep.
        guidance_scale: classifier-free guidance scale ``s``.
        zero_nonfinite: zero the non-finite entries (False: keep them, for a caller that counts them first).

    Returns:
        ``(B, C, h, w)`` float32 gradient, non-finite entries zeroed (with ``zero_nonfinite``).
    """
    return _weighted(guided_score(eps_uncond, eps_cond, guidance_scale) - noise.float(), alphas_cumprod_t,
                     zero_nonfinite)


def guided_denoising_objective(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """The objective score distillation descends: ``w(t) / 2 * sum(s (eps_c - eps)^2 - (s - 1) (eps_u - eps)^2)``
    per sample, ``w = 1 - abar_t``.

    Its gradient w.r.t. the noisy latents with the UNet's Jacobian taken as the identity is exactly
    :func:`sds_gradient`'s ``w (eps_u + s (eps_c - eps_u) - eps)``; the ``full`` estimator differentiates it through
    the UNet instead.

    Args:
        eps_uncond, eps_cond: ``(B, C, h, w)`` noise predictions for the empty and the real prompt.
        noise: ``(B, C, h, w)`` the noise that was added.
        alphas_cumprod_t: ``(B,)``.
        guidance_scale: ``s``.

    Returns:
        ``(B,)`` float32.
    """
    eps = noise.float()
    squared = guidance_scale * (eps_cond.float() - eps) ** 2 - (guidance_scale - 1) * (eps_uncond.float() - eps) ** 2
    return 0.5 * _weighted(squared, alphas_cumprod_t, zero=False).flatten(1).sum(dim=1)


def nfsd_gradient(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_negative: torch.Tensor,
    small_t: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    guidance_scale: float,
    zero_nonfinite: bool = True,
) -> torch.Tensor:
    """Noise-Free Score Distillation's gradient: ``w(t) (delta_D + s delta_C)`` with ``delta_C = eps_c - eps_u``
    and ``delta_D = eps_u`` where ``small_t``, else ``eps_u - eps_neg`` (Katzir et al., 2023, "Noise-Free Score
    Distillation", arXiv:2310.17590). There is no ``- eps`` term: at small t the unconditional prediction is
    the domain direction, at large t the difference to a negative prompt's prediction is.

    Args:
        eps_uncond, eps_cond, eps_negative: ``(B, C, h, w)`` predictions for the empty prompt, the prompt and
            the negative prompt (pass ``eps_uncond`` for an empty negative prompt: ``delta_D`` is then 0 at
            large t).
        small_t: ``(B,)`` bool, whether each sample's timestep is below the threshold.
        alphas_cumprod_t: ``(B,)``.
        zero_nonfinite: as in :func:`sds_gradient`.

    Returns:
        ``(B, C, h, w)`` float32 gradient, non-finite entries zeroed (with ``zero_nonfinite``).
    """
    eps_u = eps_uncond.float()
    delta_c = eps_cond.float() - eps_u
    delta_d = torch.where(small_t.view(-1, 1, 1, 1), eps_u, eps_u - eps_negative.float())
    return _weighted(delta_d + guidance_scale * delta_c, alphas_cumprod_t, zero_nonfinite)


def timestep_range(
    schedule: str, index: int, count: int | None, t_min: float, t_max: float, jitter: float = 0.0, strata: int = 1
) -> tuple[float, float]:
    """The interval ``[lo, hi)`` (fractions of the training timesteps) that a pair's draw ``index`` of the run's
    ``count`` draws (steps times draws per step) takes its timestep from.

    - ``uniform``: ``[t_min, t_max)`` for every draw (the paper's schedule).
    - ``annealed``: a band of half-width ``jitter`` around a line falling from ``t_max`` (first draw) to
      ``t_min`` (last draw), clipped to ``[t_min, t_max]``: coarse structure first, details last, as in
      DreamTime's time-prioritized SDS (Huang et al., 2023, "DreamTime: An Improved Optimization Strategy for
      Diffusion-Guided 3D Generation", arXiv:2306.12422). The line is linear, not DreamTime's
      prior-weighted curve; the band keeps some randomness in each step's draw.
    - ``stratified``: draw ``index`` takes slice ``index mod strata`` of ``strata`` equal slices of
      ``[t_min, t_max)``, so every ``strata`` consecutive draws cover the range evenly.

    Args:
        count: the run's number of draws; only ``annealed`` needs it.
    """
    if schedule == "uniform":
        return t_min, t_max
    if schedule == "annealed":
        if count is None:
            raise ValueError("the annealed timestep schedule needs the run's length (count)")
        progress = min(1.0, index / max(1, count - 1))  # 0 at the first draw, 1 at the last
        centre = t_max - (t_max - t_min) * progress
        return max(t_min, centre - jitter), min(t_max, centre + jitter)
    if schedule == "stratified":
        s = index % strata
        return t_min + (t_max - t_min) * s / strata, t_min + (t_max - t_min) * (s + 1) / strata
    raise ValueError(f"unknown timestep schedule {schedule!r}")


def draw_timestep(lo: float, hi: float, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One integer timestep ``t ~ U{int(lo T), ..., int(hi T) - 1}`` (at least the one value ``int(lo T)``),
    ``T = num_train_timesteps``; shape ``(1,)``, int64, on CPU. Always one draw from ``generator``."""
    first = int(lo * num_train_timesteps)
    end = max(first + 1, int(hi * num_train_timesteps))
    return torch.randint(first, end, (1,), generator=generator)


def v_to_epsilon(v: torch.Tensor, noisy: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """Convert a v-prediction to an epsilon prediction: ``eps = sqrt(abar) v + sqrt(1 - abar) z_t``.

    Args:
        v: ``(B, C, h, w)`` model output of a v-prediction model.
        noisy: ``(B, C, h, w)`` the noisy latents ``z_t`` the model saw.
        alphas_cumprod_t: ``(B,)``.
    """
    abar = alphas_cumprod_t.float().view(-1, 1, 1, 1)
    return abar.sqrt() * v.float() + (1.0 - abar).sqrt() * noisy.float()


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: ``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``; ``alphas_cumprod_t`` is ``(B,)``."""
    abar = alphas_cumprod_t.to(latents.dtype).view(-1, 1, 1, 1)
    return abar.sqrt() * latents + (1.0 - abar).sqrt() * noise


def dream_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||z - stopgrad(z - grad)||^2`` summed: its gradient w.r.t. ``latents`` is exactly ``grad``.

    Returns one loss per sample, ``(B,)``, so pairs optimized together stay independent.
    """
    target = (latents - grad).detach()
    return 0.5 * ((latents.float() - target.float()) ** 2).flatten(1).sum(dim=1)


def gravity_loss(alpha: torch.Tensor, weight: float, reduction: str) -> torch.Tensor:
    """Alpha regularizer: ``weight * sum(alpha)`` or ``weight * mean(alpha)`` per sample, ``(B,)``.

    Args:
        alpha: ``(B, 1, H, W)``.
    """
    per_sample = alpha.flatten(1)
    if reduction == "sum":
        return weight * per_sample.sum(dim=1)
    if reduction == "mean":
        return weight * per_sample.mean(dim=1)
    raise ValueError(f"unknown gravity reduction {reduction!r}")


def pair_seed(seed: int, pair_id: str, step: int | None = None) -> int:
    """A 63-bit seed derived from (run seed, pair id[, step]), stable across processes and devices.

    Python's ``hash`` is salted per process, so a cryptographic digest is used instead.
    """
    key = f"{seed}\x00{pair_id}" + ("" if step is None else f"\x00{step}")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def pair_generator(seed: int, pair_id: str, step: int | None = None) -> torch.Generator:
    """A CPU generator seeded by :func:`pair_seed`: a pair's draws, the same in any batch, process or device."""
    return torch.Generator().manual_seed(pair_seed(seed, pair_id, step))


def downsample_alpha(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``alpha`` on a coarser grid by area averaging: each cell of the result is the mean of the pixels it
    covers (``F.adaptive_avg_pool2d``; for a side that divides evenly, exactly ``avg_pool2d`` with kernel
    ``H // h``). Differentiable, so a gradient on the coarse alpha reaches every pixel it averages.

    Args:
        alpha: ``(B, 1, H, W)``.
        size: ``(h, w)``, the latent grid.

    Returns:
        ``(B, 1, h, w)``.
    """
    if alpha.dim() != 4 or alpha.shape[1] != 1:
        raise ValueError(f"downsample_alpha: alpha must be (B, 1, H, W), got {tuple(alpha.shape)}")
    if tuple(alpha.shape[-2:]) == tuple(size):
        return alpha
    return resample(alpha, size, "area")


def resample(x: torch.Tensor, size: tuple[int, int], mode: str, matrices: bool | None = None) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resized to ``size`` ``(h, w)``: ``bilinear`` (``F.interpolate``, ``align_corners=False``,
    no antialiasing) or ``area`` (``F.adaptive_avg_pool2d``).

    With ``matrices``, the same resize as two matrix products ``R_h x R_w^T`` (both resizes are separable; each
    ``R`` is the 1-D resize applied to an identity), whose backward is two matrix products again: deterministic
    on CUDA, where the backward of PyTorch's own kernels adds with atomics in no fixed order. None (the default):
    exactly when ``x`` is on CUDA and PyTorch's deterministic algorithms are on (``trainer.deterministic``).

    Returns:
        ``(B, C, h, w)``.
    """
    if mode not in ("bilinear", "area"):
        raise ValueError(f"unknown resampling mode {mode!r}")
    if matrices is None:
        matrices = x.is_cuda and torch.are_deterministic_algorithms_enabled()
    if not matrices:
        if mode == "area":
            return F.adaptive_avg_pool2d(x, tuple(size))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    rows, cols = (_resize_matrix(n, m, mode, x) for n, m in zip(x.shape[-2:], size, strict=True))
    return rows @ x @ cols.T


def _resize_matrix(n: int, m: int, mode: str, like: torch.Tensor) -> torch.Tensor:
    """The 1-D resize from ``n`` to ``m`` samples as an ``(m, n)`` matrix, in ``like``'s device and dtype."""
    eye = torch.eye(n, device=like.device, dtype=like.dtype)[:, None, :]  # (n, 1, n): one impulse per row
    with torch.no_grad():
        if mode == "area":
            out = F.adaptive_avg_pool1d(eye, m)
        else:
            out = F.interpolate(eye, size=m, mode="linear", align_corners=False)
    return out[:, 0, :].T  # (m, n)


def blend_latents(z_image: torch.Tensor, z_background: torch.Tensor, alpha_latent: torch.Tensor) -> torch.Tensor:
    """The latent-space composite ``alpha_l * z_image + (1 - alpha_l) * z_background``: an approximation of
    encoding the pixel composite (the VAE is not linear; :func:`relative_error` measures how far off it is).

    Args:
        z_image, z_background: ``(B, C, h, w)`` latents of the image and of the background.
        alpha_latent: ``(B, 1, h, w)``, alpha on the latent grid (:func:`downsample_alpha`).

    Returns:
        ``(B, C, h, w)``.
    """
    return composite(z_image, alpha_latent, z_background)


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample relative error ``||estimate - reference|| / ||reference||`` (Frobenius norms over all but
    the first dimension), ``(B,)`` float32; a zero reference gives inf (or nan where both are zero)."""
    if estimate.shape != reference.shape:
        raise ValueError(f"relative_error: {tuple(estimate.shape)} != {tuple(reference.shape)}")
    diff = (estimate.float() - reference.float()).flatten(1).norm(dim=1)  # (B,)
    return diff / reference.float().flatten(1).norm(dim=1)


# -- an edit's blend --------------------------------------------------------------------------------------------
def _disc(radius: int) -> torch.Tensor:
    """``(2r+1, 2r+1)`` float kernel: 1 on the pixels within Euclidean distance ``radius`` of the centre."""
    offsets = torch.arange(-radius, radius + 1)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    return (yy**2 + xx**2 <= radius**2).float()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a binary mask by ``radius`` pixels (a Euclidean disc).

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` bool: pixels within ``radius`` of a mask pixel.
    """
    if radius <= 0:
        return mask.clone()
    kernel = _disc(radius)[None, None]
    hits = F.conv2d(mask.float()[None, None], kernel, padding=radius)[0, 0]  # counts of mask pixels nearby
    return hits > 0.5


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(H, W)``; the border is replicated, so the image frame does not count
    as "outside" the mask (an object touching the frame is not feathered against it)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[None, None].float(), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0, 0]


def blend_weights(mask: torch.Tensor, dilation: int, feather: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where an edit may change pixels, and by how much.

    The region is ``mask`` dilated by ``dilation`` pixels. The feathering stays INSIDE it, so every pixel
    outside the region keeps its value exactly: the weight is ``2 * blur(region) - 1`` clipped to [0, 1], with
    a Gaussian blur of sigma ``feather / 2``. Along a straight edge that is ``erf(d / (sigma sqrt 2))`` of the
    distance ``d`` from the region's border: 0 at the border, 0.68 at ``feather / 2`` pixels inside and 0.95
    at ``feather`` pixels inside. With ``feather <= dilation`` the segmented object itself (``dilation``
    pixels inside the border) is replaced almost completely, so no faint outline of it survives.

    Args:
        mask: ``(H, W)`` bool, the binary segmentation mask.
        dilation: pixels to grow the mask by.
        feather: width in pixels of the ramp from 0 to 0.95 inside the region's border; 0 = a hard edge.

    Returns:
        ``(region (H, W) bool, weight (H, W) float32 in [0, 1], 0 outside region)``.
    """
    region = dilate(mask, dilation)
    if feather <= 0:
        return region, region.float()
    weight = (2.0 * gaussian_blur(region.float(), feather / 2.0) - 1.0).clamp(0.0, 1.0)
    return region, torch.where(region, weight, torch.zeros_like(weight))
