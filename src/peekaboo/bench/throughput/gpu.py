"""The throughput benchmark's GPU section: a Stable-Diffusion-1.5-sized model with random weights at 512x512,
fp32 vs bf16, B = 1, 4, 8, the fast-path switches (VAE gradient checkpointing among them) and the paper-style loop;
only where CUDA is available. ``benchmarks/gpu.py`` (:mod:`peekaboo.bench.gpu_check`) runs it."""

from __future__ import annotations

import contextlib
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
from peekaboo.diffusion.checks import BUNDLED_PATHS
from peekaboo.diffusion.components import SD15, Architecture, build_components, save_pipeline
from peekaboo.errors import Stopped

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
    ("`attention=classic`", "model.attention=classic"),
    ("`vae_gradient_checkpointing=true`", "model.vae_gradient_checkpointing=true"),
    # Not a fast path: what the UNet's backward pass costs on a GPU (docs/PERFORMANCE.md measures it on the CPU).
    ("`estimator=full`", "optimization.guidance.estimator=full"),
    # Last: its first step compiles (a minute or more on a cold cache), and it is the row a short budget drops.
    ("`compile=true`", "model.compile=true"),
)
OUT_OF_MEMORY = "does not fit: out of memory"
OUT_OF_TIME = "not run: the check's time budget ran out"
#: A variant is loaded only when this much time is left before the deadline (a load and 7 steps at B=8).
VARIANT_RESERVE_S = 30.0
NO_GPU = "not measured: no GPU"
TITLE = "Stable Diffusion 1.5 size on a GPU"


def build_sd15_folder(folder: Path, device: torch.device, arch: Architecture = SD15) -> Path:
    """Save a random-weight pipeline with Stable Diffusion 1.5's architecture in diffusers format.

    Random weights cost the same compute as real ones, so step times carry over; the masks mean nothing.
    The tokenizer is the bundled model's vocabulary with SD's 77-token length (no hub is reachable).
    """
    from transformers import CLIPTokenizer

    length = arch.text_encoder["max_position_embeddings"]
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_PATHS["bundled-shapes"] / "tokenizer", model_max_length=length)
    return save_pipeline(folder, build_components(arch, tokenizer, device=device))


def release() -> None:
    """Free what the last variant left on the GPU before the next one loads (call after dropping it).

    After an unrecoverable CUDA error (an illegal memory access) the cache cannot be emptied either; that is
    logged, not raised, so the figures measured before it are still written.
    """
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as err:  # torch.AcceleratorError subclasses RuntimeError
            log.warning("could not empty the CUDA cache: %s", str(err).splitlines()[0] if str(err) else err)


def guarded(run: Callable[[], tuple[Timing, Any]]) -> tuple[Timing | None, str]:
    """Run one measurement (a :class:`Bench` run); running out of memory or failing becomes a note instead of
    ending the section."""
    timing, note = None, ""
    try:
        timing = run()[0]
    except torch.cuda.OutOfMemoryError:
        note = OUT_OF_MEMORY  # a measurement too: the setting does not fit on this card
    except Exception as err:
        note = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("GPU run failed:\n%s", traceback.format_exc())
    release()  # after the handler: until then the exception's frames hold the failed step's tensors
    return timing, note


def note_row(label: str, note: str) -> list[str]:
    """A table row for a run that gave no figures: its label and why (out of memory, out of time, a failure)."""
    return [label, "-", "", "", "", "", note]


def row(label: str, run: Callable[[], tuple[Timing, Any]], compiled: bool = False,
        figures: dict[str, dict[str, float]] | None = None) -> list[str]:
    """One measurement as a table row, extrapolated to :data:`EXTRAPOLATE_STEPS` steps per batch; its figures go
    to ``figures[label]`` (``step_s``, ``pairs_per_hour``, ``peak_mb``, ``reserved_mb``) when it ran. The row is
    logged as it is measured, so a check stopped later still shows it in its log."""
    timing, note = guarded(run)
    if timing is None:
        cells = note_row(label, note)
    else:
        if figures is not None:
            figures[label] = {"step_s": timing.step_s, "pairs_per_hour": timing.pairs_per_hour(EXTRAPOLATE_STEPS),
                              "peak_mb": timing.peak_mb, "reserved_mb": timing.reserved_mb}
        if compiled:
            note = f"first step {timing.first_step_s:.1f} s (compilation)"
        batch_s = EXTRAPOLATE_STEPS * timing.step_s + timing.fixed_s
        cells = [label, ms(timing.step_s), fmt(batch_s, 1), f"{timing.pairs_per_hour(EXTRAPOLATE_STEPS):,.0f}",
                 f"{timing.peak_mb:,.0f}", fmt(timing.reserved_mb, 0), note]
    log.info("gpu row: | %s |", " | ".join(cells))
    return cells


