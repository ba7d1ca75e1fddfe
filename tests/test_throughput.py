"""The throughput benchmark: its sections on the tiny model, its report, and where ``benchmarks/throughput.py``
may write it."""

import importlib.util
import time
from dataclasses import replace

import pytest
import torch
from tests_support import REPO, REPO_CONFIGS
from tiny import TINY

from peekaboo.bench import throughput
from peekaboo.bench.reference_loop import REFERENCE_KINDS
from peekaboo.bench.steps import Setting
from peekaboo.bench.throughput import cpu, gpu
from peekaboo.bench.throughput.harness import ALPHA_START_STEPS, REFERENCE_SETTINGS, Bench, Report, load_items
from peekaboo.bench.throughput.report import (
    BLOCKS,
    GPU_BLOCK,
    SD15_CPU_BLOCK,
    keep_blocks,
    load_note,
    render,
    summary_lines,
)
from peekaboo.errors import Stopped
from peekaboo.optim import regions as regions_lib
from peekaboo.optim.regions import RANKING_KEY
from peekaboo.optim.restarts import prompt_fit


def _small_bench(tiny_model, max_steps: int) -> Bench:
    bench = Bench(str(tiny_model), torch.device("cpu"), warmup=0, steps=1, max_steps=max_steps,
                  config_dir=REPO_CONFIGS)
    bench.base += ["optimization.mask.size=16", "data.pairs_per_step=2"]
    return bench


def test_runs_compared_with_the_reference_loop_take_the_alpha_half_step_count():
    bench = Bench(None, torch.device("cpu"), warmup=0, steps=1, config_dir=REPO_CONFIGS)
    cfg = bench.reference_config("fourier_bilateral", "optimization.optim.lr=0.01")
    assert cfg.optimization.mask.init == "constant" and cfg.optimization.mask.kind == "fourier_bilateral"
    assert cfg.trainer.max_steps == ALPHA_START_STEPS["shapes"] and cfg.optimization.optim.lr == 0.01
    # A quick check's fixed step count wins, so the script's own tests stay short.
    quick = Bench(None, torch.device("cpu"), warmup=0, steps=1, max_steps=2, config_dir=REPO_CONFIGS)
    assert quick.reference_config("raster_bilateral").trainer.max_steps == 2


def test_the_objects_scenes_run_with_their_preset_and_the_reference_loops_estimator():
    bench = Bench(None, torch.device("cpu"), warmup=0, steps=1, config_dir=REPO_CONFIGS, scenes="objects")
    cfg = bench.config()
    assert cfg.model.pretrained == "bundled" and cfg.data.source == "objects"
    assert cfg.optimization.guidance.estimator == "full"
    # Compared with the paper-style loop: score distillation from alpha 0.5, at the preset's own step count (it
    # starts at alpha 0.5 itself).
    ref = bench.reference_config("raster_bilateral")
    assert (ref.optimization.guidance.estimator, ref.optimization.mask.init) == ("sds", "constant")
    assert ref.trainer.max_steps == cfg.trainer.max_steps
    items = load_items(2, cfg.optimization.mask.size, cfg.image_options.fit, scenes="objects")
    assert [i.id for i in items] == ["tune-00000-0", "tune-00000-1"] and items[0].prompt.startswith(("a ", "an "))


