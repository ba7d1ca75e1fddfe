"""Using the mask: editing the segmented region from a new prompt, and text to RGBA (``generate=``).

The tiny random model checks the mechanics (exactly unchanged pixels outside the dilated mask, file layout,
reproducibility); the bundled shapes model checks that an edit really puts the new object where the old one
was.
"""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import FAST, REPO_CONFIGS

from peekaboo import ops
from peekaboo.app import edit
from peekaboo.app.cli import predict_main
from peekaboo.config import EditConfig, ModelConfig, SamplingConfig
from peekaboo.diffusion import pipelines
from peekaboo.errors import ConfigError

PREDICT_FAST = [*FAST, "trainer.max_steps=3", "tensorboard=false", "sampling.steps=4"]


def _disc_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Reference dilation by a Euclidean disc, written independently of :func:`peekaboo.ops.dilate` (numpy shifts)."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    arr = np.full((30, 52, 3), (40, 120, 200), np.uint8)
    arr[5:20, 10:25] = (220, 30, 30)
    Image.fromarray(arr).save(path)
    return path


# -- the mask arithmetic ----------------------------------------------------------------------------------------
def test_dilation_matches_a_disc_and_feathering_stays_inside_it():
    mask = np.zeros((40, 50), bool)
    mask[10:22, 15:30] = True
    mask[30, 40] = True
    region, weight = ops.blend_weights(torch.from_numpy(mask), dilation=3, feather=1.5)
    assert np.array_equal(region.numpy(), _disc_dilate(mask, 3))
    w = weight.numpy()
    assert w.dtype == np.float32 and w.min() >= 0 and w.max() <= 1
    assert (w[~region.numpy()] == 0).all()  # feathering never reaches outside the region
    assert w[16, 22] > 0.999  # deep inside: fully regenerated
    assert 0 < w[10 - 3, 22] < w[10 - 1, 22] < w[12, 22]  # ramps up from the region's border inwards
    _, hard = ops.blend_weights(torch.from_numpy(mask), dilation=0, feather=0)
    assert np.array_equal(hard.numpy(), mask.astype(np.float32))


# -- editing with the tiny model --------------------------------------------------------------------------------
@pytest.mark.parametrize("fit", ["scale", "crop", "pad"])
def test_edit_region_keeps_pixels_outside_the_dilated_mask_exactly(tiny_backbone, tiny_model, fit):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))  # noise: any change shows
    mask = np.zeros((30, 44), bool)
    mask[8:20, 16:30] = True  # inside the centre crop too
    result = edit.edit_region(tiny_backbone, img, mask, "a blue square", EditConfig(dilation=2, feather=1.0),
                              SamplingConfig(steps=3), ModelConfig(pretrained=str(tiny_model)), fit=fit)
    before, after = np.asarray(img), np.asarray(result.image)
    assert result.image.size == img.size and result.image.mode == "RGB"
    outside = ~_disc_dilate(mask, 2)
    assert np.array_equal(after[outside], before[outside])
    assert (after[mask] != before[mask]).any(axis=-1).mean() > 0.9


def test_a_nine_channel_inpainting_unet_is_conditioned_on_the_mask(tiny_backbone, tiny_model):
    """A dedicated inpainting UNet (latents + mask + masked-image latents in) takes the pipeline's other path."""
    from diffusers import UNet2DConditionModel

    from peekaboo.diffusion.backbone import Backbone

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**tiny_backbone.unet.config, "in_channels": pipelines.INPAINT_CHANNELS})
    b = tiny_backbone
    inpaint = Backbone(b.vae, unet, b.text_encoder, b.tokenizer, {"prediction_type": "epsilon"}, b.resolution)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), bool)
    mask[4:12, 20:28] = True
    result = edit.edit_region(inpaint, img, mask, "a red circle", EditConfig(dilation=1, feather=0),
                              SamplingConfig(steps=2), ModelConfig(pretrained=str(tiny_model)))
    before, after = np.asarray(img), np.asarray(result.image)
    outside = ~_disc_dilate(mask, 1)
    assert np.array_equal(after[outside], before[outside]) and (after[mask] != before[mask]).any()


