"""Render the example scene of ``make demo`` and the README: everyday objects over a photograph.

The scene is :func:`peekaboo.data.example.example_scene` (which says how its seed was picked): two objects of
kinds that do not look alike over a photograph, at a seed outside every split's seed block, at 256 px. It writes
``src/peekaboo/assets/examples/objects.png`` and prints the objects' prompts.

Example::

    python scripts/make_example_scene.py
    python scripts/make_example_scene.py --seed 600000001 --out /tmp/other.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from peekaboo.data.example import EXAMPLE_SEED, EXAMPLE_SIZE, example_scene

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "src" / "peekaboo" / "assets" / "examples" / "objects.png"


def main() -> None:
    """Parse the command line, render the scene, save it, print its prompts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=EXAMPLE_SEED)
    parser.add_argument("--size", type=int, default=EXAMPLE_SIZE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    scene = example_scene(args.seed, args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(args.out)
    print(f"wrote {args.out}: {scene.caption!r} over {scene.background}")
    for obj in scene.objects:
        print(f'  prompt="{obj.prompt}"')


if __name__ == "__main__":
    main()
