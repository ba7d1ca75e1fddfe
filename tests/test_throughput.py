"""The throughput benchmark's early-stopping section, on the tiny model: its checks hold for per-pair stops."""

import torch
from tests_support import REPO_CONFIGS

from peekaboo.bench import throughput


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
