"""The quality-against-steps benchmark: which settings may be scored on snapshots of one run, the candidate
syntax, and a tiny end-to-end run whose snapshot scores equal separate shorter runs."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tests_support import REPO, REPO_CONFIGS

from peekaboo.bench import steps
from peekaboo.bench.methods import method_config
from peekaboo.errors import PeekabooError


def _cfg(*overrides: str):
    return method_config(overrides, (), REPO_CONFIGS)


def test_horizon_free_settings():
    assert steps.horizon_free(_cfg())
    assert not steps.horizon_free(_cfg("optimization.optim.schedule=cosine"))
    assert not steps.horizon_free(_cfg("optimization.optim.warmup_steps=5"))
    assert not steps.horizon_free(_cfg("optimization.guidance.t_schedule=annealed"))
    assert not steps.horizon_free(_cfg("optimization.early_stop.enabled=true"))
    # Stratified timesteps cycle by step index, not by the run's length: still one run for every count.
    assert steps.horizon_free(_cfg("optimization.guidance.t_schedule=stratified"))


def test_candidate_syntax():
    s = steps.parse_candidate("quick: optimization.optim.lr=0.1 optimization.optim.schedule=cosine")
    assert s.label == "quick" and s.overrides == ("optimization.optim.lr=0.1", "optimization.optim.schedule=cosine")
    for bad in ("no label here", ": x=1", "paper: x=1"):
        with pytest.raises(PeekabooError):
            steps.parse_candidate(bad)


def test_fewest_steps_at_a_quality():
    points = [{"steps": n, "mean_steps": n, "miou": m} for n, m in ((25, 0.3), (50, 0.55), (100, 0.6))]
    assert steps.fewest_steps(points, 0.56)["steps"] == 50  # within the 0.01 tolerance
    assert steps.fewest_steps(points, 0.61)["steps"] == 100
    assert steps.fewest_steps(points, 0.7) is None


def test_steps_command_on_the_tiny_model(tiny_model, tmp_path, capsys):
    out, docs, png = tmp_path / "s.json", tmp_path / "S.md", tmp_path / "s.png"
    common = ["--pairs", "2", "--batch-size", "2", "--config-dir", str(REPO_CONFIGS),
              "--set", f"model.pretrained={tiny_model}", "--set", "trainer.accelerator=cpu",
              "--set", "optimization.mask.size=16"]
    code = steps.main([*common, "--steps", "1", "3", "--builtins", "paper", "project",
                       "--candidate", "cos: optimization.optim.schedule=cosine",
                       "--out", str(out), "--docs", str(docs), "--plot", str(png)])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["settings"]) == ["paper", "project", "cos"]
    for s in result["settings"].values():
        assert [p["steps"] for p in s["points"]] == [1, 3]
        assert all(p["scored"] == 2 for p in s["points"])
        for p in s["points"]:  # the per-pair figures are the ones the summary averages
            assert len(p["per_pair"]) == 2 and len({r["id"] for r in p["per_pair"]}) == 2
            assert abs(sum(r["iou"] for r in p["per_pair"]) / 2 - p["miou"]) < 1e-9
            assert sum(r["wrong_object"] for r in p["per_pair"]) / 2 == p["wrong_object_rate"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = docs.read_text()
    assert "| project |" in text and "Fewest steps at the paper's quality" in text and "s.png" in text
    assert text in capsys.readouterr().out + "\n"
    # A snapshot after 1 step of the 3-step run is exactly a 1-step run (the project's settings are horizon free).
    short = tmp_path / "short.json"
    assert steps.main([*common, "--steps", "1", "--builtins", "project", "--out", str(short)]) == 0
    again = json.loads(short.read_text())["settings"]["project"]["points"][0]
    assert again["miou"] == result["settings"]["project"]["points"][0]["miou"]


def test_a_resumed_steps_run_keeps_only_the_unchanged_curves(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    common = ["--pairs", "2", "--batch-size", "2", "--config-dir", str(REPO_CONFIGS), "--steps", "1", "2",
              "--set", f"model.pretrained={tiny_model}", "--set", "optimization.mask.size=16", "--out", str(out)]
    assert steps.main([*common, "--builtins", "project"]) == 0
    first = json.loads(out.read_text())["settings"]["project"]
    ran = []
    real_curve = steps.curve

    def counted(setting, *args, **kwargs):
        ran.append(setting.label)
        return real_curve(setting, *args, **kwargs)

    monkeypatch.setattr(steps, "curve", counted)
    # The same settings, pairs and step counts: kept; a new candidate runs.
    resume = [*common, "--resume", "--builtins", "project"]
    assert steps.main([*resume, "--candidate", "g: optimization.loss.gravity=0"]) == 0
    resumed = json.loads(out.read_text())
    kept = resumed["settings"]["project"]
    assert ran == ["g"] and kept["kept"] and (kept["points"], kept["key"]) == (first["points"], first["key"])
    # The run's time counts each curve's own, the kept one's too.
    assert resumed["wall_s"] == pytest.approx(kept["seconds"] + resumed["settings"]["g"]["seconds"])
    # A setting that differs only in its own step count is the same run (snapshots): its curve is reused.
    assert steps.main([*resume, "--candidate", "short: trainer.max_steps=1"]) == 0
    reused = json.loads(out.read_text())["settings"]["short"]
    assert ran == ["g"] and reused["same_as"] == "project"
    assert reused["points"] == json.loads(out.read_text())["settings"]["project"]["points"]
    # Unless the step count sets a schedule's length: then it is a run of its own.
    assert steps.main([*resume, "--candidate", "cos: trainer.max_steps=1 optimization.optim.schedule=cosine"]) == 0
    assert ran == ["g", "cos"]
    # Another preset value (here through --set) changes the settings key: the curve runs again.
    assert steps.main([*resume, "--set", "optimization.loss.gravity=0.1"]) == 0
    assert ran == ["g", "cos", "project"]
    # Other step counts: nothing is kept.
    assert steps.main([*resume, "--steps", "1"]) == 0
    assert ran == ["g", "cos", "project", "project"]


def test_steps_user_errors(capsys, monkeypatch):
    monkeypatch.setattr(steps, "FAST", {})  # no scene set has a fast setting chosen
    assert steps.main(["--builtins", "fast", "--config-dir", str(REPO_CONFIGS)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --builtins fast: the shapes scenes have no such setting chosen yet; draw paper project, "
        "or a --candidate.")
    monkeypatch.undo()
    assert steps.main(["--steps", "0", "--config-dir", str(REPO_CONFIGS)]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert steps.main(["--builtins", "--config-dir", str(REPO_CONFIGS)]) == 2
    assert "nothing to run" in capsys.readouterr().err
    assert steps.main(["--resume", "--config-dir", str(REPO_CONFIGS)]) == 2
    assert "--out" in capsys.readouterr().err


def _script_argv(monkeypatch, argv: list[str]) -> list[str]:
    """The arguments ``benchmarks/steps.py`` hands to :func:`peekaboo.bench.steps.main` for ``argv``."""
    spec = importlib.util.spec_from_file_location("steps_script", REPO / "benchmarks" / "steps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = []
    monkeypatch.setattr(script.steps, "main", lambda args, prog: seen.append(args) or 0)
    assert script.main(argv) == 0
    return seen[0]


def test_the_script_writes_the_split_report_only_for_the_reports_own_run(monkeypatch, tmp_path):
    full = _script_argv(monkeypatch, ["--split", "eval", "--pairs", "32"])
    assert full[-6:] == ["--out", "benchmarks/results/steps_eval.json", "--docs", "docs/STEPS.md",
                         "--plot", "docs/steps.png"]
    side = str(tmp_path / "side.json")
    objects = _script_argv(monkeypatch, ["--scenes", "objects", "--split", "eval"])
    assert objects[-6:] == ["--out", "benchmarks/results/steps_objects_eval.json", "--docs", "docs/STEPS_OBJECTS.md",
                            "--plot", "docs/steps_objects.png"]
    # Each scene set draws its own fast setting, where its tune split chose one, always under the label "fast".
    assert all(s.label == "fast" for s in steps.FAST.values())
    for scenes in ("shapes", "objects"):
        drawn = steps.builtins_of(steps.parser().parse_args(["--scenes", scenes]))
        assert drawn == ["paper", "project", *(["fast"] if scenes in steps.FAST else [])]
    every = [s.label for s in steps.builtin_settings("objects")]
    assert "--docs" in _script_argv(monkeypatch, ["--scenes", "objects", "--split", "eval", "--builtins", *every])
    for argv in (["--split", "eval", "--out", side], ["--split", "robust", "--builtins", "fast", "--resume"],
                 ["--scenes", "objects", "--split", "eval", "--builtins", "paper", "--resume"],
                 ["--split", "eval", "--steps", "25", "50", "--resume"],
                 ["--split", "eval", "--candidate", "c: x=1", "--resume"]):
        assert "--docs" not in _script_argv(monkeypatch, argv) and "--plot" not in _script_argv(monkeypatch, argv)


def test_the_script_refuses_a_part_run_that_would_replace_the_saved_curves(monkeypatch, capsys):
    # Some settings or step counts written over the saved results would lose the others' curves.
    for argv in (["--split", "eval", "--builtins", "paper"], ["--split", "eval", "--steps", "25"]):
        with pytest.raises(SystemExit) as exc:
            _script_argv(monkeypatch, argv)
        assert exc.value.code == 2
        assert ("benchmarks/results/steps_eval.json holds saved results and this run computes only part of them; "
                "pass --resume to keep the rest, or --out FILE") in capsys.readouterr().err
