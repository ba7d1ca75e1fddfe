"""Smoke tests of the bundled models' training tooling (scripts/model_training) at tiny sizes on CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from model_training.config import Config, config_with
from model_training.object_checks import (
    ObjectChecks,
    conditioning_by_kind,
    object_sample_grid,
    omission_check,
    ranking_check,
)
from model_training.pipeline import train
from model_training.scenes import load_scenes, object_negative
from model_training.tokenizer import build_tokenizer, tokenize
from model_training.unet_stage import contrast_hinge, swap_one_word, word_kinds
from transformers import CLIPTextModel, CLIPTokenizer

from peekaboo.data import objects
from peekaboo.data.atlas import load_atlas
from peekaboo.data.shapes import COLOURS, SHAPES, parse_caption

# Seconds on CPU: 32x32 scenes (8x8 latents), a handful of them, narrow networks, one thread per step.
TINY = Config(
    threads=2,
    scenes="shapes",
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


def test_swap_one_word_names_an_object_the_caption_did_not(tmp_path):
    tokenizer = build_tokenizer(TINY, tmp_path / "tok")
    captions = ["a red circle and a blue square", "the green triangle", "red circle, blue square", ""]
    ids = tokenize(TINY, tokenizer, captions)
    swapped = swap_one_word(ids, word_kinds(tokenizer), torch.Generator().manual_seed(0), (0.5, 0.5))
    for before, after, caption in zip(ids, swapped, captions, strict=True):
        changed = torch.nonzero(before != after).flatten().tolist()
        if not caption:  # nothing to swap in an empty caption
            assert changed == []
            continue
        assert len(changed) == 1
        old, new = (tokenizer.convert_ids_to_tokens(int(x[changed[0]])).removesuffix("</w>") for x in (before, after))
        assert old != new and ({old, new} <= set(COLOURS) or {old, new} <= set(SHAPES))


@pytest.mark.parametrize(("kind_weights", "kind"), [((1.0, 0.0), COLOURS), ((0.0, 1.0), SHAPES)])
def test_swap_one_word_draws_the_word_kind_with_the_given_weights(tmp_path, kind_weights, kind):
    tokenizer = build_tokenizer(TINY, tmp_path / "tok")
    ids = tokenize(TINY, tokenizer, ["a red circle and a blue square", "green triangle, yellow circle"] * 8)
    swapped = swap_one_word(ids, word_kinds(tokenizer), torch.Generator().manual_seed(0), kind_weights)
    old = {tokenizer.convert_ids_to_tokens(int(i)).removesuffix("</w>") for i in ids[swapped != ids]}
    assert len(old) > 1 and old <= set(kind)


def test_swap_one_word_rejects_weights_that_do_not_fit_the_kinds(tmp_path):
    tokenizer = build_tokenizer(TINY, tmp_path / "tok")
    ids = tokenize(TINY, tokenizer, ["a red circle"])
    with pytest.raises(ValueError, match="kind_weights"):
        swap_one_word(ids, word_kinds(tokenizer), torch.Generator(), (0.0, 0.0))


def test_negative_rows_are_a_fixed_count_of_distinct_captioned_rows():
    from model_training.unet_stage import contrast_rows, negative_rows

    gen = torch.Generator().manual_seed(0)
    drop = torch.tensor([False, True, False, False, True, False, False, False])
    seen = set()
    for _ in range(50):
        rows = negative_rows(drop, 3, gen)
        assert len(rows) == 3 and len(set(rows.tolist())) == 3 and not drop[rows].any()
        seen |= set(rows.tolist())
    assert seen == {0, 2, 3, 5, 6, 7}  # every captioned row gets its turn
    assert sorted(negative_rows(drop, 10, gen).tolist()) == [0, 2, 3, 5, 6, 7]  # fewer captioned rows: all of them
    # The count keeps contrast_fraction of the captioned scenes on average; none with the contrast off.
    assert contrast_rows(replace(TINY, unet_batch=32, contrast_fraction=0.5, uncond_prob=0.12)) == 14
    assert contrast_rows(replace(TINY, contrast_weight=0.0)) == 0


def test_contrast_hinge_is_zero_past_the_margin_and_pushes_both_errors_equally():
    mse_true = torch.tensor([0.02, 0.02, 0.02], requires_grad=True)
    mse_wrong = torch.tensor([0.021, 0.0251, 0.03], requires_grad=True)
    hinge = contrast_hinge(mse_true, mse_wrong, margin=0.25)  # zero from 1.25 * 0.02 = 0.025 on
    assert torch.allclose(hinge, torch.tensor([0.004, 0.0, 0.0]))
    hinge.sum().backward()
    # Growing every error gains nothing: only telling the captions apart lowers the hinge.
    assert mse_true.grad.tolist() == [1.0, 0.0, 0.0] and mse_wrong.grad.tolist() == [-1.0, 0.0, 0.0]


def test_new_text_encoder_and_unet_on_a_kept_vae(tmp_path):
    # vae_from: the pipeline's VAE as it was, a text encoder + UNet of another architecture from scratch.
    first = tmp_path / "model"
    train(TINY, tmp_path / "work", first, "all", vae_steps=2, unet_steps=2, command="first")
    wide = replace(TINY, unet_cross_attention=(True, True, True), text_width=24)
    out = tmp_path / "wide"
    log = train(wide, tmp_path / "work_wide", out, "unet", unet_steps=2, vae_from=first, command="wide")
    assert log["unet"]["steps"] == 2 and [r["command"] for r in log["unet"]["rounds"]] == ["wide"]
    assert log["unet"]["rounds"][0]["device"] == "cpu"
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 and unet.config.cross_attention_dim == 24
    for name, p in AutoencoderKL.from_pretrained(out, subfolder="vae").state_dict().items():
        assert torch.equal(p, AutoencoderKL.from_pretrained(first, subfolder="vae").state_dict()[name])
    with pytest.raises(ValueError, match="not both"):
        train(TINY, tmp_path / "w3", tmp_path / "m3", "unet", continue_from=first, vae_from=first)
    with pytest.raises(ValueError, match="one flag per level"):
        train(replace(TINY, unet_cross_attention=(True,)), tmp_path / "w4", tmp_path / "m4", "unet",
              unet_steps=1, vae_from=first)


def test_unet_stage_runs_its_forward_passes_under_bf16_autocast_when_asked(tmp_path, monkeypatch):
    from model_training import unet_stage

    seen: list[bool] = []
    make_unet = unet_stage.make_unet

    def recording(cfg, tokenizer):
        unet = make_unet(cfg, tokenizer)
        unet.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
        return unet

    monkeypatch.setattr(unet_stage, "make_unet", recording)
    out = tmp_path / "model"
    log = train(replace(TINY, unet_bf16_autocast=True), tmp_path / "work", out, "all", vae_steps=2, unet_steps=2,
                command="bf16")
    assert log["unet"]["steps"] == 2 and seen[:2] == [True, True]
    # Only the forward passes: the weights, and what ships, stay float32.
    for p in UNet2DConditionModel.from_pretrained(out, subfolder="unet").parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_scenes_stage_renders_the_same_scenes_with_several_workers(tmp_path):
    cfg = replace(TINY, n_scenes=5)
    assert train(cfg, tmp_path / "one", tmp_path / "unused", "scenes") == {}
    assert not (tmp_path / "unused").exists()  # the scenes stage writes its cache only
    images, captions = load_scenes(cfg, tmp_path / "one")
    (tmp_path / "two").mkdir()
    images2, captions2 = load_scenes(cfg, tmp_path / "two", workers=2)
    assert np.array_equal(images, images2) and captions == captions2


def test_config_with_parses_typed_overrides_and_refuses_unknown_keys():
    cfg = config_with(TINY, ["unet_batch=512", "unet_lr=1", "unet_cross_attention=(True,True,True)",
                             "train_style=classic", "caption_forms=['and']"])
    assert cfg.unet_batch == 512 and cfg.unet_lr == 1.0 and isinstance(cfg.unet_lr, float)
    assert cfg.unet_cross_attention == (True, True, True) and cfg.caption_forms == ("and",)
    assert cfg.train_style == "classic"
    with pytest.raises(ValueError, match="unet_batch"):
        config_with(TINY, ["unet_bach=3"])
    with pytest.raises(ValueError, match="takes a value like 2"):
        config_with(TINY, ["unet_batch=big"])
    with pytest.raises(ValueError, match="takes a value like"):
        config_with(TINY, ["unet_cross_attention=(1, 2, 3)"])


def test_swap_one_word_follows_the_kind_weights_on_average(tmp_path):
    tokenizer = build_tokenizer(TINY, tmp_path / "tok")
    ids = tokenize(TINY, tokenizer, ["a red circle and a blue square"] * 2000)
    swapped = swap_one_word(ids, word_kinds(tokenizer), torch.Generator().manual_seed(0), (0.3, 0.7))
    colours, shapes = word_kinds(tokenizer)
    changed = ids[swapped != ids]
    assert len(changed) == 2000  # one word per row
    share = torch.isin(changed, shapes).float().mean().item()
    assert 0.66 < share < 0.74
    new = swapped[swapped != ids]
    # the new word is one of the kind's others, uniformly: each of the 4 other colours of "red"/"blue" appears
    assert set(tokenizer.convert_ids_to_tokens(new[torch.isin(new, colours)].tolist())) == {
        f"{c}</w>" for c in COLOURS}


def test_objects_model_trains_resumes_and_exports_every_object_word(tmp_path):
    cfg = replace(TINY, scenes="objects", vae_channels=(8, 8), n_scenes=6)
    out = tmp_path / "objects-ldm"
    train(cfg, tmp_path / "work", out, vae_steps=2, unet_steps=2)
    train(cfg, tmp_path / "work", out, vae_steps=2, unet_steps=3)  # resumes: one more UNet step
    assert _unet_log(out)["steps"] == 3
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    for name in load_atlas().names:  # every word of every object name is one token
        for word in name.split():
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.sample_size == 16  # 32 px scenes, two VAE blocks: latents at half the side

    # The sample grid and the per-word check run on it (figures meaningless at this size).
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    checks = ObjectChecks(size=32, steps=2, samples_per_kind=1, cell=32, scenes_per_background=1, timesteps=(500,),
                          noise_draws=1)
    grid = object_sample_grid(pipe, checks)
    names = load_atlas().names
    assert grid.size == (checks.columns * 32, -(-len(names) // checks.columns) * (32 + checks.label_height))
    rows, shares = conditioning_by_kind(pipe, checks)
    assert list(shares) == list(names) and all(0 <= s <= 1 for s in shares.values())
    assert len(rows) == 2 + len(names)
    share, _ = omission_check(pipe, replace(checks, omission_scenes=1))
    assert 0 <= share <= 1
    assert 0 <= ranking_check(pipe, replace(checks, ranking_scenes=2, ranking_backgrounds=1)) <= 1


@pytest.mark.parametrize("longer_is_better", [True, False])
def test_omission_check_scores_the_caption_naming_both_objects_against_each_single_one(longer_is_better):
    """A stand-in pipeline whose latents are zero, so the noise is z_t / sqrt(1 - abar_t): its UNet predicts that
    exactly, scaled by a factor set by the caption's length (its non-padding tokens)."""
    from types import SimpleNamespace

    abar = torch.linspace(0.99, 0.01, 1000)

    def tokenizer(texts, **_):
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, text in enumerate(texts):
            ids[i, : len(text.split())] = 1
        return SimpleNamespace(input_ids=ids)

    tokenizer.model_max_length = 16

    def unet(zt, t, encoder_hidden_states):
        words = encoder_hidden_states.sum(dim=(1, 2)).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        scale = 1 - 0.5 / words if longer_is_better else 1 - words / 20
        return SimpleNamespace(sample=scale * zt / (1 - abar[t]).sqrt().view(-1, 1, 1, 1))

    pipe = SimpleNamespace(
        tokenizer=tokenizer, text_encoder=lambda ids: (ids[..., None].float(),), unet=unet,
        scheduler=SimpleNamespace(alphas_cumprod=abar),
        vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0), encode=lambda x: SimpleNamespace(
            latent_dist=SimpleNamespace(mean=torch.zeros(len(x), 4, 8, 8)))))
    share, cost = omission_check(pipe, ObjectChecks(size=32, omission_scenes=2, timesteps=(500,), noise_draws=1))
    assert (share, cost > 0) == ((1.0, True) if longer_is_better else (0.0, False))