def test_end_to_end_section_compares_whole_runs(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu, "END_TO_END_PAIRS", 3)
    monkeypatch.setattr(cpu, "PAPER_STEPS", 4)
    monkeypatch.setattr(cpu, "PAPER_SETTINGS", (*cpu.PAPER.overrides, "trainer.max_steps=4"))
    monkeypatch.setattr(cpu, "FAST_SETTINGS", {"shapes": Setting("fast", "short", ("trainer.max_steps=2",))})
    bench = _small_bench(tiny_model, max_steps=3)
    ranked = []

    def counting(backbone, images, masks, prompts, pair_ids, *rest):
        ranked.extend(p.removesuffix(RANKING_KEY) for p in pair_ids[:1] if p.endswith(RANKING_KEY))
        return prompt_fit(backbone, images, masks, prompts, pair_ids, *rest)

    monkeypatch.setattr(regions_lib, "prompt_fit", counting)
    report = Report()
    cpu.section_end_to_end(bench, report, [])
    # The preset's region start is ranked anew by each row that uses it (default, fast), as in a fresh process;
    # the paper settings start at alpha 0.5, as the paper-style loop does.
    assert ranked and all(ranked.count(p) == 2 for p in ranked)
    e2e = report.summary["end_to_end"]
    assert e2e["split"] == "eval" and e2e["pairs"] == 3
    # The paper-style loop once per seed, then the project's rows.
    assert [r["label"] for r in e2e["rows"][:2]] == ["paper-style loop, paper settings, seed 0",
                                                     "paper-style loop, paper settings, seed 1"]
    assert [r["mean_steps"] for r in e2e["rows"]] == [4, 4, 4, 3, 2]
    assert all(0.0 <= r["miou"] <= 1.0 and r["pairs_per_hour"] > 0 for r in e2e["rows"])
    # The loop's pairs per hour pools both seeds; its quality bar is the lower seed's mIoU.
    refs = e2e["rows"][:2]
    assert e2e["reference_pairs_per_hour"] == pytest.approx(3600 * 6 / (refs[0]["wall_s"] + refs[1]["wall_s"]))
    assert e2e["quality_bar"] == min(r["miou"] for r in refs)
    assert all(r["paper_quality"] == (r["miou"] >= e2e["quality_bar"]) for r in e2e["rows"])
    body = report.sections[-1][1]
    assert body.count("\n| ") == 1 + 5 and "| project fast |" in body
    (line_fast,) = [ln for ln in summary_lines(report.summary) if "project fast vs" in ln]
    ratio = e2e["rows"][4]["pairs_per_hour"] / e2e["reference_pairs_per_hour"]
    assert f"{ratio:.1f}x the pairs per hour" in line_fast
    assert ("at the paper's quality" if e2e["rows"][4]["paper_quality"] else "below the paper's quality") in line_fast


def test_reference_section_runs_every_kind_from_the_reference_loops_start(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu, "REFERENCE_ROUNDS", 1)
    monkeypatch.setattr(cpu, "QUALITY_PAIRS", 2)
    bench = _small_bench(tiny_model, max_steps=2)
    cfg = bench.config()
    # The preset starts on regions, which a Fourier mask cannot; the reference loop starts at alpha 0.5.
    assert cfg.optimization.mask.init == "region"
    items = load_items(2, cfg.optimization.mask.size, cfg.image_options.fit)
    report = Report()
    cpu.section_reference(bench, report, items)
    assert all(report.summary[f"speedup_{kind}"] > 0 for kind in REFERENCE_KINDS)
    assert report.summary["quality"]["pairs"] == 2
    assert " ".join(REFERENCE_SETTINGS) in report.sections[-1][1]


@pytest.mark.slow
def test_batch_and_overhead_sections_feed_the_summary(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu, "BATCH_SIZES", (1, 2))
    monkeypatch.setattr(cpu, "OVERHEAD_ROUNDS", 1)
    bench = _small_bench(tiny_model, max_steps=2)
    cfg = bench.config()
    items = load_items(2, cfg.optimization.mask.size, cfg.image_options.fit)
    report = Report()
    cpu.section_batch(bench, report, items)
    cpu.section_overhead(bench, report, items)
    assert report.summary["batch_2"]["pairs_per_hour"] > 0
    text = render(report, ["- Machine: CPU A, 2 cores"], "note")
    titles = [ln.removeprefix("## ") for ln in text.splitlines() if ln.startswith("## ")]
    assert titles == ["Summary", "Pairs per step (B) through the Trainer", "Trainer overhead vs a bare PyTorch loop"]
    assert "- Trainer overhead over a bare PyTorch loop at B=1: " in text and "- Machine: CPU A, 2 cores" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there to measure")
def test_gpu_section_without_a_gpu_says_so():
    report = Report()
    gpu.section_gpu(report)
    assert report.summary["gpu"] == gpu.NO_GPU and report.sections == [(gpu.TITLE, gpu.NO_GPU + ".")]


@pytest.mark.slow
def test_gpu_section_runs_on_a_small_model(monkeypatch):
    # The section's code on the CPU, with a small model in SD-1.5's vocabulary and a cheap switch.
    monkeypatch.setattr(gpu, "MASK_SIZE", 32)
    monkeypatch.setattr(gpu, "BATCH_SIZES", (1, 2))
    monkeypatch.setattr(gpu, "SWITCH_BATCH", 1)
    monkeypatch.setattr(gpu, "SWITCHES", (("`attention=classic`", "model.attention=classic"),))
    small = replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": 49408})
    report, seen = Report(), []
    gpu.section_gpu(report, warmup=0, steps=1, max_steps=1, arch=small, device=torch.device("cpu"),
                    config_dir=REPO_CONFIGS, on_row=seen.append)
    body = report.sections[-1][1]
    assert body.count("\n| ") == 1 + 2 * 2 + 1 + 1  # header, fp32 and bf16 at B=1, 2, the reference, the switch
    assert "failed" not in body and gpu.OUT_OF_MEMORY not in body
    assert set(report.summary["gpu_rows"]) >= {"fp32, B=2", "bf16, B=2", "bf16, B=1, `attention=classic`"}
    # The progress callback saw the section grow by one row at a time, ending at the final one.
    assert [b.count("\n| ") for b in seen] == [2, 3, 4, 5, 6, 7] and seen[-1] == body


