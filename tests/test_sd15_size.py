"""``benchmarks/sd15_size.py``: one setting measured in a fresh process, the pairs per step derived from the
figures, and where the script may write its section of docs/PERFORMANCE.md."""

import importlib.util

import pytest
from tests_support import REPO, REPO_CONFIGS

from peekaboo.bench import sd15_size
from peekaboo.bench.common import MB
from peekaboo.bench.sd15_size import GB, Measurement, Setting, pairs_that_fit, usable_gb
from peekaboo.bench.throughput.report import BLOCKS, GPU_BLOCK, SD15_CPU_BLOCK


def _measurement(setting=sd15_size.SETTINGS[0], weights_mb=4000.0, activations_mb=3000.0) -> Measurement:
    loaded = 1000.0 + weights_mb
    return Measurement(setting, pairs=1, step_s=20.0, cpu_step_s=39.0, steps=[25.0, 20.0, 20.0], warmup=1,
                       fixed_s=5.0, load_s=8.0, weights_mb=weights_mb, libraries_mb=1000.0, load_peak_mb=loaded + 50,
                       loaded_mb=loaded, step_peak_mb=loaded + activations_mb, maxrss_mb=loaded + activations_mb,
                       threads=2)


def test_one_setting_is_measured_in_a_fresh_process(tiny_model):
    setting = Setting("bf16", True, "full")  # every switch away from the default at once
    m = sd15_size.in_fresh_process(sd15_size.measure_setting, str(tiny_model), setting, 0, 1, 1, 1,
                                   str(REPO_CONFIGS))
    assert m.setting == setting and len(m.steps) == 1 and m.step_s > 0 and m.cpu_step_s > 0
    assert 0 < m.weights_mb < m.loaded_mb <= m.load_peak_mb and m.libraries_mb < m.loaded_mb
    assert m.step_peak_mb > 0 and m.maxrss_mb >= max(m.load_peak_mb, m.step_peak_mb) - 1


def test_settings_are_named_on_the_command_line_and_become_overrides():
    args = sd15_size.parser("x").parse_args(["--settings", "bf16+ckpt, fp32+full"])
    assert sd15_size.chosen_settings(args) == [Setting("bf16", True), Setting("fp32", False, "full")]
    assert "optimization.guidance.estimator=full" in Setting("fp32", False, "full").overrides()
    assert "optimization.guidance.estimator=sds" in Setting("fp32", False).overrides()
    assert Setting("bf16", False, "full").label == "bf16, VAE checkpointing off, estimator full"
    assert len({s.name for s in sd15_size.SETTINGS}) == len(sd15_size.SETTINGS)


def test_the_pairs_that_fit_take_the_weights_once_and_the_activations_per_pair():
    m = _measurement(weights_mb=4000.0, activations_mb=3000.0)
    for card in sd15_size.GPU_SIZES_GB:
        n = pairs_that_fit(m, card)
        free = usable_gb(card) * GB - 4000 * MB
        assert n * 3000 * MB <= free < (n + 1) * 3000 * MB
    assert pairs_that_fit(_measurement(weights_mb=30_000.0), 24) == 0
    assert pairs_that_fit(m, 24) < pairs_that_fit(m, 40) < pairs_that_fit(m, 80)


def test_the_section_says_what_is_measured_and_what_is_derived():
    ms = [_measurement(s, 4000.0 / (2 if s.precision == "bf16" else 1), 3000.0 / (2 if s.checkpointing else 1))
          for s in sd15_size.SETTINGS]
    text = sd15_size.section(ms, "python benchmarks/sd15_size.py", ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), 600.0)
    assert "| fp32, VAE checkpointing off | 20.0 | 39.0 |" in text and "**Derived, not measured**" in text
    derived = [ln for ln in text.splitlines() if ln.startswith("| bf16, VAE checkpointing on |")][-1]
    assert derived == "| bf16, VAE checkpointing on | " + " | ".join(
        str(pairs_that_fit(ms[3], g)) for g in sd15_size.GPU_SIZES_GB) + " |"
    assert "fp32: peak" in text and "bf16: peak" in text


# -- where benchmarks/sd15_size.py writes ---------------------------------------------------------------------
def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("sd15_script", REPO / "benchmarks" / "sd15_size.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def measure(args, command):
        calls.append([s.label for s in sd15_size.chosen_settings(args)])
        return "stub figures"

    monkeypatch.setattr(script.sd15_size, "measure", measure)
    return script, calls


def _repository_docs() -> dict:
    return {p: p.read_bytes() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*"))] if p.is_file()}


def test_only_the_default_run_writes_its_section_and_keeps_the_rest(monkeypatch, tmp_path):
    script, calls = _script(monkeypatch)
    docs = tmp_path / "docs"
    docs.mkdir()
    report = docs / "PERFORMANCE.md"
    report.write_text("# Performance\n\nthe CPU sections\n\n" + "\n\n".join(
        f"{start}\n{body}\n{end}" for (start, end), body in BLOCKS.items()) + "\n")
    monkeypatch.setattr(script, "DOCS", docs)
    monkeypatch.setattr(script, "DEFAULT_OUT", report)
    monkeypatch.setattr(script, "README", tmp_path / "README.md")
    assert script.main(["--model-dir", str(tmp_path / "model")]) == 0
    assert calls == [[s.label for s in sd15_size.SETTINGS]]
    text = report.read_text()
    start, end = SD15_CPU_BLOCK
    assert f"{start}\n## {sd15_size.TITLE}\n\nstub figures\n{end}" in text
    assert text.startswith("# Performance\n\nthe CPU sections\n") and BLOCKS[GPU_BLOCK] in text


@pytest.mark.parametrize("argv", [["--settings", "fp32"], ["--steps", "1"], ["--pairs", "2"], ["--out", "-"]])
def test_a_run_of_some_settings_or_other_steps_only_prints(monkeypatch, argv):
    script, calls = _script(monkeypatch)
    before = _repository_docs()
    assert script.main(argv) == 0 and calls
    assert _repository_docs() == before


@pytest.mark.parametrize("argv", [["--steps", "1", "--out", "docs/PERFORMANCE.md"], ["--out", "docs/SD15.md"],
                                  ["--out", "README.md"], ["--settings", "fp16"]])
def test_the_repository_documents_and_unknown_settings_are_refused_before_measuring(monkeypatch, argv):
    monkeypatch.chdir(REPO)
    script, calls = _script(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and not calls


def test_a_side_file_gets_the_section(monkeypatch, tmp_path):
    script, _ = _script(monkeypatch)
    assert script.main(["--settings", "bf16+ckpt", "--out", str(tmp_path / "sd15.md")]) == 0
    assert (tmp_path / "sd15.md").read_text() == f"## {sd15_size.TITLE}\n\nstub figures\n"
