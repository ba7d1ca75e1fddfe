"""``benchmarks/gpu.py``: its CPU dry mode end to end, and where it may write its section of docs/PERFORMANCE.md."""

import importlib.util
import os
import signal

import pytest
import torch
from tests_support import REPO

from peekaboo.bench import gpu_check
from peekaboo.bench.throughput import gpu
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
def test_the_dry_mode_runs_every_part_on_the_cpu_and_writes_no_docs(capsys, tmp_path):
    before = _repository_docs()
    # The gpu tests of one file are collected (the default collects all of tests/, which takes longer).
    progress = tmp_path / "progress.md"
    assert _script().main(["--dry", "--tests", "tests/test_gpu.py", "--progress", str(progress)]) == 0
    assert _repository_docs() == before
    out = capsys.readouterr().out
    section = out[out.index(f"## {gpu_check.TITLE}"):]
    # The progress file ends as the printed section, less the date line (it is rewritten at every part's end).
    strip = lambda text: [ln for ln in text.strip().splitlines() if not ln.startswith("- Date:")]  # noqa: E731
    assert strip(progress.read_text()) == strip(section)
    assert "in dry mode" in section and "**Failed**" not in section
    assert [ln for ln in section.splitlines() if ln.startswith("### ")] == [
        "### GPU tests", "### Stable Diffusion 1.5 size", "### bf16 vs fp32 masks"]
    assert "tests collected" in section  # only collected: without CUDA every gpu test skips
    assert "| fp32, B=1 |" in section and "| bf16, B=1, `vae_gradient_checkpointing=true` |" in section
    assert "| alpha-0.5 start | 2 | 1 |" in section


def _stubbed(monkeypatch, cuda: bool):
    script = _script()
    calls = []

    def run(args, command, cwd, progress=None):
        calls.append(gpu_check.chosen_parts(args))
        return f"## {gpu_check.TITLE}\n\nstub section", True, False

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


@pytest.mark.parametrize(("cuda", "argv"), [(False, ["--dry"]), (True, ["--dry"]), (True, ["--parts", "throughput"])])
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
    monkeypatch.setattr(script.gpu_check, "run", lambda *a: ("## On a GPU\n\n**Failed**: tests", False, False))
    assert script.main(["--dry"]) == 1


def test_the_budget_fits_ten_minutes():
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.TOTAL_BUDGET_S - 60  # a minute of slack at least
    assert set(gpu_check.BUDGET_S) == set(gpu_check.PARTS)
    assert gpu_check.BUDGET_S["tests"] >= gpu_check.TESTS_TIMEOUT_S
    assert gpu_check.parser("gpu").parse_args([]).budget_s <= gpu_check.TOTAL_BUDGET_S - 60
    # The row that compiles, the slowest to start, is the one a short budget drops.
    assert gpu.SWITCHES[-1][1] == "model.compile=true"


def test_a_part_that_raises_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "throughput", broken)
    monkeypatch.setattr(gpu_check, "precision_masks", lambda *a, **k: gpu_check.Part("masks", "masks body", 1.0, True))
    args = gpu_check.parser("gpu").parse_args(["--dry", "--parts", "throughput,masks"])
    text, ok, stopped = gpu_check.run(args, "python benchmarks/gpu.py --dry", REPO)
    assert not ok and not stopped and "**Failed**: throughput" in text and "masks body" in text
    assert "failed: RuntimeError: CUDA error: an illegal memory access was encountered" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_no_cuda_device_is_an_error_not_a_quiet_dry_run(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    before = _repository_docs()
    assert _script().main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device visible to torch") and "pass --dry" in err
    assert len(err.splitlines()) == 1
    assert _repository_docs() == before


def _args(*argv):
    return gpu_check.parser("gpu").parse_args(["--dry", *argv])


def test_a_signal_stops_the_check_with_what_it_measured_and_never_writes_the_docs(monkeypatch, tmp_path, capsys):
    def tests_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` or a scheduler sends at its limit
        raise AssertionError("the signal should have stopped the part")

    monkeypatch.setattr(gpu_check, "gpu_tests", lambda *a: gpu_check.Part("tests", "tests body", 1.0, True))
    monkeypatch.setattr(gpu_check, "throughput", tests_then_sigterm)
    progress = []
    text, ok, stopped = gpu_check.run(_args(), "cmd", REPO, progress.append)
    assert stopped and not ok and "tests body" in text and "### bf16 vs fp32 masks" not in text
    assert "**Stopped** by a signal in throughput; not reached: masks" in text
    assert "tests body" in progress[-1] and "**Stopped** by a signal in throughput" in progress[-1]
    assert signal.getsignal(signal.SIGTERM) is not None  # the check's handler is gone again
    # The script prints the section, leaves docs/ alone and exits 143 with one line.
    script = _script()
    monkeypatch.setattr(script.gpu_check, "run", lambda *a: (text, False, True))
    monkeypatch.setattr(script.gpu_check.torch.cuda, "is_available", lambda: True)
    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(script, "DOCS", docs)
    monkeypatch.setattr(script, "DEFAULT_OUT", docs / "PERFORMANCE.md")
    assert script.main([]) == 143 and not (docs / "PERFORMANCE.md").exists()
    captured = capsys.readouterr()
    assert "tests body" in captured.out and captured.err.startswith("stopped: the check was stopped by a signal")


def test_parts_past_the_budget_are_reported_as_not_run(monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda *a: pytest.fail("a part past the budget ran"))
    text, ok, stopped = gpu_check.run(_args("--budget-s", "0", "--parts", "tests,masks"), "cmd", REPO)
    assert not ok and not stopped and "**Not run** (the time budget ran out): tests, masks" in text
    assert "**Failed**" not in text


def test_a_throughput_row_out_of_memory_does_not_fail_the_part(monkeypatch):
    def section(report, **options):
        report.add(gpu.TITLE, f"| fp32, B=8 | - | | | | | {gpu.OUT_OF_MEMORY} |")

    monkeypatch.setattr(gpu_check.gpu, "section_gpu", section)
    assert gpu_check.throughput(torch.device("cpu"), None, dry=True).ok
