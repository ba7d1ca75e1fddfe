"""The Python API: ``Segmenter.from_pretrained(...)(image, prompts)`` on the tiny model, and its README example."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import REPO

from peekaboo import Segmentation, Segmenter
from peekaboo.app.cli import predict_main
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import ConfigError, ImageError, PeekabooError

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
STEPS = 3


@pytest.fixture(scope="module")
def seg(tiny_model) -> Segmenter:
    return Segmenter.from_pretrained(str(tiny_model), trainer={"max_steps": STEPS, "accelerator": "cpu",
                                                               "enable_progress_bar": False},
                                     **{"optimization.mask.size": 16})


def test_from_pretrained_takes_the_cli_keys_and_validation(seg, tiny_model):
    assert seg.cfg.trainer.max_steps == STEPS and seg.cfg.optimization.mask.size == 16
    assert seg.cfg.model.pretrained == str(tiny_model)
    assert seg.cfg.optimization.mask.kind == "fourier_bilateral"  # a checkpoint starts from the paper's preset
    with pytest.raises(ConfigError, match=r"Unknown config key 'trainer\.max_stepz'.*Did you mean"):
        Segmenter.from_pretrained(str(tiny_model), **{"trainer.max_stepz": 3})
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        seg.with_overrides(trainer={"max_steps": 0})
    assert seg.with_overrides(**{"optimization.loss.gravity": 0.2}).backbone is seg.backbone


def test_each_model_starts_from_its_own_preset(tiny_model, tiny_sdxl_model, tmp_path):
    from peekaboo.app.segmenter import default_preset

    assert default_preset("bundled") == "objects" and default_preset("bundled-shapes") == "shapes"
    assert default_preset(str(tiny_model)) == "sd15"  # the paper's settings
    assert default_preset(str(tiny_sdxl_model)) == "sdxl"  # read from its UNet's config, no weights loaded
    # The UNet's conditioning decides, as it decides how the model is run, not the pipeline's class name.
    for model, name, preset in ((tiny_sdxl_model, "MySDXLPipeline", "sdxl"), (tiny_model, "StableDiffusionXLPipeline",
                                                                               "sd15")):
        copy = shutil.copytree(model, tmp_path / name)
        index = copy / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": name}))
        assert default_preset(str(copy)) == preset
    (copy / "unet" / "config.json").unlink()  # a folder the check lets through: never read as a hub id
    assert default_preset(str(copy)) == "sd15"


def test_results_at_the_original_size_for_every_image_kind(seg, scene_image):
    img = Image.open(scene_image).convert("RGB")
    arr = np.asarray(img)
    results = {
        "path": seg(scene_image, PROMPTS[0]),
        "pil": seg(img, PROMPTS[0]),
        "uint8": seg(arr, [PROMPTS[0]]),
        "float": seg(arr / 255.0, PROMPTS[0]),
        "tensor": seg(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255, PROMPTS[0]),
    }
    reference = results["path"][0]
    assert isinstance(reference, Segmentation) and reference.prompt == PROMPTS[0]
    assert reference.alpha.shape == reference.mask.shape == (arr.shape[0], arr.shape[1])
    assert reference.alpha.dtype == np.float32 and reference.mask.dtype == bool
    assert np.array_equal(reference.mask, reference.alpha > seg.cfg.optimization.threshold)
    assert reference.steps == STEPS and {"loss/dream", "loss/alpha", "loss/total"} <= set(reference.losses)
    for kind, [result] in results.items():
        assert np.array_equal(result.alpha, reference.alpha), kind


def test_prompts_of_one_image_run_as_one_batch_with_the_masks_of_each_alone(seg, scene_image, monkeypatch):
    batch_sizes = []
    original = Backbone.predict_eps  # every UNet call of the dream loss

    def spy(self, noisy, *args, **kwargs):
        batch_sizes.append(noisy[0].shape[0])  # pairs in the call
        return original(self, noisy, *args, **kwargs)

    monkeypatch.setattr(Backbone, "predict_eps", spy)
    together = seg(scene_image, PROMPTS)
    assert set(batch_sizes) == {len(PROMPTS)}
    alone = [seg(scene_image, p)[0] for p in PROMPTS]
    assert [r.prompt for r in together] == PROMPTS
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.alpha - b.alpha).max() <= 1 / 255 + 1e-6


def test_out_of_memory_halves_the_batch_with_the_same_masks(seg, scene_image, monkeypatch, caplog):
    reference = seg(scene_image, PROMPTS)
    original = Backbone.predict_eps  # every UNet call of the dream loss

    def small_gpu(self, noisy, *args, **kwargs):  # a device that holds at most one pair per step
        if noisy[0].shape[0] > 1:  # noisy: per row group (B, C, h, w)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, noisy, *args, **kwargs)

    monkeypatch.setattr(Backbone, "predict_eps", small_gpu)
    with caplog.at_level("WARNING"):
        split = seg(scene_image, PROMPTS)
    assert "out of accelerator memory for 3 prompts" in caplog.text
    for a, b in zip(reference, split, strict=True):
        assert np.abs(a.alpha - b.alpha).max() <= 1 / 255 + 1e-6

    def no_gpu(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Backbone, "predict_eps", no_gpu)
    with pytest.raises(PeekabooError, match="alone does not fit in accelerator memory"):
        seg(scene_image, PROMPTS[0])


@pytest.fixture
def script_logging():
    """Logging as a plain script has it: ``import lightning`` gives Lightning's loggers an INFO handler on stderr
    when the root logger has none (under pytest it has pytest's, which would swallow what a user sees)."""
    lightning_log = logging.getLogger("lightning.pytorch")
    handler = logging.StreamHandler(sys.stderr)  # the capture's stderr: capfd sees what it writes
    propagate, level = lightning_log.propagate, lightning_log.level
    lightning_log.addHandler(handler)
    lightning_log.propagate = False
    lightning_log.setLevel(logging.INFO)
    yield
    lightning_log.removeHandler(handler)
    lightning_log.propagate, lightning_log.level = propagate, level


def test_a_call_prints_nothing_and_a_progress_bar_only_when_asked(tiny_model, scene_image, script_logging, capfd):
    capfd.readouterr()
    # No trainer.enable_progress_bar here: a segmenter is quiet by default.
    seg = Segmenter.from_pretrained(str(tiny_model), trainer={"max_steps": STEPS, "accelerator": "cpu"},
                                    **{"optimization.mask.size": 16})
    results = seg(scene_image, PROMPTS[:2])
    assert [r.steps for r in results] == [STEPS, STEPS]
    assert capfd.readouterr() == ("", "")  # no Lightning banners ("GPU available: ..."), tips or bars
    seg(scene_image, PROMPTS[0], progress=True)
    out, err = capfd.readouterr()
    assert f"{STEPS}/{STEPS}" in out + err  # the bar, when asked: the capture sees what the fit writes


def test_warnings_inside_a_call_go_to_logging(seg, scene_image, monkeypatch, capfd, caplog):
    from peekaboo.optim.module import PeekabooModule

    original = PeekabooModule.on_fit_start

    def warn_then_start(self):
        warnings.warn("a warning raised inside the fit", UserWarning, stacklevel=1)
        return original(self)

    monkeypatch.setattr(PeekabooModule, "on_fit_start", warn_then_start)
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="peekaboo"):
        seg(scene_image, PROMPTS[0])
    assert capfd.readouterr() == ("", "")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("peekaboo.optim.engine", "UserWarning: a warning raised inside the fit")]


