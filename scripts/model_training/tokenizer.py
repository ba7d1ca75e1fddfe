"""The bundled models' CLIP tokenizer: a BPE vocabulary in which every scene word is one token."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from model_training.config import Config
from model_training.scenes import log, scene_words
from peekaboo.data.shapes import COLOURS, SHAPES

__all__ = ["build_tokenizer", "resize_vocabulary", "tokenize"]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable unicode character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word (the last symbol carries the "</w>" end-of-word mark)."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(symbols)) if p in ranks]
        if not candidates:
            break
        first, second = symbols[min(candidates)[1]], symbols[min(candidates)[1] + 1]
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_tokenizer(cfg: Config, folder: Path) -> CLIPTokenizer:
    """Write a CLIP BPE vocabulary for the scene words and return the CLIPTokenizer built from it.

    Every scene word becomes a single token; anything else falls back to single characters. Merges
    are added word by word, each new merge joining the first two symbols the current merges leave;
    a new merge ranks after all earlier ones, so it can never break a word finished before it.
    """
    words = scene_words(cfg)
    # The shapes model's first words: their tokens come before the special tokens, as in the first shapes model.
    first = words if cfg.scenes != "shapes" else list(dict.fromkeys([*cfg.extra_words, *COLOURS, *SHAPES]))
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    n_first = 0  # merges of the first words: their tokens come before the special tokens
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(merges)
            merges.append((symbols[0], symbols[1]))
        if word in first:
            n_first = len(merges)
    alphabet = list(_bytes_to_unicode().values())
    merged = ["".join(m) for m in merges]
    # Tokens of added words go after <|startoftext|> / <|endoftext|>, so no earlier id moves (see added_words).
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *merged[:n_first], "<|startoftext|>", "<|endoftext|>"]
    tokens += merged[n_first:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=cfg.max_length,
    )
    for word in [*words, ","]:  # the property the text encoder relies on: one id per scene word
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"{word!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer


def resize_vocabulary(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, init: Path) -> None:
    """Grow a continued text encoder's token embedding to the new tokenizer's vocabulary.

    Only appending is allowed: every token of the pipeline's own tokenizer must keep its id, so the
    trained rows keep their meaning; the new rows (e.g. "the") start at the mean of the trained ones
    (transformers' ``mean_resizing``) and are learnt by the continuation.

    Raises:
        ValueError: the new vocabulary renumbers a token of the old one, or the positions differ.
    """
    old_vocab = json.loads((init / "tokenizer" / "vocab.json").read_text())
    new_vocab = tokenizer.get_vocab()
    moved = [t for t, i in old_vocab.items() if new_vocab.get(t) != i]
    if moved:
        raise ValueError(
            f"the tokenizer renumbers {len(moved)} tokens of {init} (e.g. {moved[:3]}); only appending is allowed"
        )
    if text_encoder.config.max_position_embeddings != tokenizer.model_max_length:
        raise ValueError(
            f"{init}: text encoder has {text_encoder.config.max_position_embeddings} positions, "
            f"Config.max_length is {tokenizer.model_max_length}"
        )
    old = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > old:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        added = sorted(set(new_vocab) - set(old_vocab), key=new_vocab.get)
        log(f"text encoder vocabulary {old} -> {len(tokenizer)} (new tokens {added}, initialised at the mean row)")


def tokenize(cfg: Config, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, max_length), padded with <|endoftext|> like Stable Diffusion."""
    return tokenizer(
        captions, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt"
    ).input_ids


