"""Bad input, faults and untrusted files: one clear error naming the culprit, and nothing already written lost.

The heart is a table of bad inputs for ``predict.py`` built in a temporary folder (images, prompts, models,
configs, a non-finite optimization, a full disk). A good run writes an output folder first; every bad case
then runs into the same folder and must exit 2 with one ``error: ...`` line naming the file or key, leave
the earlier outputs byte-identical, and (unless the case gets as far as optimizing) never start a fit.
Dataset runs (``train.py``) get the same inputs and must record a bad pair as failed and go on, or refuse
at start-up before the run folder exists. Everything runs in-process on the tiny model; one test uses a real
subprocess, for what only a real process shows (its stderr log line and its command-line encoding).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as lp
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tests_support import FAST, REPO, REPO_CONFIGS, write_scene

from peekaboo.app.cli import predict_main, train_main
from peekaboo.config import ModelConfig, PredictConfig, TrainConfig, load_config, to_yaml
from peekaboo.data import Pair
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.checks import check_model_source
from peekaboo.diffusion.loading import load_backbone
from peekaboo.errors import ImageError, ModelError, OutputError, PeekabooError
from peekaboo.runs.outputs import output_names
from peekaboo.utils import files, images

PREDICT_FAST = [*FAST, "tensorboard=false"]
TRAIN_FAST = [*FAST, "run.logger=none"]
# A learning rate no float32 MLP survives: the mask's logits overflow to inf - inf = nan in one step. (A Fourier
# mask starts from its own weights: the bundled preset's region start needs raster logits.)
NON_FINITE = ["optimization.optim.name=sgd", "optimization.optim.lr=1e30", "optimization.mask.kind=fourier",
              "optimization.mask.init=constant", "optimization.mask.fourier.hidden=8",
              "optimization.mask.fourier.num_features=8"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- the corpus ---------------------------------------------------------------------------------------------
def _noise_bytes(fmt: str) -> bytes:
    """An image of random pixels (so it does not compress away and a cut lands inside the pixel data)."""
    import io as _io

    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path: Path, side: int = 100_000) -> Path:
    """A 60-byte PNG whose header claims ``side`` x ``side`` pixels: refused before anything is decoded."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def _bad_image(kind: str, folder: Path) -> Path:
    """One bad image file of ``kind`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "truncated_png":
        data = _noise_bytes("PNG")
        (path := folder / "truncated.png").write_bytes(data[: len(data) // 2])
    elif kind == "truncated_jpeg":
        data = _noise_bytes("JPEG")
        (path := folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    elif kind == "not_an_image":
        (path := folder / "notes.png").write_text("these are notes, not pixels\n")
    elif kind == "zero_byte":
        (path := folder / "empty.png").write_bytes(b"")
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path := folder / "dot.png")
    elif kind == "bomb":
        path = _bomb(folder / "bomb.png")
    elif kind == "missing":
        path = folder / "missing.png"
    elif kind == "folder":
        (path := folder / "a_folder.png").mkdir()
    else:
        raise ValueError(kind)
    return path


BAD_IMAGES = {  # kind -> what the one error line says besides the file's path
    "truncated_png": "truncated or corrupt",
    "truncated_jpeg": "truncated or corrupt",
    "not_an_image": "not an image file",
    "zero_byte": "empty (zero-byte) file",
    "one_pixel": "only 1x1 pixels",
    "bomb": "decompression bomb",
    "missing": "does not exist",
    "folder": "is a folder",
}


def _model_variant(kind: str, tiny: Path, folder: Path) -> tuple[Path, str]:
    """A broken model folder of ``kind`` (built from the tiny model) and what its error says."""
    path = folder / f"model-{kind}"
    if kind == "missing":
        return path, "no such folder"
    if kind == "not_a_pipeline":
        path.mkdir(parents=True)
        (path / "weights.bin").write_bytes(b"\0" * 16)
        return path, "no model_index.json"
    if kind == "non_sd":
        path.mkdir(parents=True)
        index = {"_class_name": "FluxPipeline", **{c: ["diffusers", "X"] for c in
                                                   ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}}
        (path / "model_index.json").write_text(json.dumps(index))
        return path, "FluxPipeline pipeline without unet"
    shutil.copytree(tiny, path, ignore=shutil.ignore_patterns("vae") if kind == "no_vae" else None)
    if kind == "no_vae":
        return path, "lacks the component folder(s) vae/"
    if kind == "inpainting":  # a loadable 9-channel UNet: diffusers reads it, segmenting cannot use it
        from diffusers import UNet2DConditionModel

        config = json.loads((path / "unet" / "config.json").read_text())
        UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(path / "unet")
        return path, "its UNet takes 9 input channels"
    if kind == "pickled_text_encoder":  # weights as a pickle that runs code when fully unpickled
        from safetensors.torch import load_file

        weights = path / "text_encoder" / "model.safetensors"
        state = {**load_file(weights), "payload": _Payload(path.parent / f"PWNED-{path.name}")}
        weights.unlink()
        torch.save(state, path / "text_encoder" / "pytorch_model.bin")
        return path, "component text_encoder/: pytorch_model.bin is a pickle that a safe load refuses"
    edits = {"sdxl": ("unet", "config.json", "addition_embed_type", "text_time", "addition_embed_type='text_time'"),
             "huge_channels": ("unet", "config.json", "block_out_channels", [3_000_000, 6_000_000],
                               "component unet/: block_out_channels=[3000000, 6000000]"),
             "huge_sample_size": ("unet", "config.json", "sample_size", 1_000_000_000,
                                  "component unet/: sample_size=1000000000"),
             "huge_text_encoder": ("text_encoder", "config.json", "hidden_size", 500_000,
                                   "component text_encoder/: its config.json describes at least"),
             "deep_text_encoder": ("text_encoder", "config.json", "num_hidden_layers", 1_000_000,
                                   "component text_encoder/: num_hidden_layers=1000000"),
             "prediction_type": ("scheduler", "scheduler_config.json", "prediction_type", "sample",
                                 "the scheduler predicts 'sample'")}
    sub, name, key, value, message = edits[kind]
    config = json.loads((path / sub / name).read_text())
    (path / sub / name).write_text(json.dumps({**config, key: value}))
    return path, message


MODEL_KINDS = ("missing", "not_a_pipeline", "non_sd", "no_vae", "sdxl", "prediction_type", "huge_channels",
               "huge_sample_size", "huge_text_encoder", "deep_text_encoder", "pickled_text_encoder")


@dataclass(frozen=True)
class Corpus:
    """A good image, the tiny model, and an output folder holding one good run's files."""

    root: Path
    image: Path
    model: Path
    out: Path


