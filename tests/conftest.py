"""Shared fixtures: tiny diffusers pipelines built from config and saved to disk once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

from tiny import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


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
