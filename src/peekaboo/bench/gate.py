"""The accuracy gate on the objects scenes: fixed ``eval`` pairs that the bundled model must keep segmenting.

The gate pairs are both objects of each of the first :data:`GATE_SCENES` two-object scenes of the objects ``eval``
split, each object prompted in turn. The gate has three parts, each with a floor:

- ``default``: Peekaboo with the objects preset (``configs/model/objects.yaml``) reaches :data:`DEFAULT_MIN_MIOU`;
- ``alpha_start``: the method with no head start (``mask.init=constant``, alpha 0.5 everywhere) reaches
  :data:`ALPHA_START_MIN_MIOU`. From alpha 0.5 only the dream loss can find the object, so this part fails when the
  loss is broken even if a start did the work. When the preset itself starts at alpha 0.5, one run serves both;
- ``prompts``: prompt sensitivity. At least :data:`PROMPTS_MIN_ON_TARGET` of the default's masks lie on the object
  their prompt names (:func:`on_target`), so the mask follows the prompt, not the scene's most salient object.

The floors sit below what ``benchmarks/gate.py`` measured for these pairs (docs/GATE.md) by a margin. A pair's
mask does not depend on the batch size or the thread count, so the margin absorbs a changed library or CPU, not
noise. :data:`FAULTS` are the faults the gate must catch; ``benchmarks/gate.py`` runs the gate under each of them
and writes whether it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peekaboo.bench.common import fmt, machine_info, markdown_table, run_cli, write_json
from peekaboo.bench.methods import method_config, resolve_config_dir, settings_key
from peekaboo.bench.run import run_peekaboo
from peekaboo.bench.scoring import BenchPair, load_pairs, summarize_method
from peekaboo.diffusion import backbone as backbone_lib
from peekaboo.diffusion import estimators
from peekaboo.diffusion.loading import shared_backbone
from peekaboo.utils import files

SCENES = "objects"
SPLIT = "eval"
#: Two-object scenes in the gate: each gives two pairs, one per object.
GATE_SCENES = 4
# Enough leading eval pairs to hold GATE_SCENES two-object scenes (the split cycles 2, 3, 1, 2, 4 objects).
_SEARCH_PAIRS = 40

#: The floors (see the module docstring).
DEFAULT_MIN_MIOU = 0.50
ALPHA_START_MIN_MIOU = 0.50
PROMPTS_MIN_ON_TARGET = 6
#: A mask counts as on its prompt's object when it takes more of that object than of the other one and reaches
#: this IoU with it.
ON_TARGET_MIN_IOU = 0.3

ALPHA_START = ("optimization.mask.init=constant",)


def gate_pairs(scenes: int = GATE_SCENES) -> list[BenchPair]:
    """Both pairs of each of the first ``scenes`` two-object scenes of the objects ``eval`` split, in split order."""
    pairs = [p for p in load_pairs(SPLIT, _SEARCH_PAIRS, SCENES) if len(p.others) == 1]
    if len(pairs) < 2 * scenes:
        raise ValueError(f"the first {_SEARCH_PAIRS} {SPLIT} pairs hold fewer than {scenes} two-object scenes")
    return pairs[: 2 * scenes]


def on_target(record: dict[str, Any]) -> bool:
    """Whether a pair's mask lies on the object its prompt names (see :data:`ON_TARGET_MIN_IOU`)."""
    return not record["wrong_object"] and (record["iou"] or 0.0) >= ON_TARGET_MIN_IOU


@dataclass(frozen=True)
class Part:
    """One part of the gate: its figure, its floor and whether it holds."""

    name: str
    about: str
    value: float
    floor: float

    @property
    def passed(self) -> bool:
        return self.value >= self.floor


