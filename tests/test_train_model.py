"""Smoke test of the bundled model's training code (peekaboo.bench.train_model) at tiny sizes on CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from peekaboo.bench.train_model import Config, load_scenes, train
from peekaboo.data.shapes import parse_caption

# Seconds on CPU: 32x32 scenes (8x8 latents), a handful of them, narrow networks, one thread per step.
TINY = Config(
    threads=2,
    image_size=32,
    n_scenes=6,
    vae_channels=(8, 8, 8),
    vae_batch=2,
    scale_scenes=4,
    text_width=16,
    text_ff=32,
    text_layers=1,
    text_heads=2,
    unet_channels=(16, 16, 16),
    unet_layers_per_block=1,
    unet_heads=2,
    unet_norm_groups=8,
    unet_batch=2,
    log_every=1,
    encode_batch=4,
)


def _unet_log(out) -> dict:
    return json.loads((out / "training_log.json").read_text())["unet"]


def test_train_model_stages_resume_and_continue(tmp_path):
    # A first pipeline without the words added since the first bundled model ("the").
    old_cfg = replace(TINY, added_words=())
    work, out = tmp_path / "work", tmp_path / "model"
    train(old_cfg, work, out, "all", vae_steps=2, unet_steps=2, command="first")
    assert _unet_log(out)["steps"] == 2
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert unet.config.sample_size == 8 and vae.config.scaling_factor > 0
    CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    old_tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")

    # The training scenes are wide-style ones, cached with their key.
    images, captions = load_scenes(old_cfg, work)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert all(parse_caption(c) for c in captions)

    # Rerunning with a larger step count resumes from the progress checkpoint.
    train(old_cfg, work, out, "all", vae_steps=2, unet_steps=4, command="resumed")
    assert _unet_log(out)["steps"] == 4

    # Continuing from the pipeline: step numbers go on, the vocabulary grows by "the" (old ids kept).
    out2 = tmp_path / "model2"
    log = train(TINY, tmp_path / "work2", out2, "unet", unet_steps=2, continue_from=out, command="continued")
    assert log["unet"]["steps"] == 6
    assert [r["command"] for r in log["unet"]["rounds"]] == ["resumed", "continued"]
    tokenizer = CLIPTokenizer.from_pretrained(out2, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out2, subfolder="text_encoder")
    assert len(tokenizer) > len(old_tokenizer) == len(old_tokenizer.get_vocab())
    assert text_encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    old_vocab = old_tokenizer.get_vocab()
    assert {t: i for t, i in tokenizer.get_vocab().items() if t in old_vocab} == old_vocab
    assert len(tokenizer("the", add_special_tokens=False).input_ids) == 1
    UNet2DConditionModel.from_pretrained(out2, subfolder="unet")
