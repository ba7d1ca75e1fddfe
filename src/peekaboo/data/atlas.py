"""The emoji atlas: the object kinds of :mod:`peekaboo.data.objects` and their RGBA sprites.

The atlas ships in the package (``assets/objects/atlas.png`` and ``atlas.json``, built once from Noto Color Emoji,
Apache-2.0, by ``scripts/build_object_atlas.py``) and is the single source of the objects' vocabulary: nothing at
run or test time needs the font. Each kind has a one- or two-word ``name`` (what prompts say, e.g. ``"fire
truck"``), a ``category`` (fruit, animal, vehicle, plant, building, household), its emoji ``codepoints`` and its
``lookalikes``: the kinds it is easily mistaken for (symmetric; every kind has at least one).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ATLAS_DIR", "Atlas", "ObjectKind", "kind_names", "load_atlas"]

#: Where the atlas files live (inside the installed package, like the bundled model).
ATLAS_DIR = Path(__file__).parents[1] / "assets" / "objects"


@dataclass(frozen=True, eq=False)
class ObjectKind:
    """One object kind of the atlas."""

    name: str
    category: str
    codepoints: str
    lookalikes: tuple[str, ...]
    sprite: Image.Image  # RGBA, cropped tightly to its alpha (straight, not premultiplied, alpha)

    @property
    def opaque_pixels(self) -> int:
        """Pixels of the sprite with alpha >= 0.5."""
        return int((np.asarray(self.sprite)[..., 3] >= 128).sum())


@dataclass(frozen=True, eq=False)
class Atlas:
    """The loaded atlas: its kinds in file order and the licence note of the images."""

    kinds: tuple[ObjectKind, ...]
    licence: dict[str, str]

    @functools.cached_property
    def by_name(self) -> dict[str, ObjectKind]:
        """Kinds by name."""
        return {kind.name: kind for kind in self.kinds}

    @property
    def names(self) -> tuple[str, ...]:
        """Kind names, in file order."""
        return tuple(kind.name for kind in self.kinds)


@functools.cache
def load_atlas(directory: Path = ATLAS_DIR) -> Atlas:
    """Load (once per process) the atlas under ``directory``.

    Raises:
        FileNotFoundError: the atlas files are missing (run ``scripts/build_object_atlas.py``).
        ValueError: a box outside the PNG, or look-alikes that are not symmetric or name an unknown kind.
    """
    meta = json.loads((directory / "atlas.json").read_text())
    with Image.open(directory / "atlas.png") as png:
        sheet = png.convert("RGBA")
    kinds = []
    for entry in meta["kinds"]:
        x, y, w, h = entry["box"]
        if x < 0 or y < 0 or x + w > sheet.width or y + h > sheet.height:
            raise ValueError(f"atlas box of {entry['name']!r} lies outside the PNG")
        sprite = sheet.crop((x, y, x + w, y + h))
        sprite.load()  # detach from the sheet
        kinds.append(ObjectKind(name=entry["name"], category=entry["category"], codepoints=entry["codepoints"],
                                lookalikes=tuple(entry["lookalikes"]), sprite=sprite))
    atlas = Atlas(kinds=tuple(kinds), licence=dict(meta["licence"]))
    for kind in atlas.kinds:
        for other in kind.lookalikes:
            if other not in atlas.by_name or kind.name not in atlas.by_name[other].lookalikes:
                raise ValueError(f"look-alike {other!r} of {kind.name!r} is unknown or not symmetric")
    return atlas


def kind_names() -> tuple[str, ...]:
    """The vocabulary: every kind's name, in atlas order."""
    return load_atlas().names