def section_gpu(report: Report, warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS, max_steps: int | None = None,
                arch: Architecture = SD15, device: torch.device | None = None,
                config_dir: str | os.PathLike | None = None, batch_sizes: Sequence[int] | None = None,
                switches: Sequence[tuple[str, str]] | None = None, mask_size: int | None = None,
                deadline: float | None = None, on_row: Callable[[str], None] | None = None) -> None:
    """SD-1.5-sized model, fp32 vs bf16, B = 1, 4, 8, the reference loop, then the switches; CUDA only. Each run's
    figures go to ``report.summary["gpu_rows"]`` by label.

    The section is added to ``report`` however the measuring ends: a variant that fails to load, or a run that
    fails or runs out of memory, is a row's note; a stop (:class:`~peekaboo.errors.Stopped`, a signal) keeps the
    rows measured so far. Past ``deadline`` (a ``time.perf_counter()`` value) less :data:`VARIANT_RESERVE_S`, the
    variants left are rows marked :data:`OUT_OF_TIME`. ``on_row`` gets the section's body after every row.

    ``arch``, ``device``, ``max_steps`` and the smaller ``batch_sizes``, ``switches`` and ``mask_size`` (None:
    :data:`BATCH_SIZES`, :data:`SWITCHES`, :data:`MASK_SIZE`) exist to check this code on a small model without
    a GPU; ``config_dir`` is the project's configs/ folder (:func:`peekaboo.bench.methods.resolve_config_dir`).
    """
    batch_sizes = tuple(BATCH_SIZES if batch_sizes is None else batch_sizes)
    switches = tuple(SWITCHES if switches is None else switches)
    mask_size = MASK_SIZE if mask_size is None else mask_size
    if device is None and not torch.cuda.is_available():
        report.summary["gpu"] = NO_GPU
        report.add(TITLE, NO_GPU + ".")
        return
    device = device or torch.device("cuda", 0)
    rows: list[list[str]] = []
    figures: dict[str, dict[str, float]] = report.summary.setdefault("gpu_rows", {})
    facts = {"build_s": float("nan"), "resolution": "?", "kind": "?"}
    size = f"optimization.mask.size={mask_size}"
    switch_batch = min(SWITCH_BATCH, max(batch_sizes))
    reference = "reference loop (paper style), fp32, B=1"
    # (row label with {b}, overrides, batch sizes, reference loop?): the precisions, the reference, the switches.
    variants: list[tuple[str, list[str], Sequence[int], bool]] = [
        (f"{name}, B={{b}}", overrides, batch_sizes, False) for name, overrides in PRECISIONS.items()]
    variants.append((reference, PRECISIONS["fp32"], (1,), True))
    variants += [(f"bf16, B={{b}}, {name}", [*PRECISIONS["bf16"], override], (switch_batch,), False)
                 for name, override in switches]

    def section_body(stopped: str = "") -> str:
        name = "the GPU"
        if device.type != "cuda":
            name = str(device)
        else:
            with contextlib.suppress(RuntimeError):  # after an unrecoverable CUDA error
                name = torch.cuda.get_device_name(device)
        body = (f"{name}. UNet, VAE and text encoder built from the SD-1.5 configs with random weights (built and "
                f"saved in {facts['build_s']:.0f} s), loaded through `load_backbone`; preset `{SD15_GROUP}` "
                f"(`{facts['kind']}`) with a {mask_size}x{mask_size} mask and composite (the VAE encodes at "
                f"{facts['resolution']}x{facts['resolution']}); {warmup}+{steps} steps per row, extrapolated to "
                f"{EXTRAPOLATE_STEPS} steps per pair batch. Switch rows compare with \"bf16, B={switch_batch}\". "
                "Peak memory is `torch.cuda.max_memory_allocated` (weights included); reserved is "
                "`max_memory_reserved`, what the card must hold with the allocator's cache. A row that runs out "
                "of memory says so: that setting does not fit on this card.\n\n")
        if stopped:
            body = f"**Stopped** ({stopped}) after {len(rows)} of the section's rows.\n\n" + body
        return body + table(["run", "ms/step", f"s per batch @{EXTRAPOLATE_STEPS}", "pairs/hour", "peak GPU MB",
                             "reserved GPU MB", "note"], rows)

    stopped = ""
    try:
        with tempfile.TemporaryDirectory(prefix="sd15-random-") as tmp:
            start = time.perf_counter()
            folder = build_sd15_folder(Path(tmp) / "sd15", device, arch)
            facts["build_s"] = time.perf_counter() - start
            bench = Bench(str(folder), device, warmup, steps, preset=SD15_GROUP, max_steps=max_steps,
                          config_dir=config_dir)
            items = load_items(max(batch_sizes), mask_size, "scale")
            for label, overrides, batches, is_reference in variants:
                labels = [label.format(b=b) for b in batches]
                if deadline is not None and time.perf_counter() > deadline - VARIANT_RESERVE_S:
                    rows.extend(note_row(lb, OUT_OF_TIME) for lb in labels)
                    log.info("gpu rows skipped (out of time): %s", ", ".join(labels))
                    continue
                try:  # a variant that cannot even load is its rows' note; the other variants still run
                    cfg = bench.config(size, *overrides)
                    backbone = bench.backbone(cfg)
                except torch.cuda.OutOfMemoryError:
                    rows.extend(note_row(lb, f"{OUT_OF_MEMORY} (loading)") for lb in labels)
                    release()
                    continue
                except Exception as err:
                    note = f"failed to load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    log.warning("GPU variant %s failed to load:\n%s", label, traceback.format_exc())
                    rows.extend(note_row(lb, note) for lb in labels)
                    release()
                    continue
                facts["resolution"], facts["kind"] = backbone.resolution, cfg.optimization.mask.kind
                for lb, b in zip(labels, batches, strict=True):
                    run = (partial(bench.reference_run, "reference", cfg, items[0], backbone) if is_reference
                           else partial(bench.trainer_run, lb, cfg, items[:b], backbone))
                    rows.append(row(lb, run, cfg.model.compile, figures))
                    del run  # it holds the backbone: dropped, so release() can free it
                    if on_row is not None:
                        on_row(section_body())
                del backbone
                release()
    except Stopped as err:
        stopped = str(err) or "a signal"
        raise
    finally:
        report.add(TITLE, section_body(stopped))
