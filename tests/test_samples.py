"""The conditioning check's wrong captions: exactly one word of the named kind changes, into a caption of
another scene."""

import numpy as np
import pytest
from model_training.samples import WORD_KINDS, swap_word, wrong_caption

from peekaboo.data.shapes import WIDE, caption_for, make_scene, scene_seed


@pytest.mark.parametrize("kind", WORD_KINDS)
def test_swap_word_changes_one_word_of_its_kind(kind):
    rng = np.random.default_rng(0)
    for i in range(40):
        scene = make_scene(scene_seed("robust", i), style=WIDE)
        swapped = swap_word(scene.objects, kind, rng)
        changed = [(a, b) for a, b in zip(scene.objects, swapped, strict=True) if a.name != b.name]
        assert len(changed) == 1
        old, new = changed[0]
        other = "shape" if kind == "colour" else "colour"
        assert getattr(old, kind) != getattr(new, kind) and getattr(old, other) == getattr(new, other)
        # Still one object per (colour, shape): the wrong caption names a different, valid scene.
        assert len({o.name for o in swapped}) == len(swapped)
        true_words, wrong_words = caption_for(scene.objects).split(), caption_for(swapped).split()
        assert sum(a != b for a, b in zip(true_words, wrong_words, strict=True)) == 1


def test_unknown_word_kind_is_refused():
    scene = make_scene(scene_seed("eval", 0))
    with pytest.raises(ValueError, match="word kind"):
        wrong_caption(scene.objects, np.random.default_rng(0), "size")