def run_gate(extra: Sequence[str] = (), config_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the gate's pairs with the objects preset (plus ``extra`` overrides) and from alpha 0.5.

    Returns:
        ``{"parts": [Part, ...], "passed": bool, "records": {"default": [...], "alpha_start": [...]},
        "seconds": {...}, "shared": bool}``, one record per gate pair (ids, IoU, wrong object, ...); ``shared``:
        the preset starts at alpha 0.5, so one run gave both parts.
    """
    cdir = resolve_config_dir(config_dir)
    pairs = gate_pairs()
    configs = {"default": method_config((), extra, cdir, scenes=SCENES),
               "alpha_start": method_config(ALPHA_START, extra, cdir, scenes=SCENES)}
    records: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    shared = settings_key(configs["alpha_start"]) == settings_key(configs["default"])
    for name, cfg in configs.items():
        if name == "alpha_start" and shared:
            records[name], seconds[name] = records["default"], 0.0  # the preset starts at alpha 0.5: one run
            continue
        t0 = time.perf_counter()
        records[name] = run_peekaboo(cfg, pairs, shared_backbone(cfg.model), batch_size=len(pairs))[
            cfg.trainer.max_steps]
        seconds[name] = time.perf_counter() - t0
    parts = [
        Part("default", "mIoU of the objects preset", summarize_method(records["default"])["miou"] or 0.0,
             DEFAULT_MIN_MIOU),
        Part("alpha_start", "mIoU from alpha 0.5", summarize_method(records["alpha_start"])["miou"] or 0.0,
             ALPHA_START_MIN_MIOU),
        Part("prompts", f"prompts whose mask lies on their object (of {len(pairs)})",
             float(sum(on_target(r) for r in records["default"])), PROMPTS_MIN_ON_TARGET),
    ]
    return {"parts": parts, "passed": all(p.passed for p in parts), "records": records, "seconds": seconds,
            "shared": shared}


# -- the faults the gate must catch ---------------------------------------------------------------------------
@contextlib.contextmanager
def _sign_flipped() -> Iterator[None]:
    """The dream loss's gradient on the latents negated: the mask is pushed away from what the prompt explains."""
    original = estimators.gradient

    def flipped(*args: Any, **kwargs: Any):
        return -original(*args, **kwargs)

    estimators.gradient = flipped
    try:
        yield
    finally:
        estimators.gradient = original


@contextlib.contextmanager
def _cond_uncond_swapped() -> Iterator[None]:
    """The UNet's conditional and unconditional noise predictions exchanged, so guidance points away from the
    prompt."""
    original = backbone_lib.Backbone.predict_noise

    def swapped(self, *args: Any, **kwargs: Any):
        eps_u, eps_c = original(self, *args, **kwargs)
        return eps_c, eps_u

    backbone_lib.Backbone.predict_noise = swapped
    try:
        yield
    finally:
        backbone_lib.Backbone.predict_noise = original


@dataclass(frozen=True)
class Fault:
    """A deliberate break of the method: config overrides and/or a patch active while the gate runs."""

    name: str
    about: str
    overrides: tuple[str, ...] = ()
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


FAULTS = (
    Fault("loss_off", "the dream loss off (`optimization.loss.lambda_dream=0`): only gravity acts",
          ("optimization.loss.lambda_dream=0",)),
    Fault("sign_flipped", "the dream loss's gradient with its sign flipped", patch=_sign_flipped),
    Fault("cond_uncond_swapped", "the conditional and unconditional noise predictions swapped",
          patch=_cond_uncond_swapped),
)


def run_fault(fault: Fault, config_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`run_gate` with ``fault`` in force."""
    with fault.patch():
        return run_gate(fault.overrides, config_dir)


# -- the report -----------------------------------------------------------------------------------------------
def _summary(name: str, about: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "about": about, "passed": result["passed"], "parts": [asdict(p) for p in result["parts"]],
            "seconds": result["seconds"], "shared": result["shared"], "records": result["records"]}


def run(faults: Sequence[str], config_dir: str | Path | None = None) -> dict[str, Any]:
    """The gate as the test runs it, then under each fault named in ``faults``."""
    runs = [_summary("intact", "the method as shipped", run_gate((), config_dir))]
    for fault in FAULTS:
        if fault.name in faults:
            runs.append(_summary(fault.name, fault.about, run_fault(fault, config_dir)))
    pairs = gate_pairs()
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine_info(),
            "pairs": [{"id": p.id, "prompt": p.prompt} for p in pairs], "runs": runs}


def render(result: dict[str, Any], command: str) -> str:
    """The markdown report: each run's parts against their floors, then each pair of the intact run."""
    names = [p["name"] for p in result["runs"][0]["parts"]]
    floors = {p["name"]: p["floor"] for p in result["runs"][0]["parts"]}
    rows = []
    for r in result["runs"]:
        values = {p["name"]: p["value"] for p in r["parts"]}
        rows.append([r["about"], *(fmt(values[n], 0 if n == "prompts" else 3) for n in names),
                     "passes" if r["passed"] else "**fails**"])
    header = ["run", *(f"{n} (floor {fmt(floors[n], 0 if n == 'prompts' else 2)})" for n in names), "gate"]
    intact = result["runs"][0]["records"]
    pair_rows = [[p["id"], p["prompt"], fmt(d["iou"]), "yes" if d["wrong_object"] else "no",
                  fmt(a["iou"]), "yes" if on_target(d) else "no"]
                 for p, d, a in zip(result["pairs"], intact["default"], intact["alpha_start"], strict=True)]
    return "\n".join([
        "# The objects accuracy gate", "",
        f"Generated by `{command}` on {result['date']} (do not edit by hand; rerun it).", "",
        f"The CI accuracy gate (`peekaboo.bench.gate`, run by the suite's slow test) optimizes both objects of the "
        f"first {GATE_SCENES} two-object scenes of the objects `{SPLIT}` split, each prompted in turn, with the "
        "bundled model. Its parts: the default's mIoU, the mIoU from alpha 0.5 (the method with no head start) and "
        "the prompts whose mask lies on the object they name (more of it than of the other object, and IoU >= "
        f"{ON_TARGET_MIN_IOU}). "
        + ("The objects preset starts at alpha 0.5 itself, so one run gives the first two parts. "
           if result["runs"][0]["shared"] else "")
        + "Below, the gate as shipped and under each fault it must catch; a fault the gate catches fails at least "
        "one part.", "",
        markdown_table(header, rows, right_from=1), "",
        "## The intact run, by pair", "",
        markdown_table(["pair", "prompt", "default IoU", "other object", "alpha-0.5 IoU", "on its object"],
                       pair_rows, right_from=2), "",
        f"Machine: {result['machine']['processor']}, torch {result['machine']['torch']}.", ""])


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of :func:`run`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", nargs="*", choices=[f.name for f in FAULTS], default=[f.name for f in FAULTS],
                   help="the faults to run the gate under (default all)")
    p.add_argument("--config-dir", default=None, help="a folder of presets (default: the packaged ones)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument("--docs", type=Path, default=None, help="markdown report")
    return p


def verdict(result: dict[str, Any]) -> bool:
    """Whether the gate does its job: the intact method passes it and it fails under every fault run."""
    intact, *faults = result["runs"]
    return intact["passed"] and not any(f["passed"] for f in faults)


def main(argv: Sequence[str] | None = None, prog: str = "python -m peekaboo.bench.gate") -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print the report. Exit status 0 when the gate does its job
    (:func:`verdict`), 1 when not; a user error ends in one sentence and exit status 2."""

    def body(args: argparse.Namespace, command: str) -> int:
        result = run(args.faults, args.config_dir)
        text = render(result, command)
        if args.out is not None:
            write_json(result, args.out)
        if args.docs is not None:
            files.write_text(text, args.docs)
        print(text)
        return 0 if verdict(result) else 1
    return run_cli(parser, body, argv, prog,
                   rerun_hint="the gate writes its figures only at its end; rerun the same command")


if __name__ == "__main__":
    raise SystemExit(main())
