"""Dataset runs: pairs spread over workers, resume planning, per-pair outputs, evaluation against ground truth,
metrics and the run report."""
