"""Build the emoji atlas that :mod:`peekaboo.data.objects` draws its scenes' objects from.

Renders one colour emoji per object kind from Debian's Noto Color Emoji font (``fonts-noto-color-emoji``) at the
font's native 109 px, checks that each glyph really rendered (some code points are missing from older fonts),
crops each sprite tightly to its alpha and lays the sprites out in a grid. Writes, under
``src/peekaboo/assets/objects/`` (this script owns both paths):

- ``atlas.png``: the RGBA sprites;
- ``atlas.json``: the licence note and, per kind, its ``name`` (what prompts say), ``category``, ``codepoints``,
  ``box`` (``[x, y, width, height]`` in the PNG) and ``lookalikes`` (names of its look-alike partners, symmetric).

The atlas is the vocabulary's single source: nothing at run or test time needs the font. Rerun this script (and
commit both files) after changing :data:`KINDS` or :data:`LOOKALIKE_GROUPS`.

Example::

    python scripts/build_object_atlas.py
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "src" / "peekaboo" / "assets" / "objects"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# The font's bitmaps are drawn at 109 px per em (136 x 128 px glyphs); other sizes are refused or rescaled.
NATIVE_PX = 109
# Glyph canvas, larger than any glyph so none is clipped.
CANVAS = 160
# Sprites whose longer side exceeds this are downscaled (keeps the PNG small; 124 px keeps them native).
MAX_SIDE = 124
# Sprites per atlas row.
COLUMNS = 8
# Gap between sprites in the atlas, so bilinear sampling of one never bleeds into its neighbour.
GAP = 2
# Opaque pixels a rendered glyph must have to count as rendered (a missing glyph draws nothing or a small box).
MIN_OPAQUE = 1000

#: (name, category, code points): one glyph per kind. Names are what prompts and captions say ("a fire truck").
KINDS: tuple[tuple[str, str, str], ...] = (
    ("apple", "fruit", "1F34E"),
    ("tomato", "fruit", "1F345"),
    ("strawberry", "fruit", "1F353"),
    ("lemon", "fruit", "1F34B"),
    ("banana", "fruit", "1F34C"),
    ("orange", "fruit", "1F34A"),
    ("dog", "animal", "1F415"),
    ("cat", "animal", "1F408"),
    ("horse", "animal", "1F40E"),
    ("cow", "animal", "1F404"),
    ("bird", "animal", "1F426"),
    ("duck", "animal", "1F986"),
    ("car", "vehicle", "1F697"),
    ("taxi", "vehicle", "1F695"),
    ("bus", "vehicle", "1F68C"),
    ("fire truck", "vehicle", "1F692"),
    ("airplane", "vehicle", "2708 FE0F"),
    ("helicopter", "vehicle", "1F681"),
    ("palm tree", "plant", "1F334"),
    ("pine tree", "plant", "1F332"),
    ("cactus", "plant", "1F335"),
    ("sunflower", "plant", "1F33B"),
    ("tulip", "plant", "1F337"),
    ("house", "building", "1F3E0"),
    ("church", "building", "26EA"),
    ("castle", "building", "1F3F0"),
    ("teapot", "household", "1FAD6"),
    ("cup", "household", "2615"),
    ("guitar", "household", "1F3B8"),
    ("violin", "household", "1F3BB"),
    ("light bulb", "household", "1F4A1"),
    ("balloon", "household", "1F388"),
)

#: Groups of kinds that look alike (same colour and build, or same silhouette); every pair within a group is a
#: look-alike pair. A kind may sit in several groups (a balloon is a red round thing, a light bulb a yellow one).
LOOKALIKE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("apple", "tomato", "strawberry"),  # red round fruit
    ("balloon", "apple", "tomato"),  # red round things
    ("lemon", "banana"),  # yellow fruit
    ("lemon", "orange"),  # citrus
    ("orange", "tomato"),  # round, orange-red, green top
    ("light bulb", "lemon"),  # yellow and round
    ("dog", "cat", "horse", "cow"),  # four-legged animals
    ("bird", "duck"),
    ("car", "taxi", "bus", "fire truck"),  # road vehicles
    ("airplane", "helicopter"),
    ("palm tree", "pine tree", "cactus"),  # tall green plants
    ("sunflower", "tulip"),  # flowers
    ("house", "church", "castle"),  # buildings
    ("teapot", "cup"),
    ("guitar", "violin"),
)

LICENCE = {
    "images": "Noto Color Emoji (https://github.com/googlefonts/noto-emoji), Apache License 2.0; rendered from "
    "Debian's fonts-noto-color-emoji by scripts/build_object_atlas.py",
    "spdx": "Apache-2.0",
}


def lookalikes() -> dict[str, list[str]]:
    """Each kind's look-alike partners (symmetric by construction), in :data:`KINDS` order."""
    names = [name for name, _, _ in KINDS]
    partners: dict[str, set[str]] = {name: set() for name in names}
    for group in LOOKALIKE_GROUPS:
        for a, b in itertools.permutations(group, 2):
            if a not in partners or b not in partners:
                raise ValueError(f"look-alike group {group} names a kind missing from KINDS")
            partners[a].add(b)
    lonely = [name for name, p in partners.items() if not p]
    if lonely:
        raise ValueError(f"kinds without a look-alike partner: {lonely}")
    return {name: [n for n in names if n in partners[name]] for name in names}


