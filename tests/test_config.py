"""Typed configs: YAML groups, overrides, and clear errors for bad keys and values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tests_support import REPO_CONFIGS

from peekaboo.config import PredictConfig, help_text, load_config, to_yaml
from peekaboo.errors import ConfigError

BASE = ["image=x.png", "prompt=a red circle"]


def test_defaults_come_from_the_dataclasses_and_the_model_group():
    cfg = load_config(PredictConfig, BASE, REPO_CONFIGS, "predict")
    assert cfg.model.pretrained == "bundled"  # configs/model/objects.yaml via predict.yaml's defaults
    assert cfg.optimization.mask.kind == "raster_bilateral" and cfg.optimization.mask.init == "constant"
    shapes = load_config(PredictConfig, [*BASE, "model=shapes"], REPO_CONFIGS, "predict")
    assert shapes.model.pretrained == "bundled-shapes" and shapes.optimization.mask.init == "region"
    assert cfg.optimization.guidance.t_min == 0.02  # dataclass default, not repeated in YAML
    paper = load_config(PredictConfig, [*BASE, "model=sd15"], REPO_CONFIGS, "predict")
    assert paper.optimization.mask.kind == "fourier_bilateral" and paper.optimization.mask.size == 256
    assert paper.optimization.guidance.guidance_scale == 100 and paper.trainer.max_steps == 300


def test_a_model_preset_carries_settings_for_dataset_runs_only(tmp_path):
    from peekaboo.config import TrainConfig

    run = ["run.name=x"]
    assert load_config(TrainConfig, run, REPO_CONFIGS, "train").data.pairs_per_step == 16  # the bundled model's
    assert load_config(TrainConfig, [*run, "model=sd15"], REPO_CONFIGS, "train").data.pairs_per_step == 3
    assert load_config(TrainConfig, [*run, "data=voc", "data.root=v"], REPO_CONFIGS, "train").data.pairs_per_step == 16
    # predict.py has no data section: it reads the same preset without it, but is not lenient on the command
    # line, and a typo in a preset still fails.
    load_config(PredictConfig, BASE, REPO_CONFIGS, "predict")
    with pytest.raises(ConfigError, match="Unknown config key 'data'"):
        load_config(PredictConfig, [*BASE, "data.pairs_per_step=2"], REPO_CONFIGS, "predict")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("dataa:\n  pairs_per_step: 2\n")
    with pytest.raises(ConfigError, match="Unknown config key 'dataa'"):
        load_config(TrainConfig, [*run, "model=typo"], tmp_path, "train")


def test_repeated_list_key_appends_and_single_value_is_a_list():
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=a red circle", "prompt=a blue square"])
    assert list(cfg.prompt) == ["a red circle", "a blue square"]
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=[a, b]"])
    assert list(cfg.prompt) == ["a", "b"]


def test_override_types_are_converted():
    cfg = load_config(PredictConfig, [*BASE, "optimization.loss.gravity=0.1", "trainer.max_steps=7"])
    assert cfg.optimization.loss.gravity == 0.1 and cfg.trainer.max_steps == 7


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimization.mask.kindd=raster", "Did you mean 'optimization.mask.kind'"),
        ("bogus=1", "Unknown config key 'bogus'"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("optimization.loss.gravity=-1", "optimization.loss.gravity"),
        ("optimization.threshold=1.5", "0 <= threshold <= 1"),
        ("optimization.guidance.t_max=1.5", "t_min/t_max"),
        ("optimization.mask.kind=pixels", "raster | fourier"),
        ("trainer.precision=bf16-true", "mask must stay float32"),
        ("model.attention=flash", "sdpa | classic"),
        ("model=nonexistent", "choose one of"),
        ("prompt=   ", "prompt[0] is empty"),
        ("noequals", "not a key=value"),
        ("optimization.optim.schedule=linear", "optimization.optim.schedule"),
        ("optimization.optim.warmup_steps=-1", "optimization.optim.warmup_steps"),
        ("optimization.optim.final_lr_fraction=1.5", "optimization.optim.final_lr_fraction"),
        ("optimization.optim.step_every=0", "optimization.optim.step_every"),
        ("optimization.optim.step_gamma=0", "optimization.optim.step_gamma"),
        ("optimization.guidance.t_schedule=random", "optimization.guidance.t_schedule"),
        ("optimization.guidance.t_anneal_jitter=2", "optimization.guidance.t_anneal_jitter"),
        ("optimization.guidance.t_strata=0", "optimization.guidance.t_strata"),
        ("optimization.guidance.samples_per_step=0", "optimization.guidance.samples_per_step"),
        ("optimization.early_stop.loss_tolerance=-0.1", "optimization.early_stop.loss_tolerance"),
        ("optimization.early_stop.loss_ema=1", "optimization.early_stop.loss_ema"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("|", r"\|")):
        argv = [*BASE, override] if not override.startswith("prompt") else ["image=x.png", override]
        load_config(PredictConfig, argv, REPO_CONFIGS, "predict")


def test_missing_required_values():
    with pytest.raises(ConfigError, match="exactly one of image=PATH"):
        load_config(PredictConfig, [])
    with pytest.raises(ConfigError, match="No prompt given"):
        load_config(PredictConfig, ["image=x.png"])


def test_presets_ship_in_the_package_and_apply_from_any_folder(tmp_path, monkeypatch):
    import peekaboo
    from peekaboo.config import preset_dir

    monkeypatch.chdir(tmp_path)  # no configs/ here
    monkeypatch.delenv("PEEKABOO_CONFIG_DIR", raising=False)
    assert preset_dir() == Path(peekaboo.__file__).parent / "configs"
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=a"], preset_dir(), "predict")
    assert cfg.optimization.mask.kind == "raster_bilateral"  # the bundled model's preset, not the paper's defaults
    sd15 = load_config(PredictConfig, ["image=x.png", "prompt=a", "model=sd15"], preset_dir(), "predict")
    assert sd15.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the maintained copy
    # The installed command, run from this folder, reads the packaged presets as predict.py does.
    proc = subprocess.run([str(Path(sys.executable).parent / "peekaboo-predict"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and str(preset_dir() / "predict.yaml") in proc.stdout
    monkeypatch.setenv("PEEKABOO_CONFIG_DIR", str(tmp_path))
    assert preset_dir() == tmp_path


def test_saved_config_keeps_a_literal_interpolation_marker():
    """A prompt holding ``${`` reads back from config.yaml as the same text, not as an interpolation (a
    dataset rerun compares the saved config with the new one; a worker process reads it)."""
    cfg = OmegaConf.structured(PredictConfig)
    cfg.prompt = ["a \\${colour} circle"]  # escaped, as the command line's text keys are
    back = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.create(to_yaml(cfg)))
    assert OmegaConf.to_container(back, resolve=True)["prompt"] == ["a ${colour} circle"]


def test_help_lists_the_step_switches_with_their_defaults():
    text = help_text(PredictConfig)
    for line in ("optimization.optim.schedule: str = 'constant'", "optimization.optim.warmup_steps: int = 0",
                 "optimization.guidance.t_schedule: str = 'uniform'", "optimization.guidance.samples_per_step: int = 1",
                 "optimization.early_stop.loss_tolerance: float | None = None"):
        assert line in text


def test_help_shows_the_values_a_command_line_runs_with(capsys):
    """``--help`` merges the presets, the selected groups and the overrides it is given, so a user sees what
    ``model=sd15`` (say) sets, with the schema's default beside each value a preset changes."""
    from peekaboo.app.cli import predict_main, train_main

    assert predict_main(["model=sd15", "optimization.loss.gravity=0.1", "--help"], REPO_CONFIGS) == 0
    out = capsys.readouterr().out
    assert "model.pretrained: str = 'stable-diffusion-v1-5/stable-diffusion-v1-5'  (schema default: 'bundled')" in out
    assert "optimization.loss.gravity: float = 0.1  (schema default: 0.05)" in out
    assert "optimization.mask.kind: str = 'fourier_bilateral'\n" in out  # the paper's: the schema's own default
    # Without the group, the default preset's values; a dataset run's required name is shown, not demanded.
    assert train_main(["--help"], REPO_CONFIGS) == 0
    out = capsys.readouterr().out
    assert "optimization.mask.kind: str = 'raster_bilateral'  (schema default: 'fourier_bilateral')" in out
    assert "run.name: str = ???" in out
    # Help is not a run: a check of the machine (here, a writable output folder) does not stop it.
    assert train_main(["run.root=/proc/no-such-folder", "--help"], REPO_CONFIGS) == 0
    assert "run.root: str = '/proc/no-such-folder'  (schema default: 'runs')" in capsys.readouterr().out
    # A mistyped key is the usual one-line error, not a help page.
    assert predict_main(["optimization.loss.gravty=0.1", "--help"], REPO_CONFIGS) == 2
    assert "gravity" in capsys.readouterr().err


def test_help_piped_into_a_closed_pipe_exits_cleanly():
    """``predict.py --help | head`` must not end in a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write fails, as after `head` exits
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "predict.py"), "--help"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_step_switches_are_set_from_the_command_line():
    cfg = load_config(PredictConfig, [*BASE, "optimization.optim.schedule=cosine",
                                      "optimization.guidance.t_schedule=annealed",
                                      "optimization.guidance.samples_per_step=4",
                                      "optimization.early_stop.loss_tolerance=0.01"])
    assert cfg.optimization.optim.schedule == "cosine" and cfg.optimization.guidance.t_schedule == "annealed"
    assert cfg.optimization.guidance.samples_per_step == 4 and cfg.optimization.early_stop.loss_tolerance == 0.01


def test_a_retired_key_names_its_replacement_wherever_it_is_set(tmp_path):
    from peekaboo.config import TrainConfig, apply_overrides, drop_retired_keys

    retired = r"^Config key 'run\.tensorboard' was retired; use run\.logger=none"
    run = ["run.name=x"]
    with pytest.raises(ConfigError, match=retired):
        load_config(TrainConfig, [*run, "run.tensorboard=[unparsable"], REPO_CONFIGS, "train")
    with pytest.raises(ConfigError, match=retired):
        apply_overrides(load_config(TrainConfig, run, REPO_CONFIGS, "train"), {"run": {"tensorboard": False}})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.yaml").write_text("run:\n  tensorboard: false\n")
    with pytest.raises(ConfigError, match=retired):
        load_config(TrainConfig, [*run, "model=old"], tmp_path, "train")
    with pytest.raises(ConfigError, match=r"^Config key 'data\.dataset' was retired; the RefCOCO files"):
        load_config(TrainConfig, [*run, "data=refcoco", "data.root=x", "data.dataset=refcoco"], REPO_CONFIGS, "train")
    # predict.py never had a run section: there it is an unknown key like any other.
    with pytest.raises(ConfigError, match="Unknown config key 'run'"):
        load_config(PredictConfig, [*BASE, "run.tensorboard=false"], REPO_CONFIGS, "predict")
    # A run folder's config.yaml saved before the key was retired reads back into today's schema.
    saved = OmegaConf.create({"run": {"name": "x", "logger": "csv", "tensorboard": True}})
    back = OmegaConf.merge(OmegaConf.structured(TrainConfig), drop_retired_keys(saved))
    assert back.run.logger == "csv" and "tensorboard" not in back.run


def test_the_package_reexports_its_public_names():
    import peekaboo.config as config

    assert len(config.__all__) == len(set(config.__all__))
    assert all(hasattr(config, name) for name in config.__all__)
    assert not [name for name in vars(config) if not name.startswith("_") and name not in config.__all__
                and name not in ("schema", "overrides", "validation", "help")]
