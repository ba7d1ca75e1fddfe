"""predict.py end to end on a tiny model: files, sizes, fit modes, and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import FAST, REPO, write_scene

from peekaboo.app.cli import predict_main
from peekaboo.utils import images

PREDICT_FAST = [*FAST, "trainer.max_steps=3", "tensorboard=false"]


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("img") / "wide photo.png")  # a space in its name, 52x30


@pytest.mark.slow
def test_predict_writes_every_output_at_original_size(tiny_model, image_path, tmp_path):
    out = tmp_path / "out"
    proc = _run(f"image={image_path}", "prompt=a red circle", "prompt=a blue square",
                f"model.pretrained={tiny_model}", f"output_dir={out}", *PREDICT_FAST)
    assert proc.returncode == 0, proc.stderr
    for chatter in ("GPU available", "TPU available", "Tip:", "accelerate"):  # Lightning's banners, loading advice
        assert chatter not in proc.stdout + proc.stderr
    root = out / "wide_photo"
    assert (root / "config.yaml").is_file() and "a blue square" in (root / "config.yaml").read_text()
    assert "predict.py" in (root / "cmd.txt").read_text()
    for prompt in ("a_red_circle", "a_blue_square"):
        folder = root / prompt
        assert f"{folder}  (mask.png alpha.png overlay.png cutout.png; mask covers " in proc.stdout
        mask, alpha = Image.open(folder / "mask.png"), Image.open(folder / "alpha.png")
        overlay, cutout = Image.open(folder / "overlay.png"), Image.open(folder / "cutout.png")
        assert mask.size == alpha.size == overlay.size == cutout.size == (52, 30)
        assert cutout.mode == "RGBA" and mask.mode == "L"
        m, a = np.asarray(mask), np.asarray(alpha)
        assert set(np.unique(m)) <= {0, 255}
        assert np.array_equal(m == 255, a / 255.0 > 0.5)
        assert np.array_equal(np.asarray(cutout)[..., 3], a)


@pytest.mark.parametrize("fit", ["scale", "crop", "pad"])
def test_fit_modes_map_back_onto_original_pixels(fit):
    img = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    canvas, placement = images.fit_square(img, 16, fit)
    assert canvas.shape == (3, 16, 16)
    back = images.unfit(torch.ones(16, 16), placement)
    assert back.shape == (30, 50)
    seen = torch.ones(30, 50)
    if fit == "crop":  # only the centred 30x30 square was seen; the mask is 0 elsewhere
        seen[:, :10] = seen[:, 40:] = 0
    assert torch.allclose(back, seen, atol=1e-6)


def test_pad_maps_a_canvas_square_exactly():
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    _, placement = images.fit_square(img, 40, "pad")  # 1 canvas pixel = 1 image pixel; 10 rows of padding
    alpha = torch.zeros(40, 40)
    alpha[10:20, 5:15] = 1.0
    back = images.unfit(alpha, placement)
    expected = torch.zeros(20, 40)
    expected[0:10, 5:15] = 1.0
    assert torch.equal(back, expected)


def test_help_lists_options(capsys):
    assert predict_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "optimization.loss.gravity" in out and "usage:" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["image=/nonexistent.png", "prompt=a red circle"], "/nonexistent.png does not exist"),
        (["prompt=a red circle", "optimization.mask.sise=3"], "Unknown config key 'optimization.mask.sise'"),
        (["prompt=a red circle", "model.pretrained={tmp}"], "not a diffusers pipeline folder"),
    ],
)
def test_user_errors_are_one_line_and_non_zero(args, message, image_path, tmp_path, capsys):
    # In-process: tests/test_bad_inputs.py runs one real process for what only a real process shows.
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("image=") for a in args):
        args.insert(0, f"image={image_path}")
    assert predict_main([*args, f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in err