def test_edit_command_writes_edited_and_compare(tiny_model, image_path, tmp_path):
    out = tmp_path / "out"
    argv = [f"image={image_path}", "prompt=a red circle", "edit.prompt=a blue square", "edit.dilation=2",
            f"model.pretrained={tiny_model}", f"output_dir={out}", *PREDICT_FAST]
    assert predict_main(argv, REPO_CONFIGS) == 0
    folder = out / "scene" / "a_red_circle"
    before, after = _png(image_path), _png(folder / "edited.png")
    mask = _png(folder / "mask.png") == 255
    assert after.shape == before.shape and mask.any()
    outside = ~_disc_dilate(mask, 2)
    assert np.array_equal(after[outside], before[outside])
    assert (after[mask] != before[mask]).any(axis=-1).mean() > 0.9
    compare = Image.open(folder / "edit_compare.png")
    assert compare.size == (3 * before.shape[1], before.shape[0])
    strip = np.asarray(compare)
    w = before.shape[1]
    assert np.array_equal(strip[:, :w], before) and np.array_equal(strip[:, 2 * w :], after)


# -- text to RGBA with the tiny model ---------------------------------------------------------------------------
def test_generate_writes_rgba_with_the_saved_alpha_and_a_seed_reproduces_it(tiny_model, tmp_path):
    files = ("sample.png", "a_green_triangle/rgba.png", "a_green_triangle/alpha.png", "a_green_triangle/mask.png")
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        argv = ["generate=a green triangle", f"sampling.seed={seed}", f"model.pretrained={tiny_model}",
                f"output_dir={out}", *PREDICT_FAST]
        assert predict_main(argv, REPO_CONFIGS) == 0
        runs.append({f: (out / "a_green_triangle" / f).read_bytes() for f in files})
    root = tmp_path / "a" / "a_green_triangle"
    rgba = Image.open(root / "a_green_triangle" / "rgba.png")
    assert rgba.mode == "RGBA" and rgba.size == (32, 32)  # the tiny model's native resolution
    pixels = np.asarray(rgba)
    assert np.array_equal(pixels[..., 3], _png(root / "a_green_triangle" / "alpha.png"))
    assert np.array_equal(pixels[..., :3], _png(root / "sample.png"))
    assert runs[0] == runs[1]  # same seed: the same bytes
    assert runs[0]["sample.png"] != runs[2]["sample.png"]  # another seed: another image


