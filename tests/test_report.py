"""The run report: runs/<name>/report.html, self-contained, its numbers those of summary.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from tests_support import REPO_CONFIGS

from peekaboo.app.cli import train_main
from peekaboo.config import TrainConfig, load_config
from peekaboo.data import build_source
from peekaboo.errors import ImageError
from peekaboo.optim.callbacks import CURVE_KEYS
from peekaboo.runs import evaluate as evaluate_lib
from peekaboo.runs import outputs, report
from peekaboo.runs.evaluate import evaluate

FAST = ["trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "optimization.mask.size=16", "run.logger=none", "data.pairs_per_step=2"]


class _Page(HTMLParser):
    """Every image source, every number tagged with the summary key it shows, and all text."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.numbers: dict[str, str] = {}
        self.text: list[str] = []
        self._key: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self._key = attrs.get("data-key")

    def handle_data(self, data):
        if self._key is not None:
            self.numbers[self._key] = data
            self._key = None
        self.text.append(data)


def _parse(run: Path) -> _Page:
    page = _Page()
    page.feed((run / "report.html").read_text())
    return page


def _check_page(run: Path) -> _Page:
    """Every image exists in the run folder (relative paths only) and every number is summary.json's."""
    page = _parse(run)
    assert page.images
    for src in page.images:
        assert "://" not in src and not src.startswith("/"), src
        assert (run / src).is_file(), src
    summary = json.loads((run / "summary.json").read_text())
    for key, shown in page.numbers.items():
        value = summary
        for part in key.split(".", 1) if key.startswith(("precision.", "per_class_iou.")) else [key]:
            value = value[part]
        if value is None:
            assert shown == "n/a", key
        elif isinstance(value, float):
            assert float(shown) == pytest.approx(value, abs=5e-4), key
        else:
            assert int(shown) == value, key
    for key in ("pairs", "done", "failed", "remaining", "miou", "overall_iou"):
        assert key in page.numbers
    return page


@pytest.fixture(scope="module")
def shapes_run(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    args = [f"model.pretrained={tiny_model}", f"run.root={root}", "run.name=s", "data=shapes", "data.num_pairs=4",
            *FAST]
    assert train_main(args, REPO_CONFIGS) == 0
    return root / "s"


def test_report_with_ground_truth(shapes_run):
    page = _check_page(shapes_run)
    summary = json.loads((shapes_run / "summary.json").read_text())
    assert summary["scored"] == 4 and all(f"precision.{k}" in page.numbers for k in summary["precision"])
    assert {"report/scores.png", "report/losses.png"} <= set(page.images)
    # Gallery worst first: the overlays appear in increasing IoU.
    results = [json.loads(line) for line in (shapes_run / "results.jsonl").read_text().splitlines()]
    by_overlay = {r["outputs"]["overlay"]: r["iou"] for r in results}
    shown = [by_overlay[src] for src in page.images if src in by_overlay]
    assert len(shown) == 4 and shown == sorted(shown)
    # Each done record carries a compact loss curve, ending at the last step.
    for r in results:
        assert r["curve"]["step"][-1] == 4 and all(len(r["curve"][k]) == len(r["curve"]["step"]) for k in CURVE_KEYS)


def test_report_without_ground_truth_lists_failures(tiny_model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (20, 16), colour).save(photos / f"img{i}.png")
    (photos / "broken.png").write_bytes(b"not a png <script>")
    args = [f"model.pretrained={tiny_model}", f"run.root={tmp_path / 'runs'}", "run.name=f", "data=folder",
            f"data.root={photos}", "data.prompts=[a red square <b>]", *FAST]
    assert train_main(args, REPO_CONFIGS) == 0
    run = tmp_path / "runs" / "f"
    page = _check_page(run)
    assert page.numbers["miou"] == "n/a" and page.numbers["failed"] == "1"
    text = " ".join(page.text)
    assert "broken.png:a red square <b>" in text and "final dream loss" in text  # escaped, shown as text
    assert "report/scores.png" in page.images and len([s for s in page.images if s.startswith("overlays/")]) == 2


def test_a_failing_report_never_loses_the_results(shapes_run, tmp_path, monkeypatch, caplog):
    run = tmp_path / "copy"
    shutil.copytree(shapes_run, run)
    (run / "report.html").unlink()
    cfg = load_config(TrainConfig, ["data=shapes", "data.num_pairs=4", "run.name=copy"], REPO_CONFIGS, "train")
    pairs = build_source(cfg.data)

    def broken(*args, **kwargs):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr(report, "write_report", broken)
    with caplog.at_level(logging.WARNING):
        summary = outputs.finalize(run, pairs, outputs.output_names(pairs))
    assert summary["done"] == 4 and json.loads((run / "summary.json").read_text())["done"] == 4
    assert "no plotting today" in caplog.text and not (run / "report.html").exists()


def test_evaluate_writes_the_report(shapes_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(shapes_run, run)
    shutil.rmtree(run / "report")
    (run / "report.html").unlink()
    evaluate(run)
    _check_page(run)


def test_evaluate_scores_the_other_pairs_when_a_ground_truth_or_a_saved_mask_is_unusable(shapes_run, tmp_path,
                                                                                         monkeypatch, caplog):
    run = tmp_path / "copy"
    shutil.copytree(shapes_run, run)
    real = evaluate_lib.build_source

    def one_broken(cfg):
        pairs = real(cfg)

        def unreadable():
            raise ImageError("masks/0.png is not an image; replace it.")

        return [dataclasses.replace(pairs[0], load_target=unreadable), *pairs[1:]]

    monkeypatch.setattr(evaluate_lib, "build_source", one_broken)
    (run / "masks" / sorted(p.name for p in (run / "masks").iterdir())[-1]).unlink()  # another pair's saved mask
    with caplog.at_level(logging.WARNING):
        summary = evaluate(run)
    assert summary["done"] == 4 and summary["scored"] == 2  # the two others are scored, the two broken ones not
    assert "ground truth unusable" in caplog.text and "saved mask is unusable" in caplog.text


def test_gallery_size_limits_the_gallery(shapes_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(shapes_run, run)
    report.write_report(run, gallery_size=2)
    page = _parse(run)
    assert len([s for s in page.images if s.startswith("overlays/")]) == 2
    assert "the 2 worst of 4" in " ".join(page.text)
