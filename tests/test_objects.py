"""The emoji "objects" scenes: atlas, backgrounds, splits, ground truth, captions and the evaluation mix."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from peekaboo.data.atlas import ATLAS_DIR, load_atlas
from peekaboo.data.backgrounds import HELD_OUT_PHOTOS, PHOTOS, TRAINING_PHOTOS
from peekaboo.data.captions import article
from peekaboo.data.object_layout import composite, place_objects
from peekaboo.data.objects import (
    CAPTION_FORMS,
    EVAL_SPLITS,
    ROBUST,
    SPLITS,
    STANDARD,
    caption_for,
    eval_pairs,
    make_scene,
    parse_caption,
    scene_seed,
    training_scene,
)


@pytest.fixture(scope="module")
def pairs_by_split() -> dict[str, list]:
    """The first 200 pairs of every evaluation split (shared: generating them is most of this file's time)."""
    return {split: eval_pairs(split, 200) for split in EVAL_SPLITS}


@pytest.fixture(scope="module")
def train_scenes() -> list:
    return [training_scene(i) for i in range(300)]


def _scenes(pairs: list) -> list:
    return list({pair.scene.seed: pair.scene for pair in pairs}.values())


def test_atlas_vocabulary_lookalikes_and_sprites():
    atlas = load_atlas()
    names = atlas.names
    assert len(names) >= 24 and len(set(names)) == len(names)
    assert all(1 <= len(name.split()) <= 2 for name in names)
    assert len({kind.category for kind in atlas.kinds}) >= 5
    for kind in atlas.kinds:
        assert kind.lookalikes, f"{kind.name} has no look-alike partner"
        for other in kind.lookalikes:
            assert kind.name in atlas.by_name[other].lookalikes, f"{kind.name} -> {other} is not symmetric"
        alpha = np.asarray(kind.sprite)[..., 3]
        assert kind.sprite.mode == "RGBA" and kind.opaque_pixels > 1000
        # Tightly cropped: every border row and column of the sprite holds some alpha.
        assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any()
    assert "Apache-2.0" in atlas.licence["spdx"]
    assert (ATLAS_DIR / "atlas.png").stat().st_size < 1_000_000


def test_split_seed_ranges_are_disjoint_and_scenes_differ(pairs_by_split, train_scenes):
    starts = sorted((scene_seed(split, 0), scene_seed(split, 10**8 - 1), split) for split in SPLITS)
    for (_, last, a), (first, _, b) in itertools.pairwise(starts):
        assert last < first, f"seed ranges of {a} and {b} overlap"
    scenes = train_scenes[:60] + [s for pairs in pairs_by_split.values() for s in _scenes(pairs)]
    digests = {hashlib.sha256(scene.image.tobytes()).hexdigest() for scene in scenes}
    assert len(digests) == len(scenes), "two scenes (of one split or two) are byte-identical"


def test_same_seed_same_bytes_and_other_seeds_differ():
    for style in (STANDARD, ROBUST):
        a, b = make_scene(12345, style=style), make_scene(12345, style=style)
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.background == b.background
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
        assert make_scene(12346, style=style).image.tobytes() != a.image.tobytes()
    first = [p.scene.image.tobytes() for p in eval_pairs("eval", 12)]
    assert first == [p.scene.image.tobytes() for p in eval_pairs("eval", 12)]


def test_layout_masks_are_the_visible_pixels_in_paste_order():
    """Independent of make_scene: paint each object's opaque pixels in paste order and compare, then check that
    the composited image shows, where an object is fully opaque, that object's own colour (the top one)."""
    atlas = load_atlas()
    kinds = [atlas.by_name[n] for n in ("dog", "cat", "fire truck")]
    checked_hidden = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        for _ in range(30):  # a crowded draw gives None; make_scene retries the same way
            layout = place_objects(rng, kinds, 64, STANDARD.layout, 0.0, [False, True, True])
            if layout is not None:
                break
        assert layout is not None
        placed, labels = layout
        expected = np.full((64, 64), -1)
        for depth, obj in enumerate(placed):
            h, w = obj.alpha.shape
            canvas = np.zeros((64 + 2 * 128, 64 + 2 * 128), dtype=bool)  # room for sprites crossing the border
            canvas[128 + obj.y:128 + obj.y + h, 128 + obj.x:128 + obj.x + w] = obj.alpha >= 0.5
            mine = canvas[128:192, 128:192]
            checked_hidden += int((mine & (expected >= 0)).sum())  # pixels this object hides
            expected[mine] = depth
        np.testing.assert_array_equal(labels, expected)
        image = composite(np.zeros((64, 64, 3), dtype=np.uint8), placed)
        touched_later = np.zeros((64, 64), dtype=bool)  # pixels where a later object has any alpha
        for depth in reversed(range(len(placed))):
            obj = placed[depth]
            h, w = obj.alpha.shape
            big_alpha = np.zeros((64 + 256, 64 + 256), dtype=np.float32)
            big_alpha[128 + obj.y:128 + obj.y + h, 128 + obj.x:128 + obj.x + w] = obj.alpha
            rgb = np.zeros((64 + 256, 64 + 256, 3), dtype=np.float32)
            rgb[128 + obj.y:128 + obj.y + h, 128 + obj.x:128 + obj.x + w] = obj.rgb
            alpha = big_alpha[128:192, 128:192]
            solid = (alpha >= 0.999) & ~touched_later
            assert (labels[solid] == depth).all()
            np.testing.assert_allclose(image[solid], rgb[128:192, 128:192][solid], atol=1.0)
            touched_later |= alpha > 0
    assert checked_hidden > 0, "no object was hidden: the check above checked nothing"


def test_scene_masks_disjoint_labels_and_occlusion():
    scene = make_scene(777, n_objects=3, occlusion=True)
    masks = np.stack([o.mask for o in scene.objects])
    assert masks.sum(axis=0).max() <= 1, "masks overlap: a hidden pixel was given to the object below"
    for index, obj in enumerate(scene.objects):
        np.testing.assert_array_equal(scene.labels == index, obj.mask)
    assert any(o.occluded for o in scene.objects)
    top = max(scene.objects, key=lambda o: o.depth)
    assert top.hidden_fraction == 0.0 and not top.occluded
    for obj in scene.objects:
        assert obj.visible_fraction >= 0.4 - 1e-9


def test_prompts_name_exactly_one_object(pairs_by_split):
    names = set(load_atlas().names)
    for pairs in pairs_by_split.values():
        for pair in pairs:
            kinds = [o.kind for o in pair.scene.objects]
            target = pair.scene.objects[pair.target].kind
            assert pair.prompt == f"{article(target)} {target}"
            assert parse_caption(pair.prompt) == [target] and target in names
            assert kinds.count(target) == 1
            assert parse_caption(pair.scene.caption) == kinds
            assert pair.mask.shape == (64, 64) and pair.mask.dtype == bool and pair.mask.any()
            split, index, obj = pair.id.rsplit("-", 2)
            assert pair.scene.seed == scene_seed(split, int(index)) and int(obj) == pair.target


def test_captions_cover_every_form_and_parse_back(train_scenes):
    names = ["dog", "fire truck", "apple"]
    assert caption_for(names, "and") == "a dog and a fire truck and an apple"
    assert caption_for(names, "the") == "the dog and the fire truck and the apple"
    assert caption_for(names, "comma") == "dog, fire truck, apple"
    assert caption_for(names, "list") == "a dog, a fire truck and an apple"
    for form in CAPTION_FORMS:
        assert parse_caption(caption_for(names, form)) == names
    seen = set()
    for scene in train_scenes:
        caption = scene.caption
        seen.add("comma" if "," in caption and " a " not in f" {caption}" else "the" if "the " in caption else "a")
        assert parse_caption(caption) == [o.kind for o in scene.objects]
    assert seen == {"comma", "the", "a"}
    with pytest.raises(ValueError):
        parse_caption("a dog and a unicorn")


def test_held_out_photos_never_reach_train(train_scenes):
    assert set(HELD_OUT_PHOTOS) <= set(PHOTOS) and len(HELD_OUT_PHOTOS) >= 3
    assert not set(HELD_OUT_PHOTOS) & set(TRAINING_PHOTOS) and len(TRAINING_PHOTOS) >= 6
    sources = [s.background for s in train_scenes] + [training_scene(i, 32).background for i in range(300, 600)]
    photos = {src.split(":", 1)[1] for src in sources if src.startswith("photo:")}
    assert photos <= set(TRAINING_PHOTOS) and len(photos) >= 6
    assert any(src.startswith("texture:") for src in sources) and any(src in ("plain", "graded") for src in sources)


def test_robust_splits_use_only_held_out_photographs(pairs_by_split):
    for split in ("robust", "tune_robust"):
        backgrounds = {scene.background for scene in _scenes(pairs_by_split[split])}
        assert {b.split(":", 1)[1] for b in backgrounds} <= set(HELD_OUT_PHOTOS)
        assert all(b.startswith("photo:") for b in backgrounds)
    for split in ("tune", "eval"):
        backgrounds = {scene.background for scene in _scenes(pairs_by_split[split])}
        assert not any(b.split(":")[-1] in HELD_OUT_PHOTOS for b in backgrounds)


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_evaluation_mix(pairs_by_split, split):
    pairs = pairs_by_split[split]
    scenes = _scenes(pairs)
    assert len(pairs) == 200 and len({p.id for p in pairs}) == 200
    textured = np.mean([not s.background.startswith(("plain", "graded")) for s in scenes])
    multi = np.mean([len(s.objects) >= 2 for s in scenes])
    occluded = np.mean([p.occluded for p in pairs])
    assert textured >= 0.7 and multi >= 0.6 and occluded >= 0.25, (textured, multi, occluded)
    kinds = load_atlas().by_name
    with_pair = [s for s in scenes if any(b.kind in kinds[a.kind].lookalikes for a in s.objects for b in s.objects)]
    assert len(with_pair) >= 0.3 * len(scenes), "too few scenes with a look-alike pair"


def test_training_mix_and_geometry(train_scenes):
    textured = np.mean([not s.background.startswith(("plain", "graded")) for s in train_scenes])
    multi = np.mean([len(s.objects) >= 2 for s in train_scenes])
    objects = [o for s in train_scenes for o in s.objects]
    occluded = np.mean([o.occluded for o in objects])
    assert textured >= 0.7 and multi >= 0.6 and occluded >= 0.25, (textured, multi, occluded)
    assert {len(s.objects) for s in train_scenes} == {1, 2, 3, 4}
    sides = np.array([max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / 64 for o in objects])
    assert sides.min() >= 0.1 and sides.max() <= 0.6 * 1.45 and np.median(sides) > 0.25  # rotation widens boxes
    crossing = [o for o in objects if min(o.box) < 0 or max(o.box) > 64]
    assert len(crossing) > 0.05 * len(objects), "no object crosses the image border"
    assert min(o.visible_fraction for o in objects) >= 0.4 - 1e-9
    assert all(len({o.kind for o in s.objects}) == len(s.objects) for s in train_scenes)


@pytest.mark.parametrize("size", [32, 512])
def test_any_size_works(size):
    scene = make_scene(scene_seed("eval", 4), size=size, n_objects=4, occlusion=True)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (size, size)
    assert all(o.mask.shape == (size, size) and o.mask.any() for o in scene.objects)


def test_object_source_pairs():
    from peekaboo.data.synthetic import synthetic_pairs
    from peekaboo.errors import ConfigError

    pairs = synthetic_pairs("val", 5, scenes="objects")
    assert [p.id for p in pairs] == [p.id for p in eval_pairs("eval", 5)]
    image, target = pairs[0].load_image(), pairs[0].load_target()
    assert image.mode == "RGB" and image.size == (64, 64)
    assert target.dtype == np.uint8 and set(np.unique(target)) <= {0, 1} and target.any()
    assert pairs[0].meta["kind"] in pairs[0].prompt
    with pytest.raises(ConfigError):
        synthetic_pairs("train", 5, scenes="objects")


def test_the_shipped_example_scene_is_the_library_example():
    from PIL import Image

    from peekaboo.data.example import example_scene

    shipped = np.asarray(Image.open(ATLAS_DIR.parent / "examples" / "objects.png").convert("RGB"))
    scene = example_scene()
    assert np.array_equal(shipped, scene.image)  # so its ground truth (scripts/demo_figure.py) is the generator's
    assert [o.prompt for o in scene.objects] == ["a light bulb", "a car"]  # the demo's prompts (Makefile, README)
    assert all(not o.occluded and o.visible_fraction == 1.0 for o in scene.objects)
