"""Shared fixtures: tiny diffusers pipelines built from config and saved to disk once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_support import write_scene
from tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline  # tests/ is on pytest's pythonpath (pyproject.toml)


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the ``gpu`` tests where torch sees no CUDA device (their CPU twins simulate what they check)."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
        for item in gpu:
            item.add_marker(skip)


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
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A random tiny SDXL-format pipeline folder (two text encoders, ``text_time`` UNet conditioning)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model):
    from peekaboo.config import ModelConfig
    from peekaboo.diffusion.loading import load_backbone

    return load_backbone(ModelConfig(pretrained=str(tiny_model)))
