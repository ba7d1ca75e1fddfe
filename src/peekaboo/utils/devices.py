"""Which device this process optimizes on, for single-process use and for dataset-run workers."""

from __future__ import annotations

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


def trainer_devices(device: torch.device) -> list[int] | int:
    """The Trainer's ``devices`` argument that pins it to ``device``."""
    return [device.index or 0] if device.type == "cuda" else 1
