"""``benchmarks/gpu.py``: its CPU dry mode end to end, and where it may write its section of docs/PERFORMANCE.md."""

import importlib.util

import pytest
import torch
from tests_support import REPO

from peekaboo.bench import gpu_check
from peekaboo.bench.throughput.report import BLOCKS, GPU_BLOCK, SD15_CPU_BLOCK


def _script():
    """``benchmarks/gpu.py`` as a module."""
    spec = importlib.util.spec_from_file_location("gpu_script", REPO / "benchmarks" / "gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _repository_docs() -> dict:
    return {p: p.read_bytes() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*"))] if p.is_file()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the script would run for real")
def test_the_dry_mode_runs_every_part_on_the_cpu_and_writes_no_docs(capsys):
    before = _repository_docs()
    # The gpu tests of one file are collected (the default collects all of tests/, which takes longer).
    assert _script().main(["--tests", "tests/test_gpu.py"]) == 0
    assert _repository_docs() == before
    out = capsys.readouterr().out
    section = out[out.index(f"## {gpu_check.TITLE}"):]
    assert "in dry mode" in section and "**Failed**" not in section
    assert [ln for ln in section.splitlines() if ln.startswith("### ")] == [
        "### GPU tests", "### Stable Diffusion 1.5 size", "### bf16 vs fp32 masks"]
    assert "tests collected" in section  # only collected: without CUDA every gpu test skips
    assert "| fp32, B=1 |" in section and "| bf16, B=1, `vae_gradient_checkpointing=true` |" in section
    assert "| alpha-0.5 start | 2 | 1 |" in section


def _stubbed(monkeypatch, cuda: bool):
    script = _script()
    calls = []

    def run(args, command, cwd):
        calls.append(gpu_check.chosen_parts(args))
        return f"## {gpu_check.TITLE}\n\nstub section", True

    monkeypatch.setattr(script.gpu_check, "run", run)
    monkeypatch.setattr(script.gpu_check.torch.cuda, "is_available", lambda: cuda)
    return script, calls


def test_a_run_of_every_part_on_a_gpu_writes_only_its_section(monkeypatch, tmp_path):
    script, calls = _stubbed(monkeypatch, cuda=True)
    docs = tmp_path / "docs"
    docs.mkdir()
    report = docs / "PERFORMANCE.md"
    report.write_text("# Performance\n\nthe CPU sections\n\n" + "\n\n".join(
        f"{start}\n{body}\n{end}" for (start, end), body in BLOCKS.items()) + "\n")
    monkeypatch.setattr(script, "DOCS", docs)
    monkeypatch.setattr(script, "DEFAULT_OUT", report)
    monkeypatch.setattr(script, "README", tmp_path / "README.md")
    assert script.main([]) == 0 and calls == [list(gpu_check.PARTS)]
    text = report.read_text()
    start, end = GPU_BLOCK
    assert f"{start}\n## {gpu_check.TITLE}\n\nstub section\n{end}" in text
    assert text.startswith("# Performance\n\nthe CPU sections\n") and BLOCKS[SD15_CPU_BLOCK] in text
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["PERFORMANCE.md"]


@pytest.mark.parametrize(("cuda", "argv"), [(False, []), (True, ["--dry"]), (True, ["--parts", "throughput"])])
def test_a_dry_run_or_one_of_some_parts_only_prints(monkeypatch, cuda, argv):
    script, calls = _stubbed(monkeypatch, cuda)
    before = _repository_docs()
    assert script.main(argv) == 0 and calls
    assert _repository_docs() == before


@pytest.mark.parametrize("argv", [["--dry", "--out", "docs/PERFORMANCE.md"], ["--out", "docs/GPU.md"],
                                  ["--out", "README.md"]])
def test_the_repository_documents_are_refused_before_checking(monkeypatch, argv):
    monkeypatch.chdir(REPO)
    script, calls = _stubbed(monkeypatch, cuda=False)
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and not calls


def test_a_side_file_gets_the_section(monkeypatch, tmp_path):
    script, _ = _stubbed(monkeypatch, cuda=False)
    assert script.main(["--dry", "--out", str(tmp_path / "gpu.md")]) == 0
    assert (tmp_path / "gpu.md").read_text() == f"## {gpu_check.TITLE}\n\nstub section\n"


def test_a_failed_part_fails_the_command(monkeypatch):
    script, _ = _stubbed(monkeypatch, cuda=False)
    monkeypatch.setattr(script.gpu_check, "run", lambda *a: ("## On a GPU\n\n**Failed**: tests", False))
    assert script.main(["--dry"]) == 1


def test_the_budget_fits_ten_minutes():
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.TOTAL_BUDGET_S - 60  # a minute of slack at least
    assert set(gpu_check.BUDGET_S) == set(gpu_check.PARTS) and gpu_check.TESTS_TIMEOUT_S < gpu_check.TOTAL_BUDGET_S


def test_a_part_that_raises_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "throughput", broken)
    monkeypatch.setattr(gpu_check, "precision_masks", lambda *a, **k: gpu_check.Part("masks", "masks body", 1.0, True))
    args = gpu_check.parser("gpu").parse_args(["--dry", "--parts", "throughput,masks"])
    text, ok = gpu_check.run(args, "python benchmarks/gpu.py --dry", REPO)
    assert not ok and "**Failed**: throughput" in text and "masks body" in text
    assert "failed: RuntimeError: CUDA error: an illegal memory access was encountered" in text
