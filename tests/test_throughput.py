"""The throughput benchmark: its sections on the tiny model, and refreshing some sections of a report."""

import json

import pytest
import torch
from tests_support import REPO_CONFIGS

from peekaboo.bench import throughput
from peekaboo.bench.common import update_marked
from peekaboo.bench.reference_loop import REFERENCE_KINDS
from peekaboo.bench.steps import Setting
from peekaboo.errors import PeekabooError
from peekaboo.optim import regions as regions_lib
from peekaboo.optim.regions import RANKING_KEY
from peekaboo.optim.restarts import prompt_fit


def test_early_stop_section_checks_each_pairs_stop(tiny_model):
    bench = throughput.Bench(str(tiny_model), torch.device("cpu"), warmup=0, steps=1, max_steps=6,
                             config_dir=REPO_CONFIGS)
    # Every step counts as settled, so each pair stops as soon as min_steps is reached.
    bench.base += ["optimization.mask.size=16", "optimization.early_stop.tolerance=1.0",
                   "optimization.early_stop.patience=1", "optimization.early_stop.min_steps=3"]
    cfg = bench.config()
    items = throughput.load_items(4, cfg.optimization.mask.size, cfg.image_options.fit)
    report = throughput.Report()
    throughput.section_early_stop(bench, report, items)
    es = report.summary["early_stop"]
    assert es["pair_stop_mean"] == 3  # stopped at min_steps, not at max_steps
    assert es["replay_matches"] is True
    assert es["max_abs_alpha_diff"] == 0.0  # a frozen pair keeps the full run's mask at its stop step
    assert throughput.REFERENCE_START in report.sections[-1][1]  # long runs from alpha 0.5, not the preset's


def test_runs_compared_with_the_reference_loop_take_the_alpha_half_step_count():
    bench = throughput.Bench("bundled", torch.device("cpu"), warmup=0, steps=1, config_dir=REPO_CONFIGS)
    cfg = bench.reference_config("fourier_bilateral", "optimization.optim.lr=0.01")
    assert cfg.optimization.mask.init == "constant" and cfg.optimization.mask.kind == "fourier_bilateral"
    assert cfg.trainer.max_steps == throughput.ALPHA_START_STEPS and cfg.optimization.optim.lr == 0.01
    # A quick check's fixed step count wins, so the script's own tests stay short.
    quick = throughput.Bench("bundled", torch.device("cpu"), warmup=0, steps=1, max_steps=2, config_dir=REPO_CONFIGS)
    assert quick.reference_config("raster_bilateral").trainer.max_steps == 2


def test_end_to_end_section_compares_whole_runs(tiny_model, monkeypatch):
    monkeypatch.setattr(throughput, "END_TO_END_PAIRS", 3)
    monkeypatch.setattr(throughput, "PAPER_STEPS", 4)
    monkeypatch.setattr(throughput, "FAST", Setting("fast", "short", ("trainer.max_steps=2",)))
    bench = throughput.Bench(str(tiny_model), torch.device("cpu"), warmup=0, steps=1, max_steps=3,
                             config_dir=REPO_CONFIGS)
    bench.base += ["optimization.mask.size=16", "data.pairs_per_step=2"]
    ranked = []

    def counting(backbone, images, masks, prompts, pair_ids, *rest):
        ranked.extend(p.removesuffix(RANKING_KEY) for p in pair_ids[:1] if p.endswith(RANKING_KEY))
        return prompt_fit(backbone, images, masks, prompts, pair_ids, *rest)

    monkeypatch.setattr(regions_lib, "prompt_fit", counting)
    report = throughput.Report()
    throughput.section_end_to_end(bench, report, [])
    # The preset's region start is ranked anew by each row that uses it (default, fast), as in a fresh process;
    # the paper settings start at alpha 0.5, as the paper-style loop does.
    assert ranked and all(ranked.count(p) == 2 for p in ranked)
    e2e = report.summary["end_to_end"]
    assert e2e["split"] == "eval" and e2e["pairs"] == 3
    assert [r["mean_steps"] for r in e2e["rows"]] == [4, 4, 3, 2]
    assert all(0.0 <= r["miou"] <= 1.0 and r["pairs_per_hour"] > 0 for r in e2e["rows"])
    body = report.sections[-1][1]
    assert body.count("\n| ") == 1 + 4 and "| project fast |" in body
    (line_fast,) = [ln for ln in throughput.summary_lines(report.summary) if "project fast vs" in ln]
    ratio = e2e["rows"][3]["pairs_per_hour"] / e2e["rows"][0]["pairs_per_hour"]
    assert f"{ratio:.1f}x the pairs per hour" in line_fast


