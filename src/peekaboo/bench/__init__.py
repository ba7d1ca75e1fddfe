"""Benchmarks of Peekaboo, layered over the app and the core (nothing outside this package imports it):

- :mod:`~peekaboo.bench.common`: timing, machine info and markdown tables every benchmark shares;
- :mod:`~peekaboo.bench.baselines`: the training-free baselines (whole image, random disc, cross-attention);
- :mod:`~peekaboo.bench.methods`: the rows the benchmark compares and the config of each;
- :mod:`~peekaboo.bench.scoring`: the synthetic pairs (shapes or objects) and the per-pair scores of a mask;
- :mod:`~peekaboo.bench.run`: scoring a row over those pairs;
- :mod:`~peekaboo.bench.sweep`: choosing the settings on the ``tune`` split;
- :mod:`~peekaboo.bench.report`: the markdown of the benchmark reports and of the README's table, as strings;
- :mod:`~peekaboo.bench.breakdown`: where a row succeeds and fails, by what the objects scenes vary;
- :mod:`~peekaboo.bench.ablation`: the benchmark's command line (``benchmarks/ablation.py`` wraps it);
- :mod:`~peekaboo.bench.steps`: quality against optimization steps (``benchmarks/steps.py`` wraps it);
- :mod:`~peekaboo.bench.reference_loop`: the paper-style loop the throughput benchmark compares against;
- :mod:`~peekaboo.bench.throughput`: seconds per step, pairs per hour and peak memory
  (``benchmarks/throughput.py`` wraps it);
- :mod:`~peekaboo.bench.sd15_size`: Stable Diffusion 1.5's size on the CPU, measured, and the pairs per step GPUs
  hold, derived (``benchmarks/sd15_size.py``);
- :mod:`~peekaboo.bench.gpu_check`: the GPU check in one command: the ``gpu`` tests, SD-1.5 size on the GPU, bf16
  against fp32 masks (``benchmarks/gpu.py``).

The package computes and returns text; the scripts under ``benchmarks/`` own the repository's paths (results,
docs) and write them. The README's one generated block is the main rows of the objects benchmark's eval table.
"""