def render(font: ImageFont.FreeTypeFont, codepoints: str, max_side: int) -> Image.Image:
    """The glyph of ``codepoints`` (space-separated hex) as an RGBA sprite cropped tightly to its alpha.

    Raises:
        RuntimeError: the glyph did not render (fewer than MIN_OPAQUE opaque pixels).
    """
    text = "".join(chr(int(cp, 16)) for cp in codepoints.split())
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    alpha = np.asarray(canvas)[..., 3]
    if int((alpha >= 128).sum()) < MIN_OPAQUE:
        raise RuntimeError(f"emoji {codepoints} did not render (missing from the font?)")
    sprite = canvas.crop(canvas.getbbox(alpha_only=True))
    if max(sprite.size) > max_side:
        factor = max_side / max(sprite.size)
        new_size = (max(1, round(sprite.width * factor)), max(1, round(sprite.height * factor)))
        sprite = sprite.resize(new_size, Image.Resampling.LANCZOS)  # RGBA resize premultiplies alpha: no fringes
    # Fully transparent pixels carry no colour: zero them so the PNG compresses better.
    pixels = np.asarray(sprite).copy()
    pixels[pixels[..., 3] == 0] = 0
    return Image.fromarray(pixels, "RGBA")


def build(font_path: Path, out_dir: Path, max_side: int) -> tuple[Path, Path]:
    """Render every kind, lay the sprites out and write ``atlas.png`` and ``atlas.json`` under ``out_dir``."""
    font = ImageFont.truetype(str(font_path), NATIVE_PX)
    sprites = [render(font, codepoints, max_side) for _, _, codepoints in KINDS]
    cell_w = max(s.width for s in sprites) + GAP
    cell_h = max(s.height for s in sprites) + GAP
    rows = -(-len(sprites) // COLUMNS)
    atlas = Image.new("RGBA", (COLUMNS * cell_w, rows * cell_h), (0, 0, 0, 0))
    partners = lookalikes()
    kinds = []
    for i, ((name, category, codepoints), sprite) in enumerate(zip(KINDS, sprites, strict=True)):
        x, y = (i % COLUMNS) * cell_w, (i // COLUMNS) * cell_h
        atlas.paste(sprite, (x, y))
        kinds.append({"name": name, "category": category, "codepoints": codepoints,
                      "box": [x, y, sprite.width, sprite.height], "lookalikes": partners[name]})
    out_dir.mkdir(parents=True, exist_ok=True)
    png, meta = out_dir / "atlas.png", out_dir / "atlas.json"
    atlas.save(png, optimize=True)
    # One kind a line: the file stays short and reviewable in diffs.
    header = json.dumps({"licence": LICENCE, "font": font_path.name, "font_px": NATIVE_PX}, indent=1)[:-2]
    lines = ",\n  ".join(json.dumps(kind) for kind in kinds)
    meta.write_text(f'{header},\n "kinds": [\n  {lines}\n ]\n}}\n')
    return png, meta


def main() -> None:
    """Parse the command line and build the atlas."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", type=Path, default=FONT_PATH, help="Noto Color Emoji .ttf (CBDT bitmaps)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="downscale sprites longer than this (px)")
    args = parser.parse_args()
    png, meta = build(args.font, args.out_dir, args.max_side)
    print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KiB, {len(KINDS)} kinds) and {meta}")


if __name__ == "__main__":
    main()
