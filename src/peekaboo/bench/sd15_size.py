"""Stable Diffusion 1.5's size on the CPU: seconds per step and peak memory of one pair, measured, and the pairs
per step that GPUs of 24, 40 and 80 GB would hold, derived from them (``benchmarks/sd15_size.py`` writes the
markdown into docs/PERFORMANCE.md).

The model is SD-1.5's published component configs with random weights (:data:`peekaboo.diffusion.components.SD15`,
built and saved once, then loaded through ``load_backbone`` as a user's checkpoint is): random weights cost the same
compute and memory as real ones. Each setting (float32 or bfloat16 weights, the VAE encoder with or without
gradient checkpointing, the dream loss's ``sds`` or ``full`` estimator) runs in a fresh process, so its memory
figures are its own: the resident set (RSS) before loading (the libraries), its high-water mark while loading
(``accelerate`` reads the weights straight into place) and after, and its high-water mark over the steps. A step
is the preset ``sd15``'s (the paper's settings) through the Trainer, 1 warm-up and 2 timed steps by default: a step
takes tens of seconds on a CPU.

Derived, not measured: a pair's activations (the step's peak less the resident weights) scale with the pairs per
step, the weights do not, so a GPU of ``G`` GB holds ``floor((usable(G) - weights) / activations per pair)`` pairs,
with :func:`usable_gb`'s allowance for what a CUDA process holds besides tensors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import itertools
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from peekaboo.bench.common import MB, PeakMemory, fmt, machine_info, package_version, status_kb
from peekaboo.bench.common import markdown_table as table
from peekaboo.bench.throughput.gpu import PRECISIONS, SD15_GROUP, build_sd15_folder
from peekaboo.bench.throughput.harness import Bench, load_items

log = logging.getLogger("sd15_size")

TITLE = "Stable Diffusion 1.5 size on this CPU"
WARMUP_STEPS = 1
TIMED_STEPS = 2
PAIRS = 1
GPU_SIZES_GB = (24, 40, 80)
#: What a CUDA process holds besides its tensors (context, cuDNN / cuBLAS workspaces): an allowance, not a figure.
CUDA_OVERHEAD_GB = 1.5
#: The share of the rest the caching allocator can fill before fragmentation refuses a block: an allowance too.
ALLOCATOR_SHARE = 0.9
GB = 1e9  # cards are sold in decimal gigabytes


@dataclass(frozen=True)
class Setting:
    """One measured configuration: the weights' precision, whether the VAE encoder checkpoints, and the dream
    loss's gradient estimator (``full`` adds a backward pass through the UNet, and its activations)."""

    precision: str  # a key of PRECISIONS: fp32 | bf16
    checkpointing: bool
    estimator: str = "sds"

    @property
    def label(self) -> str:
        label = f"{self.precision}, VAE checkpointing {'on' if self.checkpointing else 'off'}"
        return label if self.estimator == "sds" else f"{label}, estimator {self.estimator}"

    @property
    def name(self) -> str:
        """The setting's name on the command line (``--settings``): ``bf16+ckpt``, ``fp32+full``."""
        return self.precision + ("+ckpt" if self.checkpointing else "") + (
            "" if self.estimator == "sds" else f"+{self.estimator}")

    def overrides(self) -> list[str]:
        return [*PRECISIONS[self.precision], f"model.vae_gradient_checkpointing={str(self.checkpointing).lower()}",
                f"optimization.guidance.estimator={self.estimator}"]


SETTINGS = (*(Setting(p, c) for p in PRECISIONS for c in (False, True)),
            *(Setting(p, False, "full") for p in PRECISIONS))


@dataclass
class Measurement:
    """One setting's figures (MB are 2**20 bytes of resident memory)."""

    setting: Setting
    pairs: int
    step_s: float  # median over the timed steps
    cpu_step_s: float  # the same for this process's CPU time (all threads): less moved by other jobs than wall time
    steps: list[float]  # every step's seconds, warm-up first
    warmup: int
    fixed_s: float  # the run's wall time outside its steps (Trainer setup, prompt encoding)
    load_s: float
    weights_mb: float  # the frozen model's parameters, in their dtype
    libraries_mb: float  # RSS before loading: the interpreter and libraries
    load_peak_mb: float  # RSS high-water mark of the process while loading (libraries included)
    loaded_mb: float  # RSS once loaded, every weight read once (read_every_weight)
    step_peak_mb: float  # RSS high-water mark over the steps
    maxrss_mb: float  # the process's own high-water mark (getrusage), whatever came first
    threads: int

    @property
    def activations_mb(self) -> float:
        """What the steps held above the loaded model, per pair."""
        return (self.step_peak_mb - self.loaded_mb) / self.pairs


def _rss_mb() -> float:
    """This process's resident memory in MB (NaN off Linux)."""
    kb = status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024


