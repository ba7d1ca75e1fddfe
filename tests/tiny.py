"""Tiny Stable-Diffusion-style pipelines (SD 1.x and SDXL format) built from config, saved in diffusers format (no
download)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from peekaboo.diffusion.components import TINY, Architecture, build_components, save_pipeline

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




def build_tiny_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a randomly initialised tiny SD pipeline (32x32 images, 8x8x4 latents) to ``path``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    arch = replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": len(tokenizer)},
                   scheduler={**TINY.scheduler, "prediction_type": prediction_type})
    return save_pipeline(path, build_components(arch, tokenizer, seed=seed))


#: The tiny SDXL-format model: TINY's VAE (32x32 images, 8x8x4 latents) and first text encoder (width 32), a second
#: text encoder with a projection (width 48, pooled embedding 24) and a UNet with SDXL's ``text_time`` conditioning.
#: The widths differ, so an embedding taken from the wrong encoder, or concatenated in the wrong order, fails.
TINY_SDXL = Architecture(
    unet={"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
          "block_out_channels": (16, 32), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32 + 48,
          "attention_head_dim": (2, 4), "norm_num_groups": 8, "use_linear_projection": True,
          "transformer_layers_per_block": (1, 2), "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
          # SDXL's six time ids (original size, crop top-left, target size), each embedded in 8, and the pooled text.
          "projection_class_embeddings_input_dim": 6 * 8 + 24},
    vae={**TINY.vae, "scaling_factor": 0.13025},  # SDXL's VAE scale
    text_encoder=TINY.text_encoder,
    text_encoder_2={"hidden_size": 48, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "max_position_embeddings": 16, "projection_dim": 24},
)


def build_tiny_sdxl_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a randomly initialised tiny SDXL pipeline (``StableDiffusionXLPipeline``; 32x32 images, 8x8x4 latents)
    to ``path``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(tmp), CLIPTokenizer.from_pretrained(tmp)
    vocab = {"vocab_size": len(tokenizer)}
    arch = replace(TINY_SDXL, text_encoder={**TINY_SDXL.text_encoder, **vocab},
                   text_encoder_2={**(TINY_SDXL.text_encoder_2 or {}), **vocab},
                   scheduler={**TINY_SDXL.scheduler, "prediction_type": prediction_type})
    return save_pipeline(path, build_components(arch, tokenizer, seed=seed, tokenizer_2=tokenizer_2))
