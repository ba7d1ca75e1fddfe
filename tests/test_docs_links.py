"""The README and docs/ link only to files that exist: a generated report moved or renamed must not leave a user
at a dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests_support import REPO

# Markdown links and images, with or without a title: [text](path) or ![alt](path "title").
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative_targets(page: Path) -> list[str]:
    """The relative link targets of a markdown page (web addresses and in-page anchors left out)."""
    targets = [m.group(1).split("#")[0] for m in LINK.finditer(page.read_text())]
    return [t for t in targets if t and not re.match(r"^[a-z]+:", t)]


def test_the_link_pattern_reads_links_and_images(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("see [a](docs/A.md), ![fig](b.png \"t\") [web](https://x.org) [here](#top) [c](C.md#part)")
    assert relative_targets(page) == ["docs/A.md", "b.png", "C.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    dead = [t for t in relative_targets(page) if not (page.parent / t).exists()]
    assert not dead, f"{page.relative_to(REPO)} links to missing files: {dead}"