def test_object_negative_omission_leaves_out_one_object_of_a_multi_object_caption():
    rng = np.random.default_rng(0)
    multi = 0
    for i in range(60):
        caption = objects.training_scene(i, 32).caption
        names = objects.parse_caption(caption)
        wrong = objects.parse_caption(object_negative(caption, rng, 0.5, omission_share=1.0))
        if len(names) == 1:  # nothing to leave out: a swap instead
            assert len(wrong) == 1 and wrong != names
            continue
        multi += 1
        # one object left out, the others named in their order, nothing new named
        assert len(wrong) == len(names) - 1
        assert any(names[:k] + names[k + 1:] == wrong for k in range(len(names)))
    assert multi >= 20


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_object_negative_names_a_kind_the_scene_does_not_hold(share):
    atlas = load_atlas()
    rng = np.random.default_rng(0)
    for i in range(40):
        caption = objects.training_scene(i, 32).caption
        names = objects.parse_caption(caption)
        wrong = object_negative(caption, rng, share)
        wrong_names = objects.parse_caption(wrong)  # still a caption of the vocabulary, articles fixed
        assert len(wrong_names) == len(names)
        changed = [(a, b) for a, b in zip(names, wrong_names, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][1] not in names
        if share == 1.0 and any(n not in names for n in atlas.by_name[changed[0][0]].lookalikes):
            assert changed[0][1] in atlas.by_name[changed[0][0]].lookalikes
        for article_word, name in zip(wrong.split(), wrong.split()[1:], strict=False):
            if article_word in ("a", "an") and name in {n.split()[0] for n in atlas.names}:
                assert article_word == ("an" if name[0] in "aeiou" else "a")
