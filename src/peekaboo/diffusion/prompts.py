"""The text side of the frozen diffusion model: prompt embeddings in diffusers' order ``[uncond, cond]``, from one
CLIP text encoder (Stable Diffusion 1.x/2.x: its last hidden states) or two (SDXL: both encoders' penultimate
hidden states, concatenated, and the second encoder's pooled embedding), kept in a bounded cache on the encoders'
device. A :class:`~peekaboo.diffusion.backbone.Backbone` holds one :class:`PromptEncoder` and hands its
:class:`PromptEmbeddings` to every UNet call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# The most prompt embeddings a backbone keeps on its device, the least recently used dropped first: a dataset run
# meets most of its prompts for one pair only (RefCOCO val: ~10.8k sentences), so an unbounded cache grows by one
# (1, L, D) tensor per pair. Far more than one batch's prompts, and a category dataset's whole vocabulary.
PROMPT_CACHE_SIZE = 1024


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text embeddings in diffusers' order ``[uncond, cond]``: each ``(B, L, D)`` (or ``(1, L, D)``, shared); for
    the SDXL format also the second text encoder's pooled embeddings ``pooled_uncond``, ``pooled_cond``, each
    ``(B, P)`` (or ``(1, P)``), which :meth:`~peekaboo.diffusion.backbone.Backbone.run_unet`
    needs there (None for SD 1.x/2.x)."""

    uncond: torch.Tensor
    cond: torch.Tensor
    pooled_uncond: torch.Tensor | None = None
    pooled_cond: torch.Tensor | None = None

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.uncond, self.cond, self.pooled_uncond, self.pooled_cond

    @staticmethod
    def stack(items: list[PromptEmbeddings]) -> PromptEmbeddings:
        """One batch from per-prompt embeddings."""
        columns = zip(*(e._fields() for e in items), strict=True)
        return PromptEmbeddings(*(None if c[0] is None else torch.cat(c) for c in columns))

    def select(self, rows: torch.Tensor) -> PromptEmbeddings:
        """The embeddings of the batch rows ``rows`` ``(R,)``."""
        return PromptEmbeddings(*(None if e is None else e[rows] for e in self._fields()))

    def repeat_interleave(self, k: int) -> PromptEmbeddings:
        """Each row ``k`` times in a row, ``(B*K, ...)``; a shared ``(1, ...)`` embedding stays shared."""
        return PromptEmbeddings(*(e.repeat_interleave(k, 0) if e is not None and e.shape[0] > 1 else e
                                  for e in self._fields()))


class PromptEncoder:
    """A model's text encoder(s) and tokenizer(s), and the embeddings of the prompts used last.

    Args:
        text_encoder, tokenizer: the (first) CLIP text encoder, already frozen, and its tokenizer.
        sdxl: SDXL format: embed with both text encoders (:meth:`_embed_sdxl`).
        text_encoder_2, tokenizer_2: SDXL format: the second text encoder (a ``CLIPTextModelWithProjection``)
            and its tokenizer.
        zero_empty_prompt: SDXL format: the unconditional embeddings are zeros, not the empty prompt's encoding.
    """

    def __init__(self, text_encoder, tokenizer, sdxl: bool = False, text_encoder_2=None, tokenizer_2=None,
                 zero_empty_prompt: bool = False):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.sdxl = sdxl
        self.zero_empty_prompt = sdxl and zero_empty_prompt
        # prompt -> (hidden (1, L, D), pooled (1, P) or None), the least recently used first.
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def move_cache(self, device: torch.device) -> None:
        """Move the cached embeddings to ``device`` (where the encoders were moved)."""
        self.cache = OrderedDict((k, (h.to(device), None if p is None else p.to(device)))
                                 for k, (h, p) in self.cache.items())

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids ``(1, L)``, padded to the tokenizer's length; longer prompts are truncated with a warning."""
        limit = self.tokenizer.model_max_length
        full = self.tokenizer(prompt, truncation=False).input_ids
        if len(full) > limit:
            # Both counts without the start and end tokens the tokenizer adds: what the user wrote.
            log.warning(
                "Prompt %r is %d tokens long but the model reads %d, so it was truncated to its first %d tokens.",
                prompt, len(full) - 2, limit - 2, limit - 2,
            )
        ids = self.tokenizer(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        return ids.input_ids

    @torch.no_grad()
    def _embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        ids = self.tokenize(prompt).to(self.device)
        # SD 1.x/2.x: the last hidden states (1, L, D), no pooled embedding.
        embedding = self._embed_sdxl(prompt, ids) if self.sdxl else (self.text_encoder(ids)[0], None)
        self.cache[prompt] = embedding
        while len(self.cache) > PROMPT_CACHE_SIZE:
            self.cache.popitem(last=False)
        return embedding

    def _embed_sdxl(self, prompt: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's embeddings of ``prompt`` (token ids ``ids`` of the first tokenizer): both encoders' penultimate
        hidden states concatenated, ``(1, L, D1 + D2)``, and the second encoder's pooled (projected) embedding
        ``(1, P)``; zeros for the empty prompt where ``zero_empty_prompt`` says so."""
        ids_2 = self.tokenizer_2(prompt, padding="max_length", max_length=self.tokenizer_2.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (1, L, D1 + D2)
        pooled = second.text_embeds  # (1, P)
        if prompt == "" and self.zero_empty_prompt:
            return torch.zeros_like(hidden), torch.zeros_like(pooled)
        return hidden, pooled

    def encode_prompt(self, prompt: str) -> PromptEmbeddings:
        """Embeddings ``[uncond, cond]`` of ``prompt``, each ``(1, L, D)`` (SDXL format: with the pooled ones,
        each ``(1, P)``); cached per prompt (the last :data:`PROMPT_CACHE_SIZE` prompts used)."""
        (uncond, pooled_uncond), (cond, pooled_cond) = self._embed(""), self._embed(prompt)
        return PromptEmbeddings(uncond, cond, pooled_uncond, pooled_cond)
