"""The ``data=folder`` source: images under a folder times their prompts (sidecars or data.prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_support import REPO_CONFIGS

from peekaboo.app.cli import train_main
from peekaboo.config import DataConfig, TrainConfig, load_config
from peekaboo.data import build_source
from peekaboo.data.folder import folder_pairs
from peekaboo.errors import ConfigError, PeekabooError

FAST = ["trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "optimization.mask.size=16", "run.logger=none", "data.pairs_per_step=1"]


def _image(path: Path, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), (40, 120, 200), np.uint8)
    arr[4:12, 4:12] = (220, 30, 30)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """b.png and c.webp (no sidecar), pets/a.JPG with a sidecar, a hidden folder and a non-image file."""
    root = tmp_path / "photos"
    _image(root / "b.png")
    _image(root / "c.webp")
    _image(root / "pets" / "a.JPG")
    (root / "pets" / "a.txt").write_text("a red square\n\n  a cat  \na red square\n")
    _image(root / ".cache" / "hidden.png")
    (root / "notes.md").write_text("not an image")
    return root


def test_pairs_are_sorted_images_times_prompts_with_sidecars_replacing(photos):
    pairs = folder_pairs(photos, ["a dog", "a hat", "a dog"], [".png", "jpg", ".WEBP"])
    assert [p.id for p in pairs] == ["b.png:a dog", "b.png:a hat", "c.webp:a dog", "c.webp:a hat",
                                     "pets/a.JPG:a red square", "pets/a.JPG:a cat"]
    assert pairs[4].meta == {"image": "pets/a.JPG"} and pairs[4].path == photos / "pets" / "a.JPG"
    assert all(p.load_target() is None for p in pairs)
    assert pairs[0].load_image().size == (24, 20)
    # Stable: listing again gives the same ids in the same order.
    assert [p.id for p in folder_pairs(photos, ["a dog", "a hat"], [".png", ".jpg", ".webp"])] == [p.id for p in pairs]


def test_build_source_from_the_config_group(photos):
    cfg = load_config(TrainConfig, ["data=folder", f"data.root={photos}", "data.prompts=a dog", "run.name=x"],
                      REPO_CONFIGS, "train")
    assert cfg.data.extensions == [".png", ".jpg", ".jpeg", ".webp"]
    assert [p.id for p in build_source(cfg.data)][:2] == ["b.png:a dog", "c.webp:a dog"]


@pytest.mark.parametrize("setup, kind, words", [
    (lambda r: r / "nowhere", ConfigError, ["nowhere", "does not exist"]),
    (lambda r: _image(r / "file.png"), ConfigError, ["file.png", "not a folder"]),
    (lambda r: r, PeekabooError, ["No images", "data.extensions"]),
])
def test_bad_roots(tmp_path, setup, kind, words):
    root = setup(tmp_path)
    with pytest.raises(kind) as err:
        folder_pairs(root, ["a cat"], [".png"])
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value)


def test_image_without_prompts_names_its_sidecar(photos):
    with pytest.raises(PeekabooError, match=r"b\.png has no prompt.*b\.txt.*data\.prompts"):
        folder_pairs(photos, [], [".png"])


def test_empty_sidecar(photos):
    (photos / "b.txt").write_text("\n  \n")
    with pytest.raises(PeekabooError, match=r"Prompt file .*b\.txt is empty"):
        folder_pairs(photos, ["a dog"], [".png"])


def test_missing_root_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_source(DataConfig(source="folder"))


def test_empty_prompt_and_extensions(photos):
    with pytest.raises(ConfigError, match=r"data.prompts\[1\] is empty"):
        folder_pairs(photos, ["a dog", " "], [".png"])
    with pytest.raises(ConfigError, match=r"data\.extensions is empty"):
        folder_pairs(photos, ["a dog"], [])


def test_train_main_end_to_end_without_ground_truth(tiny_model, photos, tmp_path, capsys):
    args = [f"model.pretrained={tiny_model}", f"run.root={tmp_path / 'runs'}", "run.name=f", "data=folder",
            f"data.root={photos}", "data.prompts=[a dog]", *FAST]
    assert train_main(args, REPO_CONFIGS) == 0
    run = tmp_path / "runs" / "f"
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["b.png:a dog", "c.webp:a dog", "pets/a.JPG:a red square",
                                         "pets/a.JPG:a cat"]
    assert all(r["status"] == "done" and "iou" not in r for r in results)
    assert all(Image.open(run / r["outputs"]["mask"]).size == (24, 20) for r in results)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["done"] == 4 and summary["scored"] == 0 and summary["miou"] is None
    assert "mIoU n/a (no ground truth)" in capsys.readouterr().out
    # Resume: a rerun finds every pair done and changes nothing.
    before = (run / "results.jsonl").read_text()
    assert train_main(args, REPO_CONFIGS) == 0
    assert (run / "results.jsonl").read_text() == before
