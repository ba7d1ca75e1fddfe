"""What every benchmark of :mod:`peekaboo.bench` shares: timing, the machine the figures were taken on, and
markdown tables, so that the shapes benchmark and the throughput benchmark compute each of them one way."""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from peekaboo.errors import RERUN_HINT, exit_status
from peekaboo.utils import files
from peekaboo.utils.console import setup_logging

log = logging.getLogger("peekaboo.bench")

MB = 2**20
SECONDS_PER_HOUR = 3600.0


# -- the machine ----------------------------------------------------------------------------------------------
def _cpuinfo(key: str) -> str | None:
    """The first ``key`` field of ``/proc/cpuinfo`` (None where there is none, e.g. off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, for a benchmark's provenance (``platform.processor()`` is often empty on Linux)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the figures were measured (times depend on it): platform, CPU, cores, torch threads, versions, GPU."""
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- markdown -------------------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right_from: int | None = None) -> str:
    """A markdown table; the columns from index ``right_from`` on are right-aligned (figures), none if None."""
    aligns = ["---:" if right_from is not None and k >= right_from else "---" for k in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 3, missing: str = "n/a") -> str:
    """``x`` to ``digits`` decimals; ``missing`` for None or NaN (a figure not measured)."""
    return missing if x is None or x != x else f"{x:.{digits}f}"  # x != x: NaN


def replace_marked(text: str, block: str, markers: tuple[str, str]) -> str | None:
    """``text`` with what lies between ``markers`` (start, end) replaced by ``block``, the markers kept.

    Returns:
        None when a marker is missing (or the end comes before the start).
    """
    start_marker, end_marker = markers
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]


def update_marked(path: Path, block: str, markers: tuple[str, str]) -> bool:
    """Replace the text between ``markers`` in the file ``path`` with ``block`` (:func:`replace_marked`).

    Returns:
        False (with a warning, and nothing written) when the file or a marker is missing.
    """
    if not path.is_file():
        log.warning("%s does not exist; the block is not put there.", path)
        return False
    new = replace_marked(path.read_text(), block, markers)
    if new is None:
        log.warning("%s lacks the markers %s ... %s; the block is not put there.", path, *markers)
        return False
    files.write_text(new, path)
    return True


def refuse_part_run(out: Path, whole: bool, keeps: bool, error: Callable[[str], Any], keep_flag: str | None) -> None:
    """Refuse a run of part of a report (some rows, settings or faults) whose results would replace the saved ones
    at the repository's ``out`` and lose the rest: it must keep them (``keeps``: ``keep_flag``, e.g. ``--resume``)
    or write its own ``--out``.

    Args:
        whole: the run computes everything the saved results hold.
        error: reports a usage error and exits (``ArgumentParser.error``).
        keep_flag: the option that keeps the saved results, or None where the script has none.
    """
    if whole or keeps or not out.is_file():
        return
    keep = f"pass {keep_flag} to keep the rest, or " if keep_flag else "pass "
    error(f"{out} holds saved results and this run computes only part of them; {keep}--out FILE for a side "
          "experiment.")


#: ``--out -``: print the report only.
PRINT = "-"


def destination(out: Path | None, whole: bool, default: Path, protected: Sequence[Path], whole_means: str,
                error: Callable[[str], Any]) -> Path | None:
    """Where a benchmark script's report goes; the rule every script under ``benchmarks/`` follows.

    Only the report's own run (``whole``) writes the repository's file ``default``; any other run writes its
    ``--out`` file, or nothing (printed only). A repository document is refused before anything is measured.

    Args:
        out: the ``--out`` option (None: not given; :data:`PRINT`: print only).
        protected: files and folders no side run may write (docs/, the README).
        whole_means: what ``whole`` asks of a run, for the refusal ("every section without --max-steps").
        error: reports a usage error and exits (``ArgumentParser.error``).

    Returns:
        The file to write, or None to print only.
    """
    if out is None:
        return default if whole else None
    if str(out) == PRINT:
        return None
    resolved = out.resolve()
    if resolved == default.resolve() and whole:
        return resolved
    if any(resolved == q.resolve() or resolved.is_relative_to(q.resolve()) for q in protected):
        what = whole_means if resolved == default.resolve() else "no run"
        error(f"--out {out}: {what} may write there; pass --out FILE outside docs/ (or - to print only).")
    return resolved


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` to ``path`` as indented JSON (the caller chose the path), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(json.dumps(data, indent=1, default=str), path)


def ms(seconds: float) -> str:
    """Seconds as milliseconds to one decimal."""
    return fmt(seconds * 1000, 1)


# -- timing ---------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timestamp marks finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the compiler's worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Timing:
    """One measured run: ``batch`` pairs optimized together for ``len(steps)`` steps."""

    label: str
    batch: int
    steps: list[float]  # wall seconds of every step, in order (the first includes lazy setup and compilation)
    warmup: int
    fixed_s: float  # the run's wall time outside its steps
    peak_mb: float
    note: str = ""
    #: On a GPU, the caching allocator's peak (``max_memory_reserved``): what the card must hold, slack included.
    reserved_mb: float = float("nan")

    @property
    def step_s(self) -> float:
        """Median seconds per step over the timed (post-warm-up) steps."""
        return statistics.median(self.steps[self.warmup :])

    @property
    def first_step_s(self) -> float:
        """Seconds of the first step (lazy setup and compilation included)."""
        return self.steps[0]

    def pairs_per_hour(self, max_steps: int) -> float:
        """Pairs finished per hour when every batch runs ``max_steps`` steps and pays the fixed cost once."""
        return self.batch * SECONDS_PER_HOUR / (max_steps * self.step_s + self.fixed_s)


class StepClock(Callback):
    """Timestamps the start of training and the end of every step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0
        self.ends: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds of every step, in order."""
        stamps = [self.start, *self.ends]
        return [b - a for a, b in itertools.pairwise(stamps)]


class PeakMemory:
    """Peak memory of the block: the RSS high-water mark on CPU (reset through ``/proc/self/clear_refs``,
    so it covers this block only), ``max_memory_allocated`` on a GPU. ``peak_mb`` is set on exit, and on a GPU
    ``reserved_mb`` too (``max_memory_reserved``: the allocator's cached blocks, which a card must also hold)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")
        self.reserved_mb = float("nan")
        self.whole_process = False  # True when the RSS mark could not be reset (then it is the process's peak)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
            except OSError:
                self.whole_process = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / MB
        elif not self.whole_process and (hwm := status_kb("VmHWM")) is not None:
            self.peak_mb = hwm / 1024
        else:
            self.whole_process = True
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def package_version(name: str) -> str:
    """The installed version of package ``name``, or ``"?"``."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def status_kb(key: str) -> int | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in kB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# -- command lines --------------------------------------------------------------------------------------------
def run_cli(make_parser: Callable[[str], Any], body: Callable[[Any, str], int], argv: Sequence[str] | None,
            prog: str, rerun_hint: str = RERUN_HINT) -> int:
    """A benchmark's ``main``: parse ``argv`` (default ``sys.argv[1:]``) with ``make_parser(prog)``, then
    ``body(args, command)`` (``command``: the command line, for the report); a user error ends in one sentence and
    exit status 2, a preemption signal in ``rerun_hint`` and status 143 (:func:`peekaboo.errors.exit_status`)."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser(prog).parse_args(argv)
    return exit_status(lambda: body(args, shlex.join([*shlex.split(prog), *argv])), rerun_hint=rerun_hint)
