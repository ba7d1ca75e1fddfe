"""The cross-attention map of a prompt over an image: where a frozen text-to-image UNet's cross-attention
layers look at the prompt's content words while they denoise the (VAE-encoded, noised) image.

The map is collected by a small diffusers attention processor (:class:`CrossAttentionRecorder`) installed on
the ``attn2`` (cross-attention) layers only, for the duration of one UNet call; the original processors are
restored afterwards, even when the call fails. The benchmark thresholds it as a training-free baseline
(:mod:`peekaboo.bench.baselines`); ``optimization.mask.init=cross_attention`` starts the mask from it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from peekaboo import ops
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import PeekabooError

#: Words that carry no content: their tokens are left out of the attention map (the articles of the prompts).
STOPWORDS: frozenset[str] = frozenset({"a", "an", "the"})

#: Timesteps the image is noised at for the attention map: early enough that the image still dominates the
#: noisy latents (the map follows the image), late enough that the text matters to the UNet.
DEFAULT_TIMESTEPS: tuple[int, ...] = (100, 300, 500)

# Suffix of the cross-attention layers' names in ``unet.attn_processors`` (diffusers' naming: attn1 is
# self-attention, attn2 cross-attention to the text).
_CROSS_ATTENTION_SUFFIX = "attn2.processor"


# -- token bookkeeping --------------------------------------------------------------------------------------
def content_token_positions(
    word_tokens: Sequence[int], words: Sequence[str], keep: Sequence[str] | None, max_length: int
) -> list[int]:
    """Positions, in the padded token sequence, of the tokens of the words to keep.

    The sequence is ``[BOS, tokens of word 0, tokens of word 1, ..., EOS, pad ...]`` (CLIP's layout), so
    word ``i``'s tokens start at ``1 + sum(word_tokens[:i])``; tokens beyond ``max_length - 1`` were
    truncated away (the last slot holds EOS) and are dropped.

    Args:
        word_tokens: how many tokens each word of the prompt becomes.
        words: the prompt's words, as split.
        keep: the words whose tokens to take (case-insensitive); None = every word except :data:`STOPWORDS`.
        max_length: the tokenizer's sequence length.

    Returns:
        Sorted positions; empty when no word qualifies.
    """
    if len(word_tokens) != len(words):
        raise ValueError(f"{len(words)} words but {len(word_tokens)} token counts")
    wanted = {w.lower() for w in keep} if keep is not None else None
    positions: list[int] = []
    start = 1  # after BOS
    for word, count in zip(words, word_tokens, strict=True):
        word_key = word.lower()
        take = word_key in wanted if wanted is not None else word_key not in STOPWORDS
        if take:
            positions += [p for p in range(start, start + count) if p < max_length - 1]
        start += count
    return positions


def prompt_token_positions(tokenizer, prompt: str, token_words: Sequence[str] | None = None) -> list[int]:
    """Token positions of the prompt's content words (or of ``token_words``), special tokens excluded.

    Raises:
        PeekabooError: no token of the prompt qualifies (an empty prompt, only articles, or ``token_words``
            that are not in the prompt).
    """
    words = prompt.split()
    counts = [len(tokenizer(word, add_special_tokens=False).input_ids) for word in words]
    positions = content_token_positions(counts, words, token_words, tokenizer.model_max_length)
    if not positions:
        which = f"the words {list(token_words)}" if token_words is not None else "a content word"
        raise PeekabooError(f"Prompt {prompt!r} has no token of {which} for the cross-attention map; "
                            "name the object, e.g. \"a red circle\".")
    return positions


# -- attention capture --------------------------------------------------------------------------------------
class CrossAttentionRecorder:
    """A diffusers attention processor that computes cross-attention as ``AttnProcessor`` does, and keeps
    each call's attention probabilities.

    ``maps`` receives one ``(B, heads, N, L)`` float32 tensor per call (``N`` query pixels, ``L`` tokens),
    in call order; the layer's output is unchanged.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("CrossAttentionRecorder is for cross-attention (attn2) layers only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch = hidden_states.shape[0]
        heads = attn.heads
        q = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()  # (B*heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states)).float()  # (B*heads, L, d)
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        scores = torch.bmm(q, k.transpose(1, 2)) * attn.scale  # (B*heads, N, L)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[1], batch)
            scores = scores + mask.float()
        probs = scores.softmax(dim=-1)
        self.maps.append(probs.view(batch, heads, *probs.shape[1:]).detach())
        out = torch.bmm(probs.to(v.dtype), v)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))  # projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def record_cross_attention(unet) -> Iterator[CrossAttentionRecorder]:
    """Install a :class:`CrossAttentionRecorder` on every ``attn2`` layer of ``unet``; restore the original
    processors on exit.

    Raises:
        PeekabooError: the UNet has no cross-attention layer (so no text-to-image attention to read).
    """
    original = dict(unet.attn_processors)
    recorder = CrossAttentionRecorder()
    cross = [name for name in original if name.endswith(_CROSS_ATTENTION_SUFFIX)]
    if not cross:
        raise PeekabooError("The model's UNet has no cross-attention (attn2) layers, so it has no cross-attention "
                            "map; use a text-conditioned UNet2DConditionModel.")
    unet.set_attn_processor({name: recorder if name in cross else proc for name, proc in original.items()})
    try:
        yield recorder
    finally:
        unet.set_attn_processor(original)


