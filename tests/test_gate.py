"""The objects accuracy gate (peekaboo.bench.gate): its pairs, its on-target rule, its faults, and the gate itself
with the bundled model."""

from __future__ import annotations

import pytest
import torch
from tests_support import REPO_CONFIGS

from peekaboo.bench import gate
from peekaboo.diffusion import backbone as backbone_lib
from peekaboo.diffusion import estimators


def test_the_gate_pairs_are_both_objects_of_two_object_eval_scenes():
    pairs = gate.gate_pairs()
    assert len(pairs) == 2 * gate.GATE_SCENES
    assert all(p.id.startswith("eval-") and len(p.others) == 1 for p in pairs)
    for first, second in zip(pairs[::2], pairs[1::2], strict=True):
        scene = first.id.rsplit("-", 1)[0]
        assert (first.id, second.id) == (f"{scene}-0", f"{scene}-1")
        # Each prompt's object is the other pair's "other object": prompting each in turn.
        assert (first.others[0] == (second.target == 1)).all() and (second.others[0] == (first.target == 1)).all()
        assert first.prompt != second.prompt


@pytest.mark.parametrize(("iou", "wrong", "expected"), [
    (0.8, False, True), (gate.ON_TARGET_MIN_IOU, False, True), (0.29, False, False), (0.8, True, False),
    (None, False, False),
])
def test_a_mask_is_on_target_when_it_takes_its_object_and_reaches_the_iou(iou, wrong, expected):
    assert gate.on_target({"iou": iou, "wrong_object": wrong}) is expected


def test_part_passes_at_its_floor():
    assert gate.Part("p", "", 0.5, 0.5).passed and not gate.Part("p", "", 0.49, 0.5).passed


def test_the_sign_fault_negates_the_gradient_and_is_undone(monkeypatch):
    monkeypatch.setattr(estimators, "gradient", lambda *a, **k: torch.ones(2))
    fault = {f.name: f for f in gate.FAULTS}["sign_flipped"]
    with fault.patch():
        assert torch.equal(estimators.gradient(), -torch.ones(2))
    assert torch.equal(estimators.gradient(), torch.ones(2))


def test_the_swap_fault_exchanges_the_predictions_and_is_undone(monkeypatch):
    u, c = torch.zeros(1), torch.ones(1)
    monkeypatch.setattr(backbone_lib.Backbone, "predict_noise", lambda self, *a, **k: (u, c))
    fault = {f.name: f for f in gate.FAULTS}["cond_uncond_swapped"]
    with fault.patch():
        assert backbone_lib.Backbone.predict_noise(None) == (c, u)
    assert backbone_lib.Backbone.predict_noise(None) == (u, c)


def test_the_loss_fault_switches_the_dream_loss_off():
    fault = {f.name: f for f in gate.FAULTS}["loss_off"]
    cfg = gate.method_config(fault.overrides, (), REPO_CONFIGS, scenes=gate.SCENES)
    assert cfg.optimization.loss.lambda_dream == 0


@pytest.mark.slow
def test_the_bundled_model_passes_the_objects_gate():
    result = gate.run_gate(config_dir=REPO_CONFIGS)
    failed = [f"{p.name}: {p.value:.3f} < floor {p.floor}" for p in result["parts"] if not p.passed]
    assert result["passed"], "; ".join(failed)
