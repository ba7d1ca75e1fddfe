"""The objects accuracy gate (peekaboo.bench.gate): its pairs, its on-target rule, its faults, and the gate itself
with the bundled model."""

from __future__ import annotations

import pytest
import torch
from tests_support import REPO_CONFIGS

from peekaboo.bench import gate
from peekaboo.config import GuidanceConfig
from peekaboo.diffusion.prompts import PromptEmbeddings

FAULTS = {f.name: f for f in gate.FAULTS}


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


def _dream_gradient(backbone, estimator: str, swap_prompts: bool = False) -> torch.Tensor:
    """The dream loss's gradient w.r.t. fixed latents ``(2, 4, 8, 8)`` of the tiny model, as a run computes it;
    ``swap_prompts``: with the prompt's and the empty prompt's embeddings exchanged."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    cfg = GuidanceConfig(guidance_scale=7.5, estimator=estimator)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    emb = backbone.encode_prompt("a red circle")
    if swap_prompts:
        emb = PromptEmbeddings(emb.cond, emb.uncond)
    backbone.dream_loss(z, emb, cfg, gens)["loss"].sum().backward()
    return z.grad


@pytest.mark.parametrize("estimator", ["sds", "full"])
def test_the_sign_fault_negates_the_runs_gradient_and_is_undone(tiny_backbone, estimator):
    intact = _dream_gradient(tiny_backbone, estimator)
    with FAULTS["sign_flipped"].patch():
        assert torch.allclose(_dream_gradient(tiny_backbone, estimator), -intact)
    assert torch.equal(_dream_gradient(tiny_backbone, estimator), intact)


@pytest.mark.parametrize("estimator", ["sds", "full"])
def test_the_swap_fault_guides_away_from_the_prompt_and_is_undone(tiny_backbone, estimator):
    intact = _dream_gradient(tiny_backbone, estimator)
    with FAULTS["cond_uncond_swapped"].patch():
        swapped = _dream_gradient(tiny_backbone, estimator)
    # The run then follows the gradient it would with the prompt and the empty prompt exchanged.
    assert torch.allclose(swapped, _dream_gradient(tiny_backbone, estimator, swap_prompts=True), atol=1e-6)
    assert not torch.allclose(swapped, intact)
    assert torch.equal(_dream_gradient(tiny_backbone, estimator), intact)


def test_the_loss_fault_switches_the_dream_loss_off():
    cfg = gate.method_config(FAULTS["loss_off"].overrides, (), REPO_CONFIGS, scenes=gate.SCENES)
    assert cfg.optimization.loss.lambda_dream == 0


def _gate_result(passed: bool) -> dict:
    return {"parts": [gate.Part("default", "", 0.6 if passed else 0.1, 0.5)], "passed": passed,
            "records": {}, "seconds": {}, "shared": True}


@pytest.mark.parametrize(("intact", "caught", "status"), [(True, True, 0), (False, True, 1), (True, False, 1)])
def test_the_gate_command_fails_unless_the_intact_method_passes_and_every_fault_fails(
        monkeypatch, intact, caught, status):
    monkeypatch.setattr(gate, "run_gate", lambda extra=(), config_dir=None: _gate_result(intact if not extra
                                                                                         else not caught))
    monkeypatch.setattr(gate, "FAULTS", (gate.Fault("loss_off", "off", ("optimization.loss.lambda_dream=0",)),))
    monkeypatch.setattr(gate, "gate_pairs", lambda: [])
    monkeypatch.setattr(gate, "render", lambda result, command: "report")
    assert gate.main([]) == status


@pytest.mark.slow
def test_the_bundled_model_passes_the_objects_gate():
    result = gate.run_gate(config_dir=REPO_CONFIGS)
    failed = [f"{p.name}: {p.value:.3f} < floor {p.floor}" for p in result["parts"] if not p.passed]
    assert result["passed"], "; ".join(failed)


def test_the_script_refuses_some_faults_over_the_saved_results(monkeypatch, capsys, tmp_path):
    import importlib.util

    from tests_support import REPO

    spec = importlib.util.spec_from_file_location("gate_script", REPO / "benchmarks" / "gate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []
    monkeypatch.setattr(script.gate, "main", lambda args, prog: seen.append(args) or 0)
    one = gate.FAULTS[0].name
    with pytest.raises(SystemExit) as exc:  # its results would replace the saved ones of every fault
        script.main(["--faults", one])
    assert exc.value.code == 2
    assert "gate_objects.json holds saved results and this run computes only part of them; pass --out FILE" in (
        capsys.readouterr().err)
    assert script.main(["--faults", one, "--out", str(tmp_path / "side.json")]) == 0 and "--docs" not in seen[-1]
    assert script.main([]) == 0 and seen[-1][-4:] == ["--out", script.RESULTS, "--docs", script.DOCS]