def measure_setting(folder: str, setting: Setting, warmup: int, steps: int, pairs: int, threads: int,
                    config_dir: str | None = None) -> Measurement:
    """Load the model at ``folder`` and time ``warmup`` + ``steps`` steps of ``pairs`` pairs under ``setting``.

    Meant for a fresh process (:func:`in_fresh_process`): the memory figures are this process's.
    """
    import resource

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cpu = torch.device("cpu")
    bench = Bench(folder, cpu, warmup, steps, preset=SD15_GROUP, config_dir=config_dir)
    cfg = bench.config(*setting.overrides())
    items = load_items(pairs, cfg.optimization.mask.size, cfg.image_options.fit)
    libraries_mb = _rss_mb()
    start = time.perf_counter()
    with PeakMemory(cpu) as load_mem:
        backbone = bench.backbone(cfg)
        models = (backbone.vae, backbone.unet, backbone.text_encoder)
        read_every_weight(models)
    load_s = time.perf_counter() - start
    loaded_mb = _rss_mb()
    # The sampler may miss the last few pages the load touched: the peak is at least where the load ended.
    load_peak_mb = max(load_mem.peak_mb, loaded_mb)
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    cpu_clock = CpuClock()
    timing, _ = bench.trainer_run(setting.label, cfg, items, backbone, callbacks=[cpu_clock])
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    cpu_step_s = statistics.median(cpu_clock.durations()[timing.warmup:])
    return Measurement(setting, pairs, timing.step_s, cpu_step_s, timing.steps, timing.warmup, timing.fixed_s, load_s,
                       weights / MB, libraries_mb, load_peak_mb, loaded_mb, timing.peak_mb, maxrss_mb, threads)


class CpuClock(Callback):
    """This process's CPU time at the start of training and at the end of every step (the points of
    :class:`~peekaboo.bench.common.StepClock`)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.stamps = [time.process_time()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.process_time())

    def durations(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.stamps)]


@torch.no_grad()
def read_every_weight(models: Sequence[torch.nn.Module]) -> None:
    """Read every parameter once. Weights loaded in the files' dtype stay memory-mapped from the safetensors
    files, and a mapped page joins the RSS only once read: without this, a float32 model's weights would count
    as the first step's memory, not as loaded."""
    for model in models:
        for param in model.parameters():
            param.sum()


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) Python process: its memory high-water marks are its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def build_folder(folder: Path) -> Path:
    """The random-weight SD-1.5 pipeline at ``folder``, built there (in a fresh process) unless it is there."""
    if (folder / "model_index.json").is_file():
        log.info("using the SD-1.5-size model at %s", folder)
        return folder
    log.info("building the SD-1.5-size model at %s", folder)
    return in_fresh_process(build_sd15_folder, folder, torch.device("cpu"))


# -- derived --------------------------------------------------------------------------------------------------
def usable_gb(card_gb: float) -> float:
    """What tensors may fill on a card of ``card_gb`` GB (:data:`CUDA_OVERHEAD_GB`, :data:`ALLOCATOR_SHARE`)."""
    return (card_gb - CUDA_OVERHEAD_GB) * ALLOCATOR_SHARE


def pairs_that_fit(m: Measurement, card_gb: float) -> int:
    """Pairs per step a card of ``card_gb`` GB holds by ``m``'s figures (0: not even the weights and one pair)."""
    free = usable_gb(card_gb) * GB - m.weights_mb * MB
    per_pair = m.activations_mb * MB
    return max(0, math.floor(free / per_pair)) if per_pair > 0 else 0


