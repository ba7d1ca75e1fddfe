"""Which device this process optimizes on, for single-process use and for dataset-run workers."""

from __future__ import annotations

import os

import torch

from peekaboo.errors import ConfigError, PeekabooError

#: ``trainer.accelerator`` values.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_dtype(dtype: str, device_type: str, error: type[PeekabooError] = ConfigError) -> None:
    """Refuse frozen-model weights in a dtype the device cannot run (float16 kernels are missing on CPU)."""
    if device_type == "cpu" and dtype == "float16":
        raise error("model.dtype=float16 is not supported on CPU (trainer.accelerator=cpu, or no GPU visible); "
                    "use model.dtype=float32 (or bfloat16) on CPU, float16 on a GPU.")


def resolve_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``trainer.accelerator`` and this worker's local rank."""
    if accelerator not in ACCELERATORS:
        choices = ", ".join(ACCELERATORS)
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not supported; use one of {choices}.")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def check_worker_devices(accelerator: str, devices: int) -> None:
    """Refuse ``trainer.devices`` workers that would share a GPU: each worker loads its own copy of the model,
    so two on one GPU split its memory and its compute between them, which no one asked for.

    Raises:
        ConfigError: more workers than visible GPUs (one line: how many are visible, what to set).
    """
    if devices <= 1:
        return
    device = resolve_device(accelerator)
    if device.type == "cpu":
        return  # CPU workers divide the cores between them (peekaboo.runs.workers)
    visible = torch.cuda.device_count() if device.type == "cuda" else 1
    if devices > visible:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{visible} GPU{'s are' if visible != 1 else ' is'} visible" + (
            f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else "")
        raise ConfigError(f"trainer.devices={devices} starts one worker per GPU, but {seen}; set "
                          f"trainer.devices={visible} (data.pairs_per_step puts more pairs on each GPU) or make "
                          "more GPUs visible.")


def set_tf32(enabled: bool, device: torch.device | str) -> None:
    """``model.tf32``: let float32 matmuls and convolutions on a CUDA ``device`` run on TF32 tensor cores (GPUs
    from Ampere on; older ones compute float32 either way), or keep them full float32.

    The switch is torch's, one per process (``torch.set_float32_matmul_precision("high")`` or ``"highest"``,
    and ``torch.backends.cudnn.allow_tf32``): the last model set up on a GPU decides it. On any other device
    this does nothing. Weights in float16 or bfloat16 do not use it; the mask's float32 math does.
    """
    if torch.device(device).type != "cuda":
        return
    # Only these two calls: setting torch.backends.cuda.matmul.allow_tf32 as well mixes torch's old and new
    # precision APIs, after which torch.get_float32_matmul_precision() (which Lightning calls) raises.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def trainer_devices(device: torch.device) -> list[int] | int:
    """The Trainer's ``devices`` argument that pins it to ``device``."""
    return [device.index or 0] if device.type == "cuda" else 1
