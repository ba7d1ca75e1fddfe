"""The synthetic shapes scenes (peekaboo.data.shapes): pinned classic splits and the wide scene style."""

from __future__ import annotations

import hashlib

from peekaboo.data.shapes import eval_pairs, make_scene, scene_seed

# sha256 digests of the classic tune / eval pairs and of classic default-argument scenes, computed with the
# generator as it was before the wide style was added. docs/BENCHMARK.md and the CI accuracy floor were
# measured on exactly these pairs: a change here silently invalidates them.
PINNED = {
    ("pairs", "tune", 48): "104596f5d48a89f5649fdca5ef56c37aff32fd44c309ea238d74515e30f0ca4b",
    ("pairs", "eval", 200): "3fe10f248d173bd05166bccfcb5eab249d00bb4e72e74c7b42faabb85940a186",
    ("scenes", "eval", 16): "2ef8ef82b1fa1c540857da5d71f3ee7032b5c38f519ae6e2fa5211c470e76d1f",
    ("scenes", "train", 16): "125b5b09ed86748e4881c8c7ece48e692f09b52cf059c3b56e02b87dc303da51",
}


def _pairs_digest(split: str, n: int) -> str:
    h = hashlib.sha256()
    for p in eval_pairs(split, n):
        for part in (p.id, p.prompt, p.scene.caption, str(p.scene.seed)):
            h.update(part.encode())
        h.update(p.scene.image.tobytes())
        h.update(p.mask.tobytes())
    return h.hexdigest()


def _scenes_digest(split: str, n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        scene = make_scene(scene_seed(split, i))
        h.update(scene.caption.encode())
        h.update(scene.image.tobytes())
        for obj in scene.objects:
            h.update(obj.mask.tobytes())
    return h.hexdigest()


def test_classic_splits_are_pinned():
    for (kind, split, n), digest in PINNED.items():
        actual = _pairs_digest(split, n) if kind == "pairs" else _scenes_digest(split, n)
        assert actual == digest, f"{kind} of {split} changed"