# -- the report -----------------------------------------------------------------------------------------------
def section(measurements: Sequence[Measurement], command: str, load: tuple[tuple[float, ...], tuple[float, ...]],
            wall_s: float) -> str:
    """The markdown of the section: provenance, the measured table, the loading line and the derived table."""
    m0 = measurements[0]
    info = machine_info()
    before, after = ("/".join(f"{x:.1f}" for x in la) for la in load)
    lines = [
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; command: `{command}`",
        f"- Machine: {info['processor']}, {info['cpu_count']} cores, {m0.threads} torch thread(s); torch "
        f"{info['torch']}; load average (1/5/15 min) before {before}, after {after}; {wall_s / 60:.1f} min wall",
        f"- Model: SD-1.5's component configs with random weights (`peekaboo.diffusion.components.SD15`), saved "
        f"and loaded through `load_backbone`; preset `{SD15_GROUP}` (the paper's settings; its estimator `sds` "
        f"unless a row says otherwise), {m0.pairs} pair(s) per "
        f"step, {m0.warmup} warm-up + {len(m0.steps) - m0.warmup} timed steps through the Trainer; each setting "
        "in a fresh process",
        "",
    ]
    rows = [[m.setting.label, fmt(m.step_s, 1), fmt(m.cpu_step_s, 1), fmt(m.fixed_s, 1), f"{m.step_peak_mb:,.0f}",
             f"{m.loaded_mb:,.0f}", f"{m.activations_mb:,.0f}", f"{m.weights_mb:,.0f}", f"{m.maxrss_mb:,.0f}"]
            for m in measurements]
    lines.append(table(["setting", "s/step", "CPU s/step", "fixed s", "step peak RSS MB", "RSS loaded MB",
                        "activations MB/pair", "weights MB", "process maxrss MB"], rows, right_from=1))
    lines += ["", "s/step: wall seconds, median of the timed steps; CPU s/step: the process's CPU seconds over its "
              "threads in the same steps (other jobs on the cores move it less); fixed: the run's wall time outside "
              "its steps. Step peak: the RSS high-water mark over the steps (`/proc/self/status` VmHWM, reset after "
              "loading); activations: that peak less the RSS once loaded, per pair; process maxrss: `getrusage` for "
              "the whole process, loading included.", ""]
    first: dict[str, Measurement] = {}  # each precision's first setting: its load
    for m in measurements:
        first.setdefault(m.setting.precision, m)
    loads = "; ".join(f"{m.setting.precision}: peak {m.load_peak_mb:,.0f} MB, {m.load_peak_mb - m.libraries_mb:,.0f} "
                      f"MB over the libraries' {m.libraries_mb:,.0f} MB for {m.weights_mb:,.0f} MB of weights, "
                      f"{m.load_s:.1f} s" for m in first.values())
    lines += [f"Loading (`accelerate` {package_version('accelerate')}: the weights are read straight into place, never "
              "initialised first; the safetensors files are memory-mapped, so weights in the files' dtype (float32 "
              "here) are resident only once read, which the figures include: every weight is read once after "
              f"loading; a dtype change copies them): {loads}.", ""]
    cards = [f"{g} GB" for g in GPU_SIZES_GB]
    derived = [[m.setting.label, *(str(pairs_that_fit(m, g)) for g in GPU_SIZES_GB)] for m in measurements]
    lines += [f"**Derived, not measured**: pairs per step that fit a GPU, as `floor((usable - weights) / "
              f"activations per pair)` from the table above (activations scale with the pairs, the weights do "
              f"not), with usable = (card - {CUDA_OVERHEAD_GB} GB for the CUDA context and workspaces) x "
              f"{ALLOCATOR_SHARE} for the allocator's slack. A GPU's kernels hold other temporaries than the CPU's "
              "(the GPU section below measures them).", "",
              table(["setting", *cards], derived, right_from=1)]
    return "\n".join(lines)


# -- the command line -----------------------------------------------------------------------------------------
def parser(prog: str) -> argparse.ArgumentParser:
    """The options of ``benchmarks/sd15_size.py`` (where the section goes is the script's)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed steps before them")
    p.add_argument("--pairs", type=int, default=PAIRS, help="pairs per step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--settings", default=",".join(s.name for s in SETTINGS),
                   help=f"comma-separated subset of {', '.join(s.name for s in SETTINGS)}")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random-weight SD-1.5 model is kept (built there if absent; default: a "
                        "temporary folder, built anew)")
    p.add_argument("--config-dir", type=Path, default=None, help="a folder of presets (default: the packaged ones)")
    return p


def chosen_settings(args: argparse.Namespace, p: argparse.ArgumentParser | None = None) -> list[Setting]:
    """The settings ``args.settings`` names, in :data:`SETTINGS`' order (an unknown one is a usage error)."""
    names = {s.strip() for s in args.settings.split(",") if s.strip()}
    known = {s.name: s for s in SETTINGS}
    if unknown := sorted(names - set(known)):
        (p or parser()).error(f"unknown setting(s) {unknown}; choose from {', '.join(known)}")
    return [s for name, s in known.items() if name in names]


def is_default_run(args: argparse.Namespace) -> bool:
    """Every setting, at the default steps and pairs: the run whose figures the docs quote."""
    return (chosen_settings(args) == list(SETTINGS) and args.steps == TIMED_STEPS and args.warmup == WARMUP_STEPS
            and args.pairs == PAIRS)


def measure(args: argparse.Namespace, command: str, measure_one: Callable[..., Measurement] | None = None) -> str:
    """Build (or reuse) the model, measure every chosen setting in its own process, return the section's markdown
    (the body under :data:`TITLE`).

    Args:
        measure_one: how a setting is measured (default: :func:`measure_setting` in a fresh process); tests
            pass a cheaper one.
    """
    settings = chosen_settings(args)
    measure_one = measure_one or (lambda *a: in_fresh_process(measure_setting, *a))
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sd15-size-") as tmp:
        folder = build_folder(args.model_dir or Path(tmp) / "sd15")
        config_dir = None if args.config_dir is None else str(args.config_dir)
        results = []
        for setting in settings:
            log.info("measuring %s", setting.label)
            m = measure_one(str(folder), setting, args.warmup, args.steps, args.pairs, args.threads, config_dir)
            log.info("%s: %.1f s/step (every step: %s s), step peak %.0f MB", setting.label, m.step_s,
                     ", ".join(f"{s:.1f}" for s in m.steps), m.step_peak_mb)
            results.append(m)
    log.debug("figures: %s", [asdict(m) for m in results])
    text = section(results, command, (load_before, os.getloadavg()), time.perf_counter() - start)
    print(f"\n## {TITLE}\n\n{text}", flush=True)
    return text