def _report(sections: dict[str, str], summary: dict, date: str, machine: str = "CPU A, 2 cores") -> str:
    report = throughput.Report(sections=list(sections.items()), summary=summary)
    lines = ["# Performance", "", f"- Date: {date}", f"- Command: `run {date}`", f"- Machine: {machine}; GPU: none",
             "", "note", ""]
    lines += [f"## {throughput.SUMMARY_TITLE}", "", "stale", ""]
    for title, body in report.sections:
        lines += [f"## {title}", "", body, ""]
    lines += [f"## {throughput.RAW_TITLE}", "", "```json", json.dumps(summary), "```", ""]
    return "\n".join(lines)


def test_update_report_replaces_only_the_sections_measured():
    early = {"pair_stop_mean": 40, "miou_full": 0.6, "miou_early_stop": 0.59}
    old = _report({"Batch": "old batch", "Early stopping": "old stop"},
                  {"trainer_overhead_pct": 1.0, "trainer_tensorboard_overhead_pct": 2.0, "early_stop": early}, "day 1")
    new = _report({"Early stopping": "new stop", "End to end": "new e2e"},
                  {"early_stop": early | {"pair_stop_mean": 30}}, "day 2")
    merged = throughput.update_report(old, new)
    titles = [ln.removeprefix("## ") for ln in merged.splitlines() if ln.startswith("## ")]
    assert titles == ["Summary", "Batch", "Early stopping", "End to end", "Raw figures"]
    assert "old batch" in merged and "new stop" in merged and "old stop" not in merged and "stale" not in merged
    assert "- Refreshed day 2: Early stopping, End to end, by `run day 2`" in merged
    _, _, raw = throughput.split_report(merged)
    assert raw["trainer_overhead_pct"] == 1.0 and raw["early_stop"]["pair_stop_mean"] == 30
    assert "at 30 steps on average" in merged  # the Summary is derived from the merged figures
    with pytest.raises(PeekabooError, match="Raw figures"):
        throughput.update_report("# Performance\n\n## Batch\n\nbody\n", new)

    # Measured again elsewhere: the note names the other CPU, and the day-2 note (whose sections are all
    # superseded) goes, while a note with a section not measured again would stay.
    again = _report({"Early stopping": "3rd stop", "End to end": "3rd e2e"}, {}, "day 3", machine="CPU B, 2 cores")
    merged3 = throughput.update_report(merged, again)
    assert "- Refreshed day 3: Early stopping, End to end, by `run day 3` on CPU B, 2 cores" in merged3
    assert "Refreshed day 2" not in merged3 and "- Machine: CPU A, 2 cores; GPU: none" in merged3
    partial = throughput.update_report(merged, _report({"End to end": "e2e 4"}, {}, "day 4"))
    assert "Refreshed day 2" in partial and "Refreshed day 4: End to end, by `run day 4`" in partial


def test_readme_block_copies_the_summary_into_the_marked_lines(tmp_path):
    summary = {"trainer_overhead_pct": 1.0, "trainer_tensorboard_overhead_pct": 2.0}
    report = _report({"Batch": "b"}, summary, "day 1")
    block = throughput.readme_block(report, "docs/PERFORMANCE.md")
    assert block.splitlines()[0] == throughput.summary_lines(summary)[0]
    assert "[docs/PERFORMANCE.md](docs/PERFORMANCE.md) (machine: CPU A, 2 cores; GPU: none)" in block
    readme = tmp_path / "README.md"
    start, end = throughput.README_MARKERS
    readme.write_text(f"# R\n\n{start}\nold figures\n{end}\n\nafter\n")
    assert update_marked(readme, block, throughput.README_MARKERS)
    text = readme.read_text()
    assert "old figures" not in text and block in text and text.endswith(f"{end}\n\nafter\n")
    assert not update_marked(tmp_path / "missing.md", block, throughput.README_MARKERS)


def test_reference_section_runs_every_kind_from_the_reference_loops_start(tiny_model, monkeypatch):
    monkeypatch.setattr(throughput, "REFERENCE_ROUNDS", 1)
    monkeypatch.setattr(throughput, "QUALITY_PAIRS", 2)
    bench = throughput.Bench(str(tiny_model), torch.device("cpu"), warmup=0, steps=1, max_steps=2,
                             config_dir=REPO_CONFIGS)
    bench.base += ["optimization.mask.size=16", "data.pairs_per_step=2"]
    cfg = bench.config()
    # The preset starts on regions, which a Fourier mask cannot; the reference loop starts at alpha 0.5.
    assert cfg.optimization.mask.init == "region"
    items = throughput.load_items(2, cfg.optimization.mask.size, cfg.image_options.fit)
    report = throughput.Report()
    throughput.section_reference(bench, report, items)
    assert all(report.summary[f"speedup_{kind}"] > 0 for kind in REFERENCE_KINDS)
    assert report.summary["quality"]["pairs"] == 2
    assert throughput.REFERENCE_START in report.sections[-1][1]
