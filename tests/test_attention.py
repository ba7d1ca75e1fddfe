"""The cross-attention map of a prompt over an image (peekaboo.diffusion.attention): token bookkeeping and map
arithmetic against hand-made inputs, the attention capture and the map on the tiny model."""

from __future__ import annotations

import pytest
import torch

from peekaboo.diffusion.attention import (
    attention_to_map,
    content_token_positions,
    cross_attention_map,
    normalize_map,
    prompt_token_positions,
    record_cross_attention,
)
from peekaboo.errors import PeekabooError


# -- token bookkeeping --------------------------------------------------------------------------------------
def test_content_token_positions():
    words = ["a", "red", "circle"]
    assert content_token_positions([1, 1, 1], words, None, 16) == [2, 3]
    # A word of two tokens shifts the next one.
    assert content_token_positions([1, 2, 1], words, None, 16) == [2, 3, 4]
    assert content_token_positions([1, 1, 1], words, ["Circle"], 16) == [3]
    # Position max_length - 1 holds EOS after truncation: never taken.
    assert content_token_positions([1, 1, 1], words, None, 4) == [2]
    assert content_token_positions([1], ["the"], None, 16) == []
    with pytest.raises(ValueError):
        content_token_positions([1, 1], words, None, 16)


def test_prompt_token_positions_with_a_real_tokenizer(tiny_backbone):
    tok = tiny_backbone.tokenizer
    ids = tok("a red circle").input_ids
    positions = prompt_token_positions(tok, "a red circle")
    assert [ids[p] for p in positions] == tok("red circle", add_special_tokens=False).input_ids
    assert prompt_token_positions(tok, "a red circle", ["circle"]) == [3]
    with pytest.raises(PeekabooError, match="no token"):
        prompt_token_positions(tok, "a")
    with pytest.raises(PeekabooError, match="no token"):
        prompt_token_positions(tok, "a red circle", ["dog"])


# -- attention maps -----------------------------------------------------------------------------------------
def test_attention_to_map_follows_the_content_tokens():
    # Two layers (4x4 and 2x2 pixels, 2 heads, 5 tokens): token 2 is attended to in the top-left quarter only.
    fine = torch.full((1, 2, 16, 5), 0.1)
    fine.view(1, 2, 4, 4, 5)[:, :, :2, :2, 2] = 0.6
    coarse = torch.full((1, 2, 4, 5), 0.1)
    coarse.view(1, 2, 2, 2, 5)[:, :, 0, 0, 2] = 0.6
    heat = attention_to_map([fine, coarse], [2], 4)
    assert heat.shape == (4, 4)
    assert heat[:2, :2].mean() > heat[2:, 2:].mean() + 0.3
    # Another token sees a flat map.
    flat = attention_to_map([fine, coarse], [4], 4)
    assert torch.allclose(flat, torch.full((4, 4), 0.1))
    with pytest.raises(ValueError):
        attention_to_map([torch.zeros(1, 1, 5, 3)], [1], 4)  # 5 pixels: not a square map


def test_normalize_map():
    m = normalize_map(torch.tensor([[1.0, 3.0], [2.0, 5.0]]))
    assert m.min() == 0 and m.max() == 1 and m[0, 1] == pytest.approx(0.5)
    assert (normalize_map(torch.full((3, 3), 7.0)) == 0).all()


def test_recorder_keeps_the_unet_output_and_restores_processors(tiny_backbone):
    unet = tiny_backbone.unet
    before = dict(unet.attn_processors)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    emb = tiny_backbone.encode_prompt("a red circle").cond.expand(2, -1, -1)
    with torch.no_grad():
        reference = unet(z, t, encoder_hidden_states=emb).sample
        with record_cross_attention(unet) as rec:
            recorded = unet(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(recorded, reference, atol=1e-5)
    cross_layers = [n for n in before if n.endswith("attn2.processor")]
    assert len(rec.maps) == len(cross_layers) > 0
    for probs in rec.maps:
        assert probs.shape[0] == 2 and probs.shape[-1] == emb.shape[1]
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)  # softmax over the tokens
    assert dict(unet.attn_processors) == before


def test_cross_attention_map_on_the_tiny_model(tiny_backbone):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    heat = cross_attention_map(tiny_backbone, image, "a red circle")
    assert heat.shape == (32, 32) and heat.dtype == torch.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() == 1
    assert torch.equal(heat, cross_attention_map(tiny_backbone, image, "a red circle"))  # deterministic
    with pytest.raises(PeekabooError, match="timesteps"):
        cross_attention_map(tiny_backbone, image, "a red circle", timesteps=(5000,))
