"""Shared fixtures: tiny diffusers pipelines built from config and saved to disk once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import build_tiny_pipeline  # tests/ is on pytest's pythonpath (pyproject.toml)

# Overrides that make any predict or train command a smoke run: 2 steps of a 16x16 mask on the CPU, no bars.
FAST_OVERRIDES = ("trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                  "optimization.mask.size=16")


@pytest.fixture(scope="session")
def fast() -> list[str]:
    """:data:`FAST_OVERRIDES` as a fresh list (tests append their own keys; a later key wins)."""
    return list(FAST_OVERRIDES)


def write_scene(path: Path, size: tuple[int, int] = (52, 30)) -> Path:
    """A small non-square RGB scene, a red square on blue, ``size`` = (width, height); returns ``path``."""
    arr = np.full((size[1], size[0], 3), (40, 120, 200), np.uint8)
    arr[5:20, 10:25] = (220, 30, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def scene_image(tmp_path) -> Path:
    """:func:`write_scene` in the test's temporary folder."""
    return write_scene(tmp_path / "scene.png")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny epsilon-prediction SD pipeline folder."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-eps") / "model")


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> Path:
    """The same architecture with a v-prediction scheduler."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v") / "model", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model):
    from peekaboo.backbone import load_backbone
    from peekaboo.config import ModelConfig

    return load_backbone(ModelConfig(pretrained=str(tiny_model)))
