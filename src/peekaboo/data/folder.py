"""Folder source: every image under a folder, times the prompts given for it; no ground truth needed.

::

    photos/
      beach.jpg                 segmented for every prompt of data.prompts
      pets/tom.png
      pets/tom.txt              "a cat" and "a collar": tom.png's own prompts, one per line

Rules:

- Images are found recursively under ``data.root`` and sorted by their path relative to it, so the pair order
  (and which worker gets which pair) does not depend on the file system. Names and folders starting with
  ``.`` are skipped (``.ipynb_checkpoints``, editor files). ``data.extensions`` matches case-insensitively.
- A sidecar ``<image stem>.txt`` beside an image lists that image's prompts, one per line (blank lines
  skipped, repeats dropped). It REPLACES ``data.prompts`` for that image: a sidecar says what is in its image,
  and merging in prompts written for other images would ask for objects it does not contain. Images without a
  sidecar get ``data.prompts``.
- Pair ids are ``<relative path>:<prompt>`` (e.g. ``pets/tom.png:a cat``): stable across runs, unique, and
  they name each pair's outputs (made safe for file systems by the runner).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from peekaboo.data.base import Pair, no_target
from peekaboo.errors import ConfigError, PeekabooError
from peekaboo.utils.images import load_image

SIDECAR_SUFFIX = ".txt"
# Between an image's relative path and a prompt in a pair id.
ID_SEPARATOR = ":"


def folder_pairs(root: str | os.PathLike, prompts: Sequence[str], extensions: Sequence[str]) -> list[Pair]:
    """One pair per (image under ``root``, prompt for that image), images sorted by relative path.

    Args:
        root: the folder searched recursively.
        prompts: the prompts of every image without a sidecar ``<stem>.txt``.
        extensions: image suffixes to pick up, e.g. ``[".png", ".jpg"]`` (case-insensitive; the dot optional).

    Returns:
        Pairs with ids ``<relative path>:<prompt>``, no ground truth, and ``meta = {"image": <relative path>}``.

    Raises:
        ConfigError: ``root`` missing or not a folder, no extensions, or an empty prompt in ``prompts``.
        PeekabooError: no image found, an image with neither a sidecar nor ``data.prompts``, or an empty or
            unreadable sidecar.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"data.root={root} {what}; pass the folder holding your images.")
    suffixes = _suffixes(extensions)
    common = _clean_prompts(prompts)
    images = _find_images(folder, suffixes)
    if not images:
        raise PeekabooError(f"No images ({', '.join(suffixes)}) under data.root={folder}; check the folder, or "
                            "add your images' extensions to data.extensions.")
    pairs = []
    for image in images:
        relative = image.relative_to(folder).as_posix()
        for prompt in _image_prompts(image, common):
            pairs.append(Pair(
                id=f"{relative}{ID_SEPARATOR}{prompt}",
                prompt=prompt,
                load_image=functools.partial(load_image, image),
                load_target=no_target,
                meta={"image": relative},
                path=image,
            ))
    return pairs


def _suffixes(extensions: Sequence[str]) -> tuple[str, ...]:
    suffixes = tuple(dict.fromkeys("." + str(e).strip().lstrip(".").lower() for e in extensions if str(e).strip()))
    if not suffixes:
        raise ConfigError("data.extensions is empty; list the image suffixes to pick up, e.g. "
                          "data.extensions=[.png,.jpg].")
    return suffixes


def _clean_prompts(prompts: Sequence[str]) -> list[str]:
    cleaned = []
    for i, prompt in enumerate(prompts):
        text = str(prompt).strip()
        if not text:
            raise ConfigError(f"data.prompts[{i}] is empty; give the object to segment, e.g. "
                              "data.prompts=[\"a cat\"].")
        cleaned.append(text)
    return list(dict.fromkeys(cleaned))


def _find_images(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Image files under ``folder``, sorted by relative path, hidden names skipped, symlinked folders not
    followed (a link back up would loop)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _image_prompts(image: Path, common: list[str]) -> list[str]:
    """The sidecar's prompts if ``image`` has one, else ``common``."""
    sidecar = image.with_suffix(SIDECAR_SUFFIX)
    if not sidecar.is_file():
        if not common:
            raise PeekabooError(f"Image {image} has no prompt: write its prompts into {sidecar} (one per line) or "
                                "give data.prompts=[...] for every image without one.")
        return common
    try:
        lines = sidecar.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise PeekabooError(f"Prompt file {sidecar} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as err:
        raise PeekabooError(f"Prompt file {sidecar} cannot be read ({err.strerror}); fix its permissions.") from None
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise PeekabooError(f"Prompt file {sidecar} is empty; write one prompt per line, or delete it to use "
                            "data.prompts.")
    return prompts