@pytest.fixture(scope="module")
def corpus(tiny_model, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    image = write_scene(root / "scene.png")
    out = root / "out"
    code = predict_main([f"image={image}", "prompt=a red circle", f"model.pretrained={tiny_model}",
                         f"output_dir={out}", *PREDICT_FAST], REPO_CONFIGS)
    assert code == 0 and (out / "scene" / "a_red_circle" / "mask.png").is_file()
    return Corpus(root, image, tiny_model, out)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(err: str) -> str:
    """The single ``error: ...`` line of stderr (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _fit_must_not_run(*args, **kwargs):
    raise AssertionError("the optimization started although the input was bad")


# -- the predict.py table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input: ``make(tmp, corpus)`` returns (overrides, expected texts in the error line).

    Overrides replace the good run's ``key=value`` arguments (None drops one). ``optimizes``: the case gets as
    far as optimizing (into its own image folder), so only the good run's folder is compared.
    """

    id: str
    make: Callable[[Path, Corpus], tuple[dict[str, object], list[str]]]
    optimizes: bool = False
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    extra: list[str] = field(default_factory=list)


def _image_case(kind: str) -> Case:
    def make(tmp: Path, c: Corpus):
        path = _bad_image(kind, tmp)
        return {"image": path}, [str(path), BAD_IMAGES[kind]]

    return Case(f"image-{kind}", make)


def _model_case(kind: str) -> Case:
    def make(tmp: Path, c: Corpus):
        path, message = _model_variant(kind, c.model, tmp)
        return {"model.pretrained": path}, [str(path), message]

    return Case(f"model-{kind}", make)


def _config_case(id: str, override: str, *expected: str) -> Case:
    key, _, value = override.partition("=")
    return Case(f"config-{id}", lambda tmp, c: ({key: value}, list(expected)))


def _copy_ofwrite_scene(name: str) -> Callable[[Path, Corpus], Path]:
    return lambda tmp, c: Path(shutil.copy(c.image, tmp / name))


def _save_fails_on_call(n: int) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """``Image.save`` raises ENOSPC on its ``n``-th call (a disk that fills up mid-way)."""

    def patch(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        real, calls = Image.Image.save, []

        def save(self, fp, *args, **kwargs):
            calls.append(fp)
            if len(calls) == n:
                raise ENOSPC
            return real(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", save)

    return patch


CASES = [
    *(_image_case(kind) for kind in BAD_IMAGES),
    Case("image-over-max-pixels", lambda tmp, c: ({"image_options.max_pixels": 1000},
                                                  [str(c.image), "claims 1,560 pixels", "max_pixels=1,000"])),
    Case("prompt-empty", lambda tmp, c: ({"prompt": ""}, ["prompt[0] is empty"])),
    Case("prompt-whitespace", lambda tmp, c: ({"prompt": " \t "}, ["prompt[0] is empty"])),
    *(_model_case(kind) for kind in MODEL_KINDS),
    Case("model-float16-on-cpu", lambda tmp, c: ({"model.dtype": "float16"},
                                                 ["model.dtype=float16 is not supported", "trainer.accelerator=cpu"])),
    _config_case("unknown-key", "optimization.mask.sise=3", "Unknown config key 'optimization.mask.sise'",
                 "Did you mean 'optimization.mask.size'"),
    _config_case("wrong-type", "trainer.max_steps=many", "'trainer.max_steps'", "converted to Integer"),
    _config_case("negative-gravity", "optimization.loss.gravity=-0.1", "'optimization.loss.gravity'", ">= 0"),
    _config_case("threshold", "optimization.threshold=1.5", "'optimization.threshold'", "0 <= threshold <= 1"),
    _config_case("t-outside-schedule", "optimization.guidance.t_max=1.5", "t_min/t_max", "0 <= t_min < t_max <= 1"),
    _config_case("t-min-above-t-max", "optimization.guidance.t_min=0.99", "t_min/t_max", "0 <= t_min < t_max <= 1"),
    _config_case("zero-steps", "trainer.max_steps=0", "'trainer.max_steps'", "an integer >= 1"),
    _config_case("infinite-lr", "optimization.optim.lr=inf", "'optimization.optim.lr'", "not a finite number"),
    _config_case("negative-momentum", "optimization.optim.momentum=-1", "'optimization.optim.momentum'", ">= 0"),
    _config_case("huge-mask", "optimization.mask.size=100000", "'optimization.mask.size'", "[8, 4096]"),
    _config_case("accelerator", "trainer.accelerator=tpu", "'trainer.accelerator'", "auto | cpu"),
    _config_case("broken-list", "optimization.optim.betas=[0.9", "'optimization.optim.betas'", "cannot be parsed"),
    _config_case("section-as-value", "optimization=fast", "optimization is a config section"),
    # Typed keys keep YAML parsing; a value of the wrong shape for its field is one line naming the key.
    _config_case("number-given-a-mapping", "optimization.optim.lr=big: 1",
                 "optimization.optim.lr takes one number, not a mapping"),
    _config_case("number-given-a-list", "trainer.max_steps=[1, 2]", "trainer.max_steps takes one integer, not a list"),
    _config_case("nested-list", "optimization.optim.betas=[[0.9], 0.99]",
                 "optimization.optim.betas is a list of plain values"),
    _config_case("list-given-a-mapping", "image_options.flatten_background=grey: 1",
                 "image_options.flatten_background is a list of plain values"),
    Case("model-is-a-file", lambda tmp, c: ({"model.pretrained": c.model / "model_index.json"},
                                            [str(c.model / "model_index.json"), "is a file, not a folder"])),
    Case("config-output-dir-is-a-file", lambda tmp, c: ({"output_dir": c.image / "sub"},
                                                        [str(c.image), "is a file, not a folder"])),
    # predict.py loads the model the way editing does, where a 9-channel UNet is fine; the UNet call refuses it
    # for segmenting at the first step (a dataset run refuses it at start-up, see the train tests).
    Case("model-inpainting", lambda tmp, c: ({"image": _copy_ofwrite_scene("inpaint_scene.png")(tmp, c),
                                              "model.pretrained": _model_variant("inpainting", c.model, tmp)[0]},
                                             ["The loaded model: its UNet takes 9 input channels"]), optimizes=True),
    Case("numerics-non-finite", lambda tmp, c: ({"image": _copy_ofwrite_scene("nan_scene.png")(tmp, c)},
                                                ["non-finite loss or mask", "optimization.optim.lr"]),
         optimizes=True, extra=NON_FINITE),
    # A failed rerun for the image of the good run: its folder (config.yaml and cmd.txt included) stays as it
    # was, and the message names the setting that overflowed.
    Case("rerun-non-finite-lr", lambda tmp, c: ({}, ["non-finite loss or mask", "optimization.optim.lr=1e+30"]),
         optimizes=True, extra=NON_FINITE),
    Case("rerun-huge-gravity", lambda tmp, c: ({}, ["non-finite loss or mask", "optimization.loss.gravity=1e+38"]),
         optimizes=True, extra=["optimization.loss.gravity=1e38"]),
    Case("rerun-huge-guidance", lambda tmp, c: ({}, ["non-finite loss or mask",
                                                     "optimization.guidance.guidance_scale=1e+38"]),
         optimizes=True, extra=["optimization.guidance.guidance_scale=1e38"]),
    Case("fault-disk-full-mid-write", lambda tmp, c: ({"image": _copy_ofwrite_scene("full_scene.png")(tmp, c)},
                                                      ["alpha.png", "No space left on device", "free disk space"]),
         optimizes=True, patch=_save_fails_on_call(2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_predict_bad_input_exits_2_naming_it_and_keeps_earlier_outputs(case, corpus, tmp_path, monkeypatch,
                                                                        capsys):
    before = _snapshot(corpus.out)
    overrides, expected = case.make(tmp_path, corpus)
    args = {"image": corpus.image, "prompt": "a red circle", "model.pretrained": corpus.model,
            "output_dir": corpus.out, **overrides}
    fast = [a for a in PREDICT_FAST if a.partition("=")[0] not in overrides]  # the case's value wins
    argv = [f"{k}={v}" for k, v in args.items() if v is not None] + fast + case.extra
    if not case.optimizes:
        monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    capsys.readouterr()
    code = predict_main(argv, REPO_CONFIGS)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2, err
    line = _error_line(err)
    for text in expected:
        assert text in line, line
    after = _snapshot(corpus.out)
    if case.optimizes:  # it wrote into its own image's folder; the good run's files are untouched
        assert {k: v for k, v in after.items() if k.startswith("scene/")} == \
            {k: v for k, v in before.items() if k.startswith("scene/")}
        assert not [k for k in after if k.endswith(".tmp")]  # a failed write leaves no temporary file
    else:  # nothing was written at all
        assert after == before


@pytest.mark.slow
def test_disk_full_keeps_the_files_written_before_it(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [f"image={corpus.image}", "prompt=a red circle", f"model.pretrained={corpus.model}", f"output_dir={out}",
            *PREDICT_FAST]
    _save_fails_on_call(3)(monkeypatch, tmp_path)  # two PNGs are written, the third fails
    assert predict_main(argv, REPO_CONFIGS) == 2
    line = _error_line(capsys.readouterr().err)
    assert ".png: No space left on device" in line and "files written before are intact" in line
    written = sorted((out / "scene" / "a_red_circle").iterdir())
    assert len(written) == 2 and all(p.suffix == ".png" for p in written)  # no temporary file left behind
    for path in written:  # complete, readable files
        with Image.open(path) as img:
            img.load()
            assert img.size == (52, 30)


# -- images that must load --------------------------------------------------------------------------------
def _variant(kind: str, path: Path) -> tuple[Path, tuple[int, int], tuple[int, int, int]]:
    """An unusual but valid image of ``kind``: (file, expected upright (w, h), expected top-left RGB)."""
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:10, :15] = (200, 40, 40)  # a red top-left quarter
    img = Image.fromarray(arr)
    if kind == "exif_rotated":  # stored sideways, EXIF says: rotate 90 degrees clockwise to view
        exif = img.getexif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path := path.with_suffix(".jpg"), exif=exif.tobytes())
        return path, (30, 20), (200, 40, 40)
    if kind == "grayscale":
        img.convert("L").save(path)
        return path, (30, 20), (87, 87, 87)
    if kind == "palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
        return path, (30, 20), (200, 40, 40)
    if kind == "rgba":  # transparent top-left: flattened over image_options.flatten_background (white here)
        rgba = np.dstack([arr, np.full((20, 30), 255, np.uint8)])
        rgba[:10, :15, 3] = 0
        Image.fromarray(rgba, "RGBA").save(path)
        return path, (30, 20), (255, 255, 255)
    if kind == "sixteen_bit":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(path)
        return path, (30, 20), (200, 200, 200)
    if kind == "cmyk_jpeg":
        img.convert("CMYK").save(path := path.with_suffix(".jpg"), quality=100)
        return path, (30, 20), (200, 40, 40)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["exif_rotated", "grayscale", "palette", "rgba", "sixteen_bit", "cmyk_jpeg"])
def test_unusual_images_load_as_upright_rgb(kind, tmp_path):
    path, size, top_left = _variant(kind, tmp_path / f"{kind}.png")
    img = images.load_image(path, flatten_background=(1.0, 1.0, 1.0))
    assert img.mode == "RGB" and img.size == size
    assert np.abs(np.asarray(img)[2, 2].astype(int) - top_left).max() <= 8  # JPEG may shift a few levels


@pytest.mark.slow
def test_exif_rotated_photo_is_segmented_upright(corpus, tmp_path, capsys):
    path, (w, h), _ = _variant("exif_rotated", tmp_path / "photo.png")
    assert Image.open(path).size == (h, w)  # stored sideways
    out = tmp_path / "out"
    code = predict_main([f"image={path}", "prompt=a red circle", f"model.pretrained={corpus.model}",
                         f"output_dir={out}", *PREDICT_FAST], REPO_CONFIGS)
    assert code == 0, capsys.readouterr().err
    assert Image.open(out / "photo" / "a_red_circle" / "mask.png").size == (w, h)


def test_huge_image_is_reduced_for_the_canvas_and_the_mask_maps_back(tmp_path):
    # 54 megapixels with a white square in its top-left ninth; within the default pixel limit.
    img = Image.new("RGB", (9000, 6000), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 3000, 2000))
    for mode in ("scale", "crop", "pad"):
        start = time.perf_counter()
        canvas, placement = images.fit_square(img, 64, mode)
        assert time.perf_counter() - start < 5.0, mode  # Pillow box-filters first: no 54 MP float tensor
        assert canvas.shape == (3, 64, 64)
        alpha = (canvas.mean(0) > 0.5).float()  # the square, as a mask on the canvas
        start = time.perf_counter()
        back = images.unfit(alpha, placement)
        assert time.perf_counter() - start < 10.0, mode  # the (6000, 9000) result itself is 216 MB of float32
        assert back.shape == (6000, 9000)
        # The mask lands on the square in original pixels (within a canvas pixel of its edges); a centre crop
        # shows only columns 1500..7500, so its mask is 0 left of them.
        seen = 1600 if mode == "crop" else 0
        assert back[:1800, seen:2800].mean() > 0.99 and back[2300:, 3300:].max() == 0, mode
        assert mode != "crop" or back[:, :1500].max() == 0


def test_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    path = _bomb(tmp_path / "bomb.png", side=60_000)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="claims 3,600,000,000 pixels"):
        images.load_image(path)
    assert time.perf_counter() - start < 1.0


# -- prompts ----------------------------------------------------------------------------------------------
# Text keys (str, Optional[str] and list-of-str fields of the schema) take the value literally, whatever YAML
# would make of it: (schema, key, value).
LITERAL_TEXT = [
    (PredictConfig, "prompt", "a red circle: the big one"),
    (PredictConfig, "prompt", "{a: b}"),
    (PredictConfig, "prompt", "a photo of [x, y]"),
    (PredictConfig, "prompt", "[x] {y}"),
    (PredictConfig, "prompt", "[a, b: c]"),
    (PredictConfig, "prompt", "- a dash"),
    (PredictConfig, "prompt", "true"),
    (PredictConfig, "prompt", "1e5"),
    (PredictConfig, "prompt", "null"),
    (PredictConfig, "prompt", "costs ${x}"),
    (PredictConfig, "prompt", "[unclosed"),
    (PredictConfig, "image", "[scene]: 1.png"),
    (PredictConfig, "edit.prompt", "key: value"),
    (PredictConfig, "model.pretrained", "{models}/sd"),
    (PredictConfig, "output_dir", "out: {1}"),
    (TrainConfig, "data.manifest", "pairs: [1].jsonl"),
    (TrainConfig, "run.name", "run: 1"),
]


@pytest.mark.parametrize("schema,key,value", LITERAL_TEXT, ids=lambda v: v if isinstance(v, str) else "")
def test_text_values_are_taken_literally(schema, key, value):
    base = ["image=x.png", "prompt=p"] if schema is PredictConfig else ["data.source=shapes", "run.name=r"]
    cfg = load_config(schema, [*[a for a in base if a.partition("=")[0] != key], f"{key}={value}"])
    got = OmegaConf.select(cfg, key)
    assert (got[-1] if key == "prompt" else got) == value
    # The saved config.yaml, read back as a rerun and the worker processes read it, holds the same text.
    saved = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=True)
    for part in key.split("."):
        saved = saved[part]
    assert (saved[-1] if key == "prompt" else saved) == value


def test_null_clears_an_optional_text_key_but_is_a_prompt_for_a_list():
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=null", "edit.prompt=null"])
    assert cfg.edit.prompt is None and list(cfg.prompt) == ["null"]


def test_a_flow_list_of_prompts_is_several_prompts_each_taken_as_written():
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=[true, 1e5, a red circle]", "prompt=c: d"])
    assert list(cfg.prompt) == ["true", "1e5", "a red circle", "c: d"]


@pytest.mark.slow
def test_unicode_and_overlong_prompts_in_a_real_process(corpus, tmp_path):
    out = tmp_path / "out"
    long_prompt = " ".join(["a red circle and a blue square"] * 4)  # 28 words; the tiny model reads 14 tokens
    prompts = ["ein grüner Kreis 🟢", "绿色的圆", long_prompt, "a red circle: the big one"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"image={corpus.image}", *(f"prompt={p}" for p in prompts),
         f"model.pretrained={corpus.model}", f"output_dir={out}", *PREDICT_FAST],
        capture_output=True, text=True, encoding="utf-8", cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "is 28 tokens long but the model reads 14, so it was truncated to its first 14 tokens" in proc.stderr
    folders = sorted(p for p in (out / "scene").iterdir() if p.is_dir())
    assert len(folders) == 4
    for folder in folders:  # ASCII names inside the output folder, each with all four files
        assert folder.name.isascii() and folder.parent == out / "scene"
        assert {"mask.png", "alpha.png", "overlay.png", "cutout.png"} <= {p.name for p in folder.iterdir()}
    assert "ein_gr-ner_Kreis" in " ".join(f.name for f in folders)
    assert "绿色的圆" in (out / "scene" / "config.yaml").read_text(encoding="utf-8")


# -- models -----------------------------------------------------------------------------------------------
def test_float16_on_cpu_is_refused_before_loading(tiny_model):
    with pytest.raises(ModelError, match=r"model\.dtype=float16 is not supported on CPU"):
        check_model_source(ModelConfig(pretrained=str(tiny_model), dtype="float16"), "cpu")


def test_weights_load_from_safetensors_without_unpickling(tiny_model, monkeypatch):
    assert sorted(p.suffix for p in tiny_model.rglob("*diffusion_pytorch_model*")) == [".safetensors"] * 2

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was loaded although safetensors weights exist")

    monkeypatch.setattr(torch, "load", no_pickles)
    backbone = load_backbone(ModelConfig(pretrained=str(tiny_model)))
    assert isinstance(backbone, Backbone)


def test_pickled_text_encoder_is_refused_and_never_runs(corpus, tmp_path, monkeypatch, capsys):
    path, message = _model_variant("pickled_text_encoder", corpus.model, tmp_path)
    marker = tmp_path / f"PWNED-{path.name}"
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default made unsafe: still refused
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    out = tmp_path / "out"
    code = predict_main([f"image={corpus.image}", "prompt=a red circle", f"model.pretrained={path}",
                         f"output_dir={out}", *PREDICT_FAST], REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and str(path) in line and message in line
    assert not marker.exists() and not out.exists()
    monkeypatch.undo()
    torch.load(path / "text_encoder" / "pytorch_model.bin", weights_only=False)["payload"].close()
    assert marker.exists()  # the payload was live


def test_no_remote_code_is_ever_trusted():
    sources = [p for p in (REPO / "src").rglob("*.py")] + [REPO / "predict.py", REPO / "train.py"]
    assert [str(p) for p in sources if "trust_remote_code" in p.read_text()] == []


# -- dataset runs (train.py) ------------------------------------------------------------------------------
def _train(corpus: Corpus, root: Path, name: str, *args: str) -> list[str]:
    return [f"model.pretrained={corpus.model}", f"run.root={root}", f"run.name={name}", *TRAIN_FAST, *args]


def _results(run: Path) -> list[dict]:
    """Every line of results.jsonl parsed (fails on a partial line)."""
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


NASTY_IDS = ["../../etc/passwd", "/abs", "a/b", "..", "", "x" * 300, "çà-猫-🟢", "C:\\win\\path", ".hidden", "-"]
NASTY_PROMPTS = ["a red circle", "ein grüner Kreis 🟢", "绿色的圆", "a blue square", "a red circle: the big one",
                 "[x] {y: z}"]


@pytest.mark.slow
def test_dataset_run_records_bad_images_and_keeps_every_output_inside_the_run(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    write_scene(data / "imgs" / "good.png")
    rows = [{"image": "imgs/good.png", "prompt": NASTY_PROMPTS[i % len(NASTY_PROMPTS)], "id": pair_id}
            for i, pair_id in enumerate(NASTY_IDS)]
    bad = {kind: _bad_image(kind, data / "imgs") for kind in BAD_IMAGES if kind != "folder"}
    rows += [{"image": str(path.relative_to(data)), "prompt": "a red circle", "id": f"bad-{kind}"}
             for kind, path in bad.items()]
    manifest = _write_manifest(data / "pairs.jsonl", rows)
    runs = tmp_path / "runs"
    code = train_main(_train(corpus, runs, "nasty", "data=manifest", f"data.manifest={manifest}",
                             "data.pairs_per_step=16"), REPO_CONFIGS)
    assert code == 0, capsys.readouterr().err
    run = runs / "nasty"
    results = {r["id"]: r for r in _results(run)}
    assert len(results) == len(rows)
    for kind, path in bad.items():  # recorded as failed, naming the file; the others went on
        record = results[f"bad-{kind}"]
        assert record["status"] == "failed: input" and str(path) in record["error"] and BAD_IMAGES[kind] in \
            record["error"]
    done = [r for r in results.values() if r["status"] == "done"]
    assert len(done) == len(NASTY_IDS)
    assert {r["prompt"] for r in done} == set(NASTY_PROMPTS)  # manifest prompts are text, whatever they look like
    assert len({r["name"] for r in done}) == len(done)  # distinct ids, distinct files
    for record in done:
        for output in record["outputs"].values():
            assert (run / output).resolve().parent.parent == run.resolve()  # masks/<name>.png, nothing deeper
            assert Image.open(run / output).size == (52, 30)
    # Nothing was written outside the run folder (the data folder holds only what the test put there).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]
    assert sorted(p.name for p in runs.iterdir()) == ["nasty"]


@pytest.mark.parametrize("pair_id", [*NASTY_IDS, "a\x00b", "\n", "CON", "name with spaces", "名前" * 100])
def test_safe_name_never_leaves_the_folder(pair_id, tmp_path):
    name = files.safe_name(pair_id)
    assert name and name not in (".", "..") and not name.startswith(("-", ".")) and name.isascii()
    assert "/" not in name and "\\" not in name and "\x00" not in name and len(name) <= 89
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    assert files.safe_name(pair_id) == name  # stable: resumed runs find their files


def test_distinct_ids_get_distinct_names_or_a_clear_error():
    ids = [*NASTY_IDS, "a-b", "a b", "a/b/", "a//b", "a\\b", "x" * 301]
    assert len({files.safe_name(i) for i in ids}) == len(ids)
    # Spaces become "_" without a digest (readable prompt folders), so "a b" and "a_b" share a name: a
    # dataset run refuses such ids up front instead of letting one pair overwrite the other.
    pairs = [Pair(id=i, prompt="p", load_image=Image.new, load_target=lambda: None) for i in ("a b", "a_b")]
    with pytest.raises(PeekabooError, match="map to the same output name 'a_b'"):
        output_names(pairs)


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("header.csv", "image,prompt\n"),
                                       ("commas.csv", "image,prompt\n,\n")])
def test_empty_manifest_names_the_file(name, text, corpus, tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "data" / name
    manifest.parent.mkdir()
    manifest.write_text(text)
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    runs = tmp_path / "runs"
    code = train_main(_train(corpus, runs, "e", "data=manifest", f"data.manifest={manifest}"), REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and f"Manifest {manifest} is empty" in line and "data.split" not in line
    assert not runs.exists()


@pytest.mark.slow
def test_train_rerun_that_is_refused_or_fails_keeps_the_run_record(corpus, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    argv = _train(corpus, runs, "keep", "data=shapes", "data.num_pairs=1")
    assert train_main(argv, REPO_CONFIGS) == 0, capsys.readouterr().err
    before = _snapshot(runs / "keep")
    assert {"config.yaml", "cmd.txt"} <= set(before)
    refused = train_main([*argv, "optimization.loss.gravity=0.5"], REPO_CONFIGS)
    assert refused == 2 and "different optimization settings" in _error_line(capsys.readouterr().err)
    assert _snapshot(runs / "keep") == before

    def disk_full(*args, **kwargs):
        raise OutputError("Could not write a checkpoint: No space left on device; free disk space.")

    monkeypatch.setattr("peekaboo.runs.runner.run_worker", disk_full)  # a rerun (other logging) that then fails
    assert train_main([*argv, "run.checkpoint_every_n_steps=7"], REPO_CONFIGS) == 2
    _error_line(capsys.readouterr().err)
    assert _snapshot(runs / "keep") == before


@pytest.mark.slow
def test_manifest_paths_outside_its_folder_are_refused_unless_allowed(corpus, tmp_path, capsys, monkeypatch):
    write_scene(tmp_path / "elsewhere" / "outside.png")
    runs = tmp_path / "runs"
    for value, message in (("../elsewhere/outside.png", "resolves outside the manifest's folder"),
                           (str(tmp_path / "elsewhere" / "outside.png"), "is an absolute path")):
        manifest = _write_manifest(tmp_path / "data" / "pairs.jsonl", [{"image": value, "prompt": "a red circle"}])
        with monkeypatch.context() as m:
            m.setattr(lp.Trainer, "fit", _fit_must_not_run)
            code = train_main(_train(corpus, runs, "out", "data=manifest", f"data.manifest={manifest}"),
                              REPO_CONFIGS)
        line = _error_line(capsys.readouterr().err)
        assert code == 2 and message in line and "data.allow_outside_root=true" in line and str(manifest) in line
        assert not runs.exists()
    code = train_main(_train(corpus, runs, "out", "data=manifest", f"data.manifest={manifest}",
                             "data.allow_outside_root=true"), REPO_CONFIGS)
    assert code == 0 and [r["status"] for r in _results(runs / "out")] == ["done"]


class _Payload:
    """Pickles as ``open(marker, "w")``: loading it with a full unpickler creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_malicious_checkpoint_never_runs_code(corpus, tmp_path, monkeypatch, capsys, caplog):
    runs, marker = tmp_path / "runs", tmp_path / "PWNED"
    ckpt = runs / "evil" / "pairs" / "eval-00000-0" / "ckpt" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Payload(marker)}, ckpt)
    evidence = Path(shutil.copy(ckpt, tmp_path / "evil.ckpt"))  # the run deletes the pair's folder when done
    # Make torch's own default unsafe, as Lightning's resume relies on it (it passes weights_only=None): the
    # runner's explicit weights_only=True check must refuse the file before Lightning could read it.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    resumed_from, real_fit = [], lp.Trainer.fit

    def fit(self, *args, ckpt_path=None, **kwargs):
        resumed_from.append(ckpt_path)
        return real_fit(self, *args, ckpt_path=ckpt_path, **kwargs)

    monkeypatch.setattr(lp.Trainer, "fit", fit)
    code = train_main(_train(corpus, runs, "evil", "data=shapes", "data.num_pairs=1"), REPO_CONFIGS)
    assert code == 0, capsys.readouterr().err
    assert not marker.exists() and resumed_from == [None]
    assert "holds objects or code that a safe load refuses" in caplog.text
    assert [r["status"] for r in _results(runs / "evil")] == ["done"]
    # The payload was live: an unsafe load of the same file runs it.
    monkeypatch.undo()
    torch.load(evidence, weights_only=False)["payload"].close()
    assert marker.exists()


def test_refcoco_pickle_with_code_is_refused(corpus, tmp_path, monkeypatch, capsys):
    root, marker = tmp_path / "refcoco", tmp_path / "PWNED"
    root.mkdir()
    (root / "refs(unc).p").write_bytes(pickle.dumps([_Payload(marker)]))
    (root / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    runs = tmp_path / "runs"
    code = train_main(_train(corpus, runs, "ref", "data=refcoco", f"data.root={root}"), REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "Refusing to load" in line and str(root / "refs(unc).p") in line
    assert not marker.exists() and not runs.exists()


@pytest.mark.parametrize("kind", ["missing", "non_sd", "no_vae", "sdxl", "inpainting", "prediction_type", "float16",
                                  "huge_channels", "huge_sample_size", "pickled_text_encoder"])
def test_train_refuses_a_bad_model_before_the_run_starts(kind, corpus, tmp_path, monkeypatch, capsys):
    if kind == "float16":
        args, message = [f"model.pretrained={corpus.model}", "model.dtype=float16"], "model.dtype=float16"
    else:
        path, message = _model_variant(kind, corpus.model, tmp_path)
        args = [f"model.pretrained={path}"]
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    runs = tmp_path / "runs"
    code = train_main([*_train(corpus, runs, "m", "data=shapes", "data.num_pairs=1"), *args], REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and message in line
    assert not runs.exists()  # no config.yaml recorded: the corrected command is not "different settings"


@pytest.mark.parametrize("override,message", [
    ("optimization.loss.gravity=-1", "'optimization.loss.gravity' = -1.0 is out of range; allowed: >= 0"),
    ("data.pairs_per_step=0", "'data.pairs_per_step' = 0 is out of range; allowed: an integer >= 1"),
    ("run.checkpoint_every_n_steps=0", "'run.checkpoint_every_n_steps'"),
    ("data.sauce=shapes", "Did you mean 'data.source'"),
])
def test_train_rejects_bad_config_at_start_up(override, message, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    code = train_main([*_train(corpus, tmp_path / "runs", "c", "data=shapes"), override], REPO_CONFIGS)
    assert code == 2 and message in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_non_finite_pairs_fail_and_the_run_goes_on(corpus, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = train_main(_train(corpus, runs, "nan", "data=shapes", "data.num_pairs=2", "data.pairs_per_step=2",
                             *NON_FINITE), REPO_CONFIGS)
    assert code == 0, capsys.readouterr().err
    results = _results(runs / "nan")
    assert [r["status"] for r in results] == ["failed: non-finite"] * 2
    assert all("non-finite" in r["error"] for r in results)
    assert json.loads((runs / "nan" / "summary.json").read_text())["failed"] == 2


def test_one_non_finite_pair_in_a_batch_does_not_stop_the_others(corpus, tmp_path, monkeypatch, capsys):
    real = Backbone.dream_loss

    def first_pair_diverges(self, latents, *args, **kwargs):
        terms = real(self, latents, *args, **kwargs)
        first = torch.arange(latents.shape[0], device=latents.device) == 0
        return {**terms, "loss": torch.where(first, torch.full_like(terms["loss"], float("nan")), terms["loss"])}

    monkeypatch.setattr(Backbone, "dream_loss", first_pair_diverges)
    runs = tmp_path / "runs"
    code = train_main(_train(corpus, runs, "one", "data=shapes", "data.num_pairs=2", "data.pairs_per_step=2"),
                      REPO_CONFIGS)
    assert code == 0, capsys.readouterr().err
    assert [r["status"] for r in _results(runs / "one")] == ["failed: non-finite", "done"]


@pytest.mark.slow
def test_disk_full_stops_the_run_cleanly_and_a_rerun_finishes_it(corpus, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    run = runs / "full"
    argv = _train(corpus, runs, "full", "data=shapes", "data.num_pairs=2", "run.save_overlays=false")
    real, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):  # mask and alpha per pair: the 3rd save is the 2nd pair's mask
        if str(fp).startswith(str(run)):
            calls.append(fp)
            if len(calls) == 3:
                raise ENOSPC
        return real(self, fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", save)
        code = train_main(argv, REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "No space left on device" in line and "/masks/" in line and "rerun the same command to resume" in line
    first = _results(run)  # every line parses: no partial line
    assert [r["status"] for r in first] == ["done"]
    assert not list(run.rglob("*.tmp"))
    kept = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
            for p in (run / first[0]["outputs"]["mask"], run / first[0]["outputs"]["alpha"])}
    assert train_main(argv, REPO_CONFIGS) == 0  # the space is back: the rerun redoes only the unfinished pairs
    assert [r["status"] for r in _results(run)] == ["done"] * 2
    assert {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest()) for p in kept} == kept


@pytest.mark.parametrize("error,text", [
    (OSError(errno.ENOSPC), "No space left on device; free disk space"),  # errno only in args, as tests raise it
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded; free disk space"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied; make that folder writable"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system; make that folder writable"),
    (OSError("strange"), "strange; check that the output folder exists"),
])
def test_write_errors_name_the_file_and_the_fix(error, text, tmp_path, monkeypatch):
    def fail(self, fp, *args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "save", fail)
    target = tmp_path / "out" / "mask.png"
    with pytest.raises(OutputError) as info:
        files.save_png(Image.new("L", (4, 4)), target)
    assert str(info.value).startswith(f"Could not write {target}: ") and text in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is gone too


def test_unwritable_output_folder_is_refused_at_start_up(corpus, tmp_path, monkeypatch, capsys):
    # Tests run as root, for whom permissions never block a write: simulate what access(2) says for a
    # read-only mount or a folder of another user.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    code = predict_main([f"image={corpus.image}", "prompt=a red circle", f"model.pretrained={corpus.model}",
                         f"output_dir={tmp_path / 'out'}", *PREDICT_FAST], REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and f"{tmp_path} is not writable" in line and "choose another output_dir" in line


def test_a_run_folder_that_cannot_be_made_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    # The start-up check trusts access(2); a folder that still cannot be made (under /proc, say) is a user
    # error with its fix, not a traceback.
    def refuse(self, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(lp.Trainer, "fit", _fit_must_not_run)
    code = train_main(_train(corpus, tmp_path / "runs", "r", "data=shapes", "data.num_pairs=1"), REPO_CONFIGS)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and "Could not write" in line and "No such file or directory" in line


@pytest.mark.parametrize("failure", ["short write", "error mid-write"])
def test_append_line_never_leaves_a_partial_line(failure, tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    files.append_line(json.dumps({"id": "first"}), path)
    real_write = os.write

    def broken(fd, data):
        written = real_write(fd, data[: len(data) // 2])
        if failure == "error mid-write":
            raise ENOSPC
        return written

    with monkeypatch.context() as m, pytest.raises(OutputError, match=r"results\.jsonl"):
        m.setattr(os, "write", broken)
        files.append_line(json.dumps({"id": "second", "text": "x" * 100}), path)
    files.append_line(json.dumps({"id": "third"}), path)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["first", "third"]
