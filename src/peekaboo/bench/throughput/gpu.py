"""The throughput benchmark's GPU section: a Stable-Diffusion-1.5-sized model with random weights at 512x512,
fp32 vs bf16, B = 1, 4, 8, the fast-path switches and the paper-style loop; only where CUDA is available."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from peekaboo.bench.common import Timing, fmt, ms
from peekaboo.bench.common import markdown_table as table
from peekaboo.bench.throughput.harness import Bench, Report, load_items
from peekaboo.diffusion.components import SD15, Architecture, build_components, save_pipeline
from peekaboo.diffusion.loading import BUNDLED_PATH

log = logging.getLogger("throughput")

SD15_GROUP = "sd15"  # the preset of the GPU section (the paper's settings)
WARMUP_STEPS = 2
TIMED_STEPS = 5
BATCH_SIZES = (1, 4, 8)
EXTRAPOLATE_STEPS = 300  # the paper's step count, which the SD preset keeps
MASK_SIZE = 512  # the composite's side; the VAE sees 512x512 either way
SWITCH_BATCH = 4
PRECISIONS: dict[str, list[str]] = {
    "fp32": ["model.dtype=float32", "trainer.precision=32-true"],
    "bf16": ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"],
}
SWITCHES: tuple[tuple[str, str], ...] = (
    ("`batch_cfg=false`", "optimization.guidance.batch_cfg=false"),
    ("`channels_last=true`", "model.channels_last=true"),
    ("`compile=true`", "model.compile=true"),
    ("`attention=classic`", "model.attention=classic"),
)
NO_GPU = "not measured: no GPU"
TITLE = "Stable Diffusion 1.5 size on a GPU"


def build_sd15_folder(folder: Path, device: torch.device, arch: Architecture = SD15) -> Path:
    """Save a random-weight pipeline with Stable Diffusion 1.5's architecture in diffusers format.

    Random weights cost the same compute as real ones, so step times carry over; the masks mean nothing.
    The tokenizer is the bundled model's vocabulary with SD's 77-token length (no hub is reachable).
    """
    from transformers import CLIPTokenizer

    length = arch.text_encoder["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_PATH / "tokenizer", model_max_length=length)
    return save_pipeline(folder, build_components(arch, tokenizer, device=device))


def release() -> None:
    """Free what the last variant left on the GPU before the next one loads (call after dropping it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(run: Callable[[], tuple[Timing, Any]]) -> tuple[Timing | None, str]:
    """Run one measurement (a :class:`Bench` run); running out of memory or failing becomes a note instead of
    ending the section."""
    timing, note = None, ""
    try:
        timing = run()[0]
    except torch.cuda.OutOfMemoryError:
        note = "out of memory"
    except Exception as err:
        note = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("GPU run failed:\n%s", traceback.format_exc())
    release()  # after the handler: until then the exception's frames hold the failed step's tensors
    return timing, note


def row(label: str, run: Callable[[], tuple[Timing, Any]], compiled: bool = False) -> list[str]:
    """One measurement as a table row, extrapolated to :data:`EXTRAPOLATE_STEPS` steps per batch."""
    timing, note = guarded(run)
    if timing is None:
        return [label, "-", "", "", "", note]
    if compiled:
        note = f"first step {timing.first_step_s:.1f} s (compilation)"
    batch_s = EXTRAPOLATE_STEPS * timing.step_s + timing.fixed_s
    return [label, ms(timing.step_s), fmt(batch_s, 1), f"{timing.pairs_per_hour(EXTRAPOLATE_STEPS):,.0f}",
            f"{timing.peak_mb:,.0f}", note]


def section_gpu(report: Report, warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS, max_steps: int | None = None,
                arch: Architecture = SD15, device: torch.device | None = None,
                config_dir: str | os.PathLike | None = None) -> None:
    """SD-1.5-sized model, fp32 vs bf16, B = 1, 4, 8, the switches and the reference loop; CUDA only.

    ``arch``, ``device`` and ``max_steps`` exist to check this code on a small model without a GPU;
    ``config_dir`` is the project's configs/ folder (:func:`peekaboo.bench.methods.resolve_config_dir`).
    """
    if device is None and not torch.cuda.is_available():
        report.summary["gpu"] = NO_GPU
        report.add(TITLE, NO_GPU + ".")
        return
    device = device or torch.device("cuda", 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sd15-random-") as tmp:
        start = time.perf_counter()
        folder = build_sd15_folder(Path(tmp) / "sd15", device, arch)
        build_s = time.perf_counter() - start
        bench = Bench(str(folder), device, warmup, steps, preset=SD15_GROUP, max_steps=max_steps,
                      config_dir=config_dir)
        size = f"optimization.mask.size={MASK_SIZE}"
        items = load_items(max(BATCH_SIZES), MASK_SIZE, "scale")
        variants: list[tuple[str, list[str], Sequence[int]]] = [
            (f"{name}, B={{b}}", overrides, BATCH_SIZES) for name, overrides in PRECISIONS.items()]
        variants += [(f"bf16, B={{b}}, {name}", [*PRECISIONS["bf16"], override], (SWITCH_BATCH,))
                     for name, override in SWITCHES]
        for label, overrides, batches in variants:
            cfg = bench.config(size, *overrides)
            backbone = bench.backbone(cfg)
            resolution = backbone.resolution
            for b in batches:
                run = partial(bench.trainer_run, label.format(b=b), cfg, items[:b], backbone)
                rows.append(row(label.format(b=b), run, cfg.model.compile))
            del backbone
            release()
        cfg = bench.config(size, *PRECISIONS["fp32"])
        backbone = bench.backbone(cfg)
        rows.append(row("reference loop (paper style), fp32, B=1",
                        partial(bench.reference_run, "reference", cfg, items[0], backbone)))
        del backbone
        release()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    body = (f"{name}. UNet, VAE and text encoder built from the SD-1.5 configs with random weights (built and "
            f"saved in {build_s:.0f} s), loaded through `load_backbone`; preset `{SD15_GROUP}` "
            f"(`{cfg.optimization.mask.kind}`) with a {MASK_SIZE}x{MASK_SIZE} mask and composite (the VAE "
            f"encodes at {resolution}x{resolution}); {warmup}+{steps} steps per row, extrapolated to "
            f"{EXTRAPOLATE_STEPS} steps per pair batch. Switch rows compare with \"bf16, B={SWITCH_BATCH}\". "
            "Peak memory is `torch.cuda.max_memory_allocated` (weights included).\n\n")
    report.add(TITLE, body + table(
        ["run", "ms/step", f"s per batch @{EXTRAPOLATE_STEPS}", "pairs/hour", "peak GPU MB", "note"], rows))