@pytest.mark.slow
def test_a_fresh_python_prints_nothing_from_loading_to_masks(tiny_model, scene_image, capfd):
    # A new interpreter: the libraries' own handlers and first-use warnings (weight loading, Lightning's import),
    # none of them configured by a test run before. It writes to this process's stdout and stderr.
    code = (f"from peekaboo import Segmenter\n"
            f"seg = Segmenter.from_pretrained({str(tiny_model)!r}, trainer={{'max_steps': 2, 'accelerator': 'cpu'}},"
            f" **{{'optimization.mask.size': 16}})\n"
            f"assert seg({str(scene_image)!r}, 'a red circle')[0].steps == 2\n")
    capfd.readouterr()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert capfd.readouterr() == ("", "")


def test_save_writes_what_predict_writes(seg, tiny_model, scene_image, tmp_path):
    [result] = seg(scene_image, PROMPTS[0])
    paths = result.save(tmp_path / "api")
    assert sorted(p.name for p in paths.values()) == ["alpha.png", "cutout.png", "mask.png", "overlay.png"]
    out = tmp_path / "cli"
    assert predict_main([f"image={scene_image}", f"prompt={PROMPTS[0]}", "model=sd15",
                         f"model.pretrained={tiny_model}", f"output_dir={out}", f"trainer.max_steps={STEPS}",
                         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "optimization.mask.size=16",
                         "tensorboard=false"]) == 0
    for kind, path in paths.items():
        assert path.read_bytes() == (out / "scene" / "a_red_circle" / f"{kind}.png").read_bytes(), kind


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.full((8, 8, 3), 2.0), "missing.png", 3.5])
def test_unusable_images_are_one_clear_error(seg, bad, tmp_path):
    bad = str(tmp_path / bad) if isinstance(bad, str) else bad
    with pytest.raises(ImageError):
        seg(bad, PROMPTS[0])
    with pytest.raises(ConfigError, match="non-empty prompts"):
        seg(np.zeros((8, 8, 3), np.uint8), [])


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    # The README's "Python API" block, as written, on the bundled model (it writes into the cwd).
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    results = namespace["results"]
    assert [r.prompt for r in results] == ["a car", "a light bulb"]
    assert (tmp_path / "masks" / "a_car" / "mask.png").is_file()