def test_generate_rejects_a_size_the_model_cannot_sample(tiny_model, tmp_path, capsys):
    argv = ["generate=a red circle", "sampling.size=36", f"model.pretrained={tiny_model}",
            f"output_dir={tmp_path}", *PREDICT_FAST]
    assert predict_main(argv, REPO_CONFIGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: sampling.size=36") and "multiple of" in err[0]
    assert not any(tmp_path.iterdir())  # refused before writing anything


# -- the bundled shapes model: the edited object is where the old one was ---------------------------------------
# Eval scenes on which the whole chain works with the shipped model (its first segmentation finds all of the
# first 8 scenes' objects; the edited object is found again in 5 of them, best in these two). docs/EDITING.md has
# the measured segment -> edit -> segment figures. Batched, two pairs cost about as much as one.
BUNDLED_SCENES = (0, 6)
# Pinned rather than taken from configs/model/shapes.yaml, so retuning the preset does not move this test:
# raster_bilateral (the preset's mask today) segments this model far better than a plain raster; for the edit,
# starting from the noised input (strength 0.7) with stronger guidance makes the model draw the new colour
# inside the region (from pure noise, strength 1, it mostly paints background there).
BUNDLED_SETTINGS = ["model=shapes", "optimization.mask.kind=raster_bilateral", "edit.strength=0.7",
                    "sampling.guidance_scale=15", "sampling.steps=25", "trainer.accelerator=cpu",
                    "trainer.enable_progress_bar=false", "tensorboard=false"]


def _recolour(pair) -> str:
    """A prompt for an object absent from the scene: the old object's shape in a colour no object has."""
    from peekaboo.data.shapes import COLOURS

    used = {obj.colour for obj in pair.scene.objects}
    colour = next(c for c in COLOURS if c not in used)
    return f"a {colour} {pair.scene.objects[pair.target].shape}"


def _segment(images: list[Image.Image], prompts: list[str], ids: list[str], cfg, backbone) -> list[np.ndarray]:
    """Binary masks ``(H, W)`` bool of a batch of pairs, computed as ``predict`` computes ``mask.png``."""
    from peekaboo.optim.engine import optimize_pairs
    from peekaboo.utils.images import finalize_mask, fit_square

    fitted = [fit_square(img, cfg.optimization.mask.size, cfg.image_options.fit) for img in images]
    results = optimize_pairs(torch.stack([f[0] for f in fitted]), prompts, ids, cfg.optimization, cfg.trainer,
                             backbone, enable_progress_bar=False)
    return [finalize_mask(r.alpha, f[1], cfg.optimization.threshold).mask
            for r, f in zip(results, fitted, strict=True)]


@pytest.mark.slow
def test_bundled_edit_puts_the_new_object_where_the_old_one_was():
    from peekaboo.config import PredictConfig, load_config
    from peekaboo.data.shapes import eval_pairs
    from peekaboo.diffusion.loading import shared_backbone
    from peekaboo.runs.metrics import pair_scores

    cfg = load_config(PredictConfig, ["image=scene.png", "prompt=unused", *BUNDLED_SETTINGS], REPO_CONFIGS,
                      "predict")
    backbone = shared_backbone(cfg.model, "cpu")
    wanted = {f"eval-{i:05d}-0" for i in BUNDLED_SCENES}
    pairs = [p for p in eval_pairs("eval", 3 * max(BUNDLED_SCENES) + 3) if p.id in wanted]
    images = [Image.fromarray(p.scene.image) for p in pairs]
    new_prompts = [_recolour(p) for p in pairs]

    start = time.perf_counter()
    found = _segment(images, [p.prompt for p in pairs], [p.id for p in pairs], cfg, backbone)
    edited = []
    for img, mask, prompt in zip(images, found, new_prompts, strict=True):
        result = edit.edit_region(backbone, img, mask, prompt, cfg.edit, cfg.sampling, cfg.model)
        before, after = np.asarray(img), np.asarray(result.image)
        outside = ~_disc_dilate(mask, cfg.edit.dilation)
        assert np.array_equal(after[outside], before[outside])
        edited.append(result.image)
    refound = _segment(edited, new_prompts, [f"{p.id}-edited" for p in pairs], cfg, backbone)

    first = [pair_scores(m, p.mask.astype(np.uint8))["iou"] for m, p in zip(found, pairs, strict=True)]
    ious = [pair_scores(m, p.mask.astype(np.uint8))["iou"] for m, p in zip(refound, pairs, strict=True)]
    for p, new, a, b in zip(pairs, new_prompts, first, ious, strict=True):
        print(f"{p.id}: {p.prompt!r} IoU {a:.3f}; edited to {new!r}, found again with IoU {b:.3f}")
    print(f"mean IoU of the new object with the old object's mask: {np.mean(ious):.3f} "
          f"({time.perf_counter() - start:.0f}s)")
    assert np.mean(ious) >= 0.5, ious


def test_sampling_refuses_a_precision_the_segmentation_refuses():
    refused = pytest.raises(ConfigError, match=r"precision='16-mixed' is not one of 32-true, 32, bf16-mixed")
    with refused, pipelines.sampling_autocast(torch.device("cpu"), "16-mixed"):
        pass
