"""A pair's result as files: one finalization (alpha -> original size -> 8 bits -> binary), one writer, one reader,
and an overlay that shows the mask whatever the object's colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from peekaboo.utils import files, images, overlays


def _red_square_scene() -> tuple[Image.Image, np.ndarray]:
    arr = np.full((40, 50, 3), (40, 120, 200), np.uint8)
    arr[10:30, 15:35] = (220, 30, 30)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    return Image.fromarray(arr), mask


def test_finalize_maps_back_quantizes_then_thresholds():
    img = Image.new("RGB", (8, 4))
    _, placement = images.fit_square(img, 8, "pad")  # a 8x4 image padded to 8x8: rows 2..5 are the image
    alpha = torch.zeros(8, 8)
    alpha[2:6, :4] = 0.502  # 128.01 -> 128 after quantization: just above 0.5 as saved
    alpha[2:6, 4:] = 0.498  # 126.99 -> 127: just below
    final = images.finalize_mask(alpha, placement, threshold=0.5)
    assert final.alpha_u8.shape == final.mask.shape == (4, 8)
    assert (final.alpha_u8[:, :4] == 128).all() and (final.alpha_u8[:, 4:] == 127).all()
    assert final.mask[:, :4].all() and not final.mask[:, 4:].any()
    assert final.area == 0.5
    assert final.alpha.dtype == np.float32 and final.alpha.max() == pytest.approx(128 / 255)


def test_written_files_read_back_as_the_final_mask(tmp_path):
    img, mask = _red_square_scene()
    final = images.FinalMask(alpha_u8=(mask * 200).astype(np.uint8), mask=mask)
    paths = files.write_pair_files(img, final, {k: tmp_path / f"{k}.png" for k in files.PAIR_FILES})
    assert set(paths) == set(files.PAIR_FILES)
    assert np.array_equal(images.read_mask(paths["mask"]), mask)
    assert np.array_equal(np.asarray(Image.open(paths["alpha"])), final.alpha_u8)
    assert np.array_equal(np.asarray(Image.open(paths["cutout"]))[..., 3], final.alpha_u8)
    with pytest.raises(ValueError, match="unknown pair file kinds"):
        files.write_pair_files(img, final, {"heatmap": tmp_path / "h.png"})


def test_read_mask_of_a_broken_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(images.ImageError, match=r"Saved mask .*mask\.png cannot be read"):
        images.read_mask(bad)


@pytest.mark.parametrize("colour", [(220, 30, 30), (30, 160, 50), (30, 70, 220), (240, 210, 30), (255, 0, 255)])
def test_overlay_shows_the_mask_whatever_the_object_colour(colour):
    arr = np.full((40, 50, 3), (128, 128, 128), np.uint8)
    arr[10:30, 15:35] = colour
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    out = np.asarray(overlays.overlay(Image.fromarray(arr), mask)).astype(int)
    edge = overlays.mask_outline(mask)
    inner = mask & ~edge
    assert (out[inner] == colour).all()  # the object itself is untouched
    # The outline stands out from the object it surrounds: far from its colour in RGB.
    assert np.linalg.norm(out[edge] - np.asarray(colour), axis=1).min() > 150
    # Outside is dimmed and desaturated: darker and greyer than the input.
    outside = ~mask
    assert out[outside].mean() < 0.6 * arr[outside].mean()
    in_sat = arr[outside].max(1) - arr[outside].min(1)
    out_sat = out[outside].max(1) - out[outside].min(1)
    assert (out_sat <= in_sat).all()


def test_overlay_of_an_empty_mask_only_dims():
    img, _ = _red_square_scene()
    out = np.asarray(overlays.overlay(img, np.zeros((40, 50), bool)))
    assert out.shape == (40, 50, 3) and out.mean() < np.asarray(img).mean()
