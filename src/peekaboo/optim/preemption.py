"""Stop a fit cleanly when a cluster takes the machine back: note the signal, save the checkpoint, stop.

A preemption signal (SLURM: SIGTERM, or SIGUSR1 with ``--signal``) only sets :data:`PREEMPTION`; the work in
flight finishes, and :class:`SaveOnPreemption` saves the fit's checkpoint at the next safe point and raises
:class:`Preempted`. Rerunning resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from peekaboo.errors import Stopped

# Signals a cluster sends before it takes the machine back (SLURM: SIGTERM, or SIGUSR1 with --signal).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Stopped):
    """A fit stopped by a preemption signal, after its checkpoint was saved; rerunning resumes it."""

    @classmethod
    def at(cls, step: int) -> Preempted:
        """The stop at ``step`` by the signal received (SIGTERM when Lightning stopped the fit on its own)."""
        return cls(f"signal {PREEMPTION.signal or signal.SIGTERM} at step {step}")


@dataclass
class _PreemptionFlag:
    signal: int | None = None  # the preemption signal received, if any


#: Set by the handler :func:`preemption_signals` installs; read between steps and between batches.
PREEMPTION = _PreemptionFlag()


def _note_signal(signum: int, frame: Any) -> None:
    # Only a flag: the signal may land anywhere (a callback, a logger flush, a checkpoint save), so the work
    # in flight finishes and the next safe point saves and stops.
    PREEMPTION.signal = signum


@contextlib.contextmanager
def preemption_signals() -> Iterator[None]:
    """Note SIGTERM / SIGUSR1 in :data:`PREEMPTION` instead of dying, for the duration of the block (the flag
    starts clear). Lightning's own SIGTERM handler, installed during each fit, calls this one too."""
    PREEMPTION.signal = None
    old = {s: signal.signal(s, _note_signal) for s in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class SaveOnPreemption(Checkpoint):
    """After a preemption signal, save the fit's checkpoint to ``path`` and stop it with :class:`Preempted`.

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so that Lightning runs it after every other callback:
    the step's early-stop, early-choice and loss-curve updates are in the checkpoint it saves, and the resumed
    pair goes on as if never stopped.

    Checked after every step; when Lightning itself ends the fit on SIGTERM (its ``SIGTERMException``, at the
    epoch's end) the checkpoint is saved from ``on_exception`` instead, so no path through a fit loses it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._saved_at: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if PREEMPTION.signal is not None:
            self._save(trainer)
            raise Preempted.at(trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if PREEMPTION.signal is not None and not isinstance(exception, Preempted):
            self._save(trainer)