@pytest.mark.skipif(torch.cuda.is_available(), reason="the section's CPU run is forced through device=cpu")
def test_gpu_section_keeps_its_rows_when_stopped_and_skips_variants_past_its_deadline(monkeypatch):
    small = replace(TINY, text_encoder={**TINY.text_encoder, "vocab_size": 49408})
    options = {"warmup": 0, "steps": 1, "max_steps": 1, "arch": small, "device": torch.device("cpu"),
               "config_dir": REPO_CONFIGS, "batch_sizes": (1,), "switches": (), "mask_size": 32}

    def stop_after_the_first_row(body):
        raise Stopped("signal 15")

    report = Report()
    with pytest.raises(Stopped):
        gpu.section_gpu(report, on_row=stop_after_the_first_row, **options)
    body = report.sections[-1][1]
    assert body.startswith("**Stopped** (signal 15) after 1 of the section's rows.") and "| fp32, B=1 |" in body
    # Past the deadline no variant loads: every row says it was not run.
    late = Report()
    gpu.section_gpu(late, deadline=time.perf_counter(), **options)
    rows = [ln for ln in late.sections[-1][1].splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == 3 and all(gpu.OUT_OF_TIME in r for r in rows) and late.summary["gpu_rows"] == {}


def test_a_gpu_row_that_runs_out_of_memory_is_a_figure_not_a_failure():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert gpu.row("fp32, B=8", oom)[-1] == gpu.OUT_OF_MEMORY


# -- where benchmarks/throughput.py writes ------------------------------------------------------------------
def _script(monkeypatch):
    """``benchmarks/throughput.py`` as a module whose measurement is stubbed (returns a fixed report at once)."""
    spec = importlib.util.spec_from_file_location("throughput_script", REPO / "benchmarks" / "throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def measure(args, command):
        calls.append(throughput.chosen_sections(args))
        return "# Performance\n\nstub report\n"

    monkeypatch.setattr(script.throughput, "measure", measure)
    return script, calls


def _repository_docs() -> dict:
    """The bytes of the README and of every file under docs/."""
    return {p: p.read_bytes() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*"))] if p.is_file()}


@pytest.mark.parametrize("argv", [
    ["--sections", "end_to_end", "--out", "{tmp}/perf.md"],  # a new user's first try
    ["--out", "{tmp}/perf.md"],  # every section, to a side file
])
def test_a_run_to_a_side_file_writes_only_that_file(monkeypatch, tmp_path, argv):
    script, calls = _script(monkeypatch)
    before = _repository_docs()
    assert script.main([a.format(tmp=tmp_path) for a in argv]) == 0
    assert calls and (tmp_path / "perf.md").read_text() == "# Performance\n\nstub report\n"
    assert _repository_docs() == before


@pytest.mark.parametrize("argv", [["--sections", "end_to_end"], ["--sections", "batch,overhead"],
                                  ["--max-steps", "2"], ["--out", "-"]])
def test_a_run_of_some_sections_or_a_quick_check_only_prints(monkeypatch, argv):
    script, calls = _script(monkeypatch)
    before = _repository_docs()
    assert script.main(argv) == 0
    assert calls and _repository_docs() == before


@pytest.mark.parametrize("argv", [
    ["--sections", "end_to_end", "--out", "docs/PERFORMANCE.md"],
    ["--max-steps", "2", "--out", "docs/PERFORMANCE.md"],
    ["--out", "docs/OTHER.md"],
    ["--out", "README.md"],
])
def test_the_repository_documents_are_refused_before_measuring(monkeypatch, argv):
    monkeypatch.chdir(REPO)
    script, calls = _script(monkeypatch)
    before = _repository_docs()
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and not calls and _repository_docs() == before


def _script_writing_under(monkeypatch, tmp_path):
    """:func:`_script` with the repository's docs/ and README moved under ``tmp_path``; returns it, its calls and
    its docs/ folder."""
    script, calls = _script(monkeypatch)
    docs = tmp_path / "docs"
    monkeypatch.setattr(script, "DOCS", docs)
    monkeypatch.setattr(script, "DEFAULT_OUT", docs / "PERFORMANCE.md")
    monkeypatch.setattr(script, "OBJECTS_OUT", docs / "PERFORMANCE_OBJECTS.md")
    monkeypatch.setattr(script, "README", tmp_path / "README.md")
    return script, calls, docs


def test_only_a_run_of_every_section_writes_the_report(monkeypatch, tmp_path):
    script, calls, docs = _script_writing_under(monkeypatch, tmp_path)
    assert script.main([]) == 0
    assert calls == [list(throughput.SECTIONS)]
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["PERFORMANCE.md"]
    # The sections other scripts write stand at the end, as placeholders until they have run.
    assert (docs / "PERFORMANCE.md").read_text() == keep_blocks("# Performance\n\nstub report\n", None)


def test_a_run_on_the_objects_scenes_writes_their_own_report(monkeypatch, tmp_path):
    script, _, _ = _script_writing_under(monkeypatch, tmp_path)
    assert script.main(["--scenes", "objects"]) == 0
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["PERFORMANCE_OBJECTS.md"]


def test_a_run_of_every_section_keeps_the_sections_other_scripts_wrote(monkeypatch, tmp_path):
    script, _ = _script(monkeypatch)
    docs = tmp_path / "docs"
    docs.mkdir()
    report = docs / "PERFORMANCE.md"
    start, end = SD15_CPU_BLOCK
    report.write_text(f"# Performance\n\nold report\n\n{start}\n## SD\n\nmeasured\n{end}\n")  # no GPU block yet
    monkeypatch.setattr(script, "DOCS", docs)
    monkeypatch.setattr(script, "DEFAULT_OUT", report)
    monkeypatch.setattr(script, "README", tmp_path / "README.md")
    assert script.main([]) == 0
    text = report.read_text()
    assert text.startswith("# Performance\n\nstub report\n") and "old report" not in text
    assert f"{start}\n## SD\n\nmeasured\n{end}" in text and BLOCKS[GPU_BLOCK] in text
    assert text.index(start) < text.index(GPU_BLOCK[0])


def test_there_is_no_gpu_section_to_ask_for_any_more():
    assert "gpu" not in throughput.SECTIONS  # benchmarks/gpu.py owns the GPU section


def test_the_reference_loop_refuses_models_the_papers_code_cannot_drive(tiny_sdxl_model, tiny_v_model):
    from peekaboo.bench.reference_loop import ReferenceLoop
    from peekaboo.config import ModelConfig, OptimizationConfig
    from peekaboo.diffusion.loading import load_backbone

    cfg = OptimizationConfig()
    with pytest.raises(ValueError, match="not SDXL"):
        ReferenceLoop(load_backbone(ModelConfig(pretrained=str(tiny_sdxl_model))), cfg)
    with pytest.raises(ValueError, match="epsilon-prediction"):
        ReferenceLoop(load_backbone(ModelConfig(pretrained=str(tiny_v_model))), cfg)


def test_the_reference_fourier_mask_reads_the_official_uv_grid():
    from peekaboo.bench.reference_loop import FourierBilateral
    from peekaboo.config import FourierConfig

    size, cfg = 4, FourierConfig(num_features=2)
    mask = FourierBilateral(size, torch.zeros(3, 3, size, size), 0, cfg, torch.Generator().manual_seed(0))
    freqs = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * cfg.scale  # the loop's first draw
    # get_uv_grid: 0, 1/S, ..., (S - 1)/S on each axis, never 1: the last pixel sits at (3/4, 3/4).
    last = 2 * torch.pi * torch.tensor([0.75, 0.75]) @ freqs
    assert mask.features.shape == (1, 4, size, size)
    assert torch.allclose(mask.features[0, :, -1, -1], torch.cat([last.sin(), last.cos()]), atol=1e-4)


def test_the_load_note_counts_the_benchmarks_own_threads():
    busy_two = (2.1, 2.0, 1.5)
    assert load_note((0.2, 0.3, 0.4), busy_two, threads=2).startswith("Nothing else ran")
    assert load_note((0.2, 0.3, 0.4), busy_two, threads=1).startswith("**Other jobs shared the CPU")
