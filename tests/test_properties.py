"""Property tests: untrusted bytes and arbitrary command lines give a result or one user error, never a crash.

- Any bytes in an image file: :func:`peekaboo.utils.images.load_image` returns upright 8-bit RGB or raises
  :class:`~peekaboo.errors.ImageError`. Besides raw random bytes, the bytes are mostly *mutated real images*
  (flipped bytes, cut short) of every common format, so the decoders get past the magic number.
- Any ``key=value`` list: :func:`peekaboo.config.load_config` returns a config or raises
  :class:`~peekaboo.errors.ConfigError`. Keys are the real config keys plus garbage; values are text,
  numbers, YAML specials, interpolations and broken brackets.
"""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tests_support import REPO_CONFIGS

from peekaboo.config import PredictConfig, TrainConfig, load_config
from peekaboo.errors import ConfigError, ImageError
from peekaboo.utils import images

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "PCX")
# Pillow's decoders warn about the corrupt metadata these examples are made of; that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _seed_images() -> list[bytes]:
    """Small valid images in every common format (RGB, RGBA, 16-bit and palette PNG, CMYK JPEG)."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    images = [Image.fromarray(rgb), Image.fromarray(rgb).convert("RGBA"), Image.fromarray(rgb).convert("P"),
              Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), Image.fromarray(rgb).convert("CMYK")]
    out = []
    for fmt in FORMATS:
        buf = _io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        out.append(buf.getvalue())
    for img, fmt in zip(images[1:], ("PNG", "PNG", "PNG", "JPEG"), strict=True):
        buf = _io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def image_bytes(draw) -> bytes:
    """Raw random bytes, or a real image with a few bytes overwritten and possibly cut short."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_bytes())
def test_any_bytes_load_as_rgb_or_raise_image_error(data, tmp_path_factory):
    path = Path(tmp_path_factory.getbasetemp()) / "fuzz.img"
    path.write_bytes(data)
    try:
        img = images.load_image(path, max_pixels=1_000_000)
    except ImageError as err:
        assert str(path) in str(err)  # every message names the file
        return
    assert img.mode == "RGB" and min(img.size) >= images.MIN_SIDE


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        child = node._get_node(key)
        full = f"{prefix}{key}"
        keys += [full] if not isinstance(child, DictConfig) else [full, *_leaf_keys(child, full + ".")]
    return keys


PREDICT_KEYS = _leaf_keys(OmegaConf.structured(PredictConfig))
TRAIN_KEYS = _leaf_keys(OmegaConf.structured(TrainConfig))
SPECIAL_VALUES = ("", " ", "inf", "-inf", "nan", ".nan", "null", "~", "true", "???", "[1,2", "[", "]", "{a: 1}",
                  "{", "${x}", "${oc.env:HOME}", "${image}", "'quoted", "a: b", "- x", "0", "-1", "1e400", "0x10",
                  "[0.5, 0.5]", "[1, [2]]", "\x00", "shapes", "sd15", "../x", "/", "é🟢猫", "1" * 40)


def _values():
    return st.one_of(st.sampled_from(SPECIAL_VALUES), st.text(max_size=20), st.integers().map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def _overrides(keys: list[str]):
    key = st.one_of(st.sampled_from(keys), st.sampled_from(("model", "data")), st.text(max_size=12))
    pair = st.tuples(key, _values()).map(lambda kv: f"{kv[0]}={kv[1]}")
    return st.lists(st.one_of(pair, st.text(max_size=10)), max_size=4)


def _returns_or_config_error(schema, base: list[str], argv: list[str], task: str) -> None:
    try:
        cfg = load_config(schema, [*base, *argv], REPO_CONFIGS, task)
    except ConfigError as err:
        assert str(err).strip()
        return
    assert OmegaConf.is_config(cfg)


@settings(max_examples=100, deadline=None)
@given(argv=_overrides(PREDICT_KEYS))
def test_any_predict_overrides_give_a_config_or_config_error(argv):
    _returns_or_config_error(PredictConfig, ["image=x.png", "prompt=a red circle"], argv, "predict")


@settings(max_examples=50, deadline=None)
@given(argv=_overrides(TRAIN_KEYS))
def test_any_train_overrides_give_a_config_or_config_error(argv):
    _returns_or_config_error(TrainConfig, ["run.name=x"], argv, "train")
