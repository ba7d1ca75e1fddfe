"""What the tests share: repository paths, the overrides that make a command a smoke run, a test image."""

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIGS = REPO / "configs"

#: Overrides that make any predict or train command a smoke run: 2 steps of a 16x16 mask on the CPU, no bars.
#: Append a key to change one (a later key wins).
FAST = ("trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "optimization.mask.size=16")


def write_scene(path: Path, size: tuple[int, int] = (52, 30)) -> Path:
    """A small non-square RGB scene, a red square on blue, ``size`` = (width, height); returns ``path``."""
    arr = np.full((size[1], size[0], 3), (40, 120, 200), np.uint8)
    arr[5:20, 10:25] = (220, 30, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# -- small module settings (the tiny model's module tests) -----------------------------------------------------
MODULE_SIZE = 16  # mask side of the module tests


def small_optimization_config(kind: str = "raster", seed: int = 0):
    """Optimization settings small enough for module tests on the tiny model: a 16x16 mask, Adam."""
    from peekaboo.config import OptimizationConfig

    cfg = OptimizationConfig(seed=seed)
    cfg.mask.kind, cfg.mask.size = kind, MODULE_SIZE
    cfg.mask.fourier.hidden, cfg.mask.fourier.num_features = 16, 8
    cfg.mask.bilateral.iterations = 3
    cfg.optim.name, cfg.optim.lr = "adam", 0.05
    cfg.guidance.guidance_scale = 30.0
    return cfg


def cpu_trainer_config(steps: int = 4):
    """A CPU TrainerConfig of ``steps`` steps that logs every step and shows no progress bar."""
    from peekaboo.config import TrainerConfig

    return TrainerConfig(accelerator="cpu", max_steps=steps, enable_progress_bar=False, log_every_n_steps=1)
