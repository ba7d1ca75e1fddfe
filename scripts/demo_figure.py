"""The README's first picture: the shipped example scene segmented by the bundled model, one overlay per object.

It runs the Python API as a user would (``Segmenter.from_pretrained("bundled")`` on
``src/peekaboo/assets/examples/objects.png``, every object's prompt in one call) and writes ``docs/demo.png``: the
scene, then each prompt's overlay, labelled with the prompt and its IoU against the object's true visible pixels
(the scene is the objects generator's, :func:`peekaboo.data.example.example_scene`, so its ground truth is known).
It prints the same figures.

Example::

    python scripts/demo_figure.py
    python scripts/demo_figure.py --model bundled-shapes --out /tmp/demo.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from peekaboo import Segmenter
from peekaboo.data.example import example_scene
from peekaboo.runs.metrics import pair_scores
from peekaboo.utils.overlays import overlay

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENE = REPO_ROOT / "src" / "peekaboo" / "assets" / "examples" / "objects.png"
OUT = REPO_ROOT / "docs" / "demo.png"
LABEL_HEIGHT = 18


def labelled_row(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """The panels side by side, each with its label underneath."""
    width, height = panels[0][1].size
    row = Image.new("RGB", (width * len(panels), height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(row)
    for i, (label, panel) in enumerate(panels):
        row.paste(panel, (i * width, 0))
        draw.text((i * width + 4, height + 3), label, fill="black")
    return row


def main() -> None:
    """Parse the command line, segment the example scene, write the figure, print the IoUs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="model.pretrained (with its own preset)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    scene = example_scene()
    image = Image.open(SCENE).convert("RGB")
    if not np.array_equal(np.asarray(image), scene.image):
        raise SystemExit(f"{SCENE} is not the example scene; rerun python scripts/make_example_scene.py.")
    prompts = [obj.prompt for obj in scene.objects]
    results = Segmenter.from_pretrained(args.model)(image, prompts)
    panels = [("the scene", image)]
    for obj, result in zip(scene.objects, results, strict=True):
        iou = pair_scores(result.mask, obj.mask.astype(np.uint8))["iou"]
        panels.append((f'"{result.prompt}": IoU {iou:.2f}', overlay(image, result.mask)))
        print(f'"{result.prompt}": IoU {iou:.3f} against its visible pixels, {result.steps} steps')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labelled_row(panels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
