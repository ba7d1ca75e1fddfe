"""Paths shared by the tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = REPO / "configs"
