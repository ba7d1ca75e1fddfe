"""Tiny Stable-Diffusion-style pipelines built from config, saved in diffusers format (no download)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from peekaboo.diffusion.components import Architecture, build_components, save_pipeline

WORDS = ["a", "an", "and", "the", "red", "green", "blue", "circle", "square", "triangle", "cat", "dog", "hat"]


def write_clip_tokenizer(folder: Path, words: list[str] = WORDS, max_length: int = 16) -> None:
    """A real CLIPTokenizer whose vocabulary makes each of ``words`` one token (plus single characters)."""
    from transformers import CLIPTokenizer

    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:
        symbols = [*list(w[:-1]), w[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)


#: The tiny model's components: 32x32 images, 8x8x4 latents.
TINY = Architecture(
    unet={"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
          "block_out_channels": (16, 32), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32,
          "attention_head_dim": 4, "norm_num_groups": 8},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16, 16),
         "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
         "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32},
    text_encoder={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "max_position_embeddings": 16},
)


def build_tiny_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a randomly initialised tiny SD pipeline (32x32 images, 8x8x4 latents) to ``path``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    arch = replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": len(tokenizer)},
                   scheduler={**TINY.scheduler, "prediction_type": prediction_type})
    return save_pipeline(path, build_components(arch, tokenizer, seed=seed))
