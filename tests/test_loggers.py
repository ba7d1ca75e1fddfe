"""run.logger: Lightning's own loggers, one run per pair; optional packages checked at start-up."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from tests_support import REPO_CONFIGS

from peekaboo.app.cli import train_main
from peekaboo.config import TrainConfig, load_config, logger_kind
from peekaboo.errors import ConfigError

FAST = ["trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "optimization.mask.size=16", "data=shapes", "data.num_pairs=2", "trainer.log_every_n_steps=2"]


def _cfg(*args: str) -> TrainConfig:
    return load_config(TrainConfig, ["run.name=x", *args], REPO_CONFIGS, "train")


@pytest.mark.parametrize("pairs_per_step", [1, 2])
def test_csv_logger_writes_metrics_csv_per_pair(tiny_model, tmp_path, pairs_per_step):
    args = [f"model.pretrained={tiny_model}", f"run.root={tmp_path}", "run.name=c", "run.logger=csv", *FAST,
            f"data.pairs_per_step={pairs_per_step}"]
    assert train_main(args, REPO_CONFIGS) == 0
    run = tmp_path / "c"
    assert not (run / "tb").exists()
    for line in (run / "results.jsonl").read_text().splitlines():
        rows = list(csv.DictReader((run / "csv" / json.loads(line)["name"] / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == [1, 3]  # every log_every_n_steps steps, counted from 0
        assert all(float(r["loss/total"]) > 0 for r in rows) and "mask/area" in rows[0]
    job = list(csv.DictReader((run / "csv" / "worker0" / "metrics.csv").open()))
    assert [int(float(r["job/pairs_done"])) for r in job] == [1, 2]


def test_missing_optional_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import wandb raises ImportError
    needs = r"run\.logger=wandb needs the wandb package.*pip install 'peekaboo\[wandb\]'"
    with pytest.raises(ConfigError, match=needs):
        _cfg("run.logger=wandb")
    assert train_main([f"run.root={tmp_path}", "run.name=w", "run.logger=wandb"], REPO_CONFIGS) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run.logger=wandb") and "\n" not in err
    assert not (tmp_path / "w").exists()  # refused before any work


def test_run_logger_is_the_one_logging_switch():
    assert logger_kind(_cfg().run) == "tensorboard"
    assert logger_kind(_cfg("run.logger=csv").run) == "csv"
    assert logger_kind(_cfg("run.logger=none").run) is None
    with pytest.raises(ConfigError, match=r"'run\.logger' = 'neptune' is out of range"):
        _cfg("run.logger=neptune")


@pytest.mark.parametrize("value", ["false", "true"])
def test_the_retired_tensorboard_switch_names_its_replacement(value, tmp_path, capsys):
    retired = r"Config key 'run\.tensorboard' was retired; use run\.logger=none .*\(or run\.logger=tensorboard\)"
    with pytest.raises(ConfigError, match=retired):
        _cfg(f"run.tensorboard={value}")
    assert train_main([f"run.root={tmp_path}", "run.name=t", f"run.tensorboard={value}"], REPO_CONFIGS) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Config key 'run.tensorboard' was retired") and "\n" not in err
    assert not (tmp_path / "t").exists()  # refused before any work