def attention_to_map(probs: Sequence[torch.Tensor], positions: Sequence[int], size: int) -> torch.Tensor:
    """Average the attention paid to ``positions`` over heads, layers and batch, at a common resolution.

    Args:
        probs: per layer call, ``(B, heads, N, L)`` with square ``N = n * n`` (layers may differ in ``n``).
        positions: token positions whose attention is summed (the content words' tokens).
        size: side of the common map; each layer's ``(n, n)`` map is bilinearly resized to it.

    Returns:
        ``(size, size)`` float32, not normalized.
    """
    if not probs:
        raise ValueError("no attention maps were recorded")
    index = torch.as_tensor(list(positions), dtype=torch.long)
    total = torch.zeros(size, size)
    for p in probs:
        n = math.isqrt(p.shape[2])
        if n * n != p.shape[2]:
            raise ValueError(f"attention over {p.shape[2]} pixels is not a square map")
        words = p.float().cpu().index_select(-1, index).sum(-1)  # (B, heads, N)
        layer = words.mean(dim=(0, 1)).view(1, 1, n, n)
        total += F.interpolate(layer, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return total / len(probs)


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalize to [0, 1]; a constant map becomes all zeros (no location is preferred)."""
    lo, hi = m.min(), m.max()
    if not bool(hi > lo):
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


@torch.no_grad()
def cross_attention_map(
    backbone: Backbone,
    image: torch.Tensor,
    prompt: str,
    token_words: Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-attention heat map of the prompt's content words over the image.

    The image is encoded with the VAE's posterior mean, noised at each of ``timesteps`` (one batch, one
    UNet call with the prompt's embeddings), and the attention every ``attn2`` layer pays to the content
    tokens is averaged over heads, layers (resized to the largest layer's resolution) and timesteps.

    Args:
        backbone: the frozen model.
        image: ``(3, S, S)`` in [0, 1].
        prompt: e.g. ``"a red circle"``; its content words are all words but :data:`STOPWORDS`.
        token_words: use these words' tokens instead (e.g. ``["circle"]``).
        timesteps: integer diffusion timesteps, each in ``[0, num_train_timesteps)``.
        generator: CPU generator of the added noise (None: a fixed seed, so the map is deterministic).

    Returns:
        ``(S, S)`` float32 in [0, 1], on CPU.

    Raises:
        PeekabooError: a timestep outside the model's schedule, or a prompt without content tokens.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, S, S), got {tuple(image.shape)}")
    bad = [t for t in timesteps if not 0 <= int(t) < backbone.num_train_timesteps]
    if not timesteps or bad:
        raise PeekabooError(f"Cross-attention timesteps {list(timesteps)} must be non-empty and within "
                            f"[0, {backbone.num_train_timesteps}).")
    positions = prompt_token_positions(backbone.tokenizer, prompt, token_words)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = backbone.device
    latents = backbone.encode_images(image[None].to(device), mode="mean")  # (1, C, h, w)
    n = len(timesteps)
    t = torch.as_tensor([int(x) for x in timesteps], dtype=torch.long)
    noise = torch.randn((n, *latents.shape[1:]), generator=gen).to(device)
    noisy = ops.add_noise(latents.expand(n, -1, -1, -1), noise, backbone.alphas_cumprod[t].to(device))
    emb = backbone.encode_prompt(prompt)
    with record_cross_attention(backbone.unet) as recorder:
        backbone.run_unet(noisy, t.to(device), emb.cond, emb.pooled_cond)
    common = max(math.isqrt(p.shape[2]) for p in recorder.maps)
    heat = attention_to_map(recorder.maps, positions, common)
    heat = F.interpolate(heat[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return normalize_map(heat).clamp(0, 1)
