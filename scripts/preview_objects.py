"""Save a contact sheet of object scenes (:mod:`peekaboo.data.objects`) with their masks outlined.

Each tile shows one scene, enlarged, with every object's visible-pixel mask outlined in its own colour, and under
it the caption, the background source and, per object, its name (an asterisk marks an occluded one).

Example::

    python scripts/preview_objects.py /tmp/objects.png --split eval --scenes 16 --size 64
    python scripts/preview_objects.py /tmp/train.png --split train --size 128
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from peekaboo.data.objects import EVAL_SPLITS, ObjectScene, eval_pairs, training_scene

OUTLINE_COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0))
TILE = 256
TEXT_H = 44


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: mask pixels with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def tile(scene: ObjectScene, outlines: bool) -> Image.Image:
    """One scene enlarged to TILE px, outlines drawn at the enlarged resolution, captions below."""
    size = scene.image.shape[0]
    factor = max(1, TILE // size)
    big = np.repeat(np.repeat(scene.image, factor, axis=0), factor, axis=1).copy()
    if outlines:
        for i, obj in enumerate(scene.objects):
            mask = np.repeat(np.repeat(obj.mask, factor, axis=0), factor, axis=1)
            big[outline(mask)] = OUTLINE_COLOURS[i % len(OUTLINE_COLOURS)]
    canvas = Image.new("RGB", (big.shape[1], big.shape[0] + TEXT_H), "white")
    canvas.paste(Image.fromarray(big), (0, 0))
    draw = ImageDraw.Draw(canvas)
    names = ", ".join(o.kind + ("*" if o.occluded else "") for o in scene.objects)
    draw.text((2, big.shape[0] + 1), scene.caption[:44], fill="black")
    draw.text((2, big.shape[0] + 15), scene.background[:44], fill=(90, 90, 90))
    draw.text((2, big.shape[0] + 29), names[:44], fill=(0, 0, 160))
    return canvas


def main() -> None:
    """Parse the command line and save the contact sheet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("/tmp/objects_preview.png"))
    parser.add_argument("--split", default="eval", choices=("train", *EVAL_SPLITS))
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--start", type=int, default=0, help="first scene index")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--no-outlines", action="store_true")
    args = parser.parse_args()
    if args.split == "train":
        scenes = [training_scene(args.start + i, args.size) for i in range(args.scenes)]
    else:
        seen: dict[int, ObjectScene] = {}
        for pair in eval_pairs(args.split, 4 * (args.start + args.scenes), args.size):
            seen.setdefault(pair.scene.seed, pair.scene)
        scenes = list(seen.values())[args.start:args.start + args.scenes]
    tiles = [tile(scene, not args.no_outlines) for scene in scenes]
    width, height = tiles[0].size
    rows = -(-len(tiles) // args.columns)
    sheet = Image.new("RGB", (args.columns * (width + 4), rows * (height + 4)), (200, 200, 200))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % args.columns) * (width + 4), (i // args.columns) * (height + 4)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(tiles)} {args.split} scenes at {args.size} px)")


if __name__ == "__main__":
    main()
