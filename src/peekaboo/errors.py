"""User-facing errors.

Anything a user can cause (bad path, bad image, bad config, missing model component, a full disk) raises
:class:`PeekabooError` with one sentence naming the input and the fix; the command-line entry points print
it without a traceback and exit non-zero. Everything else is a bug and keeps its traceback.
docs/TROUBLESHOOTING.md lists the messages.

:func:`exit_status` is the one place that turns these errors into what a command prints and returns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: Exit status of a command stopped by a user error (bad path, image, config, model).
EXIT_USER_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it); finished outputs are kept.
EXIT_INTERRUPTED = 130
#: Exit status of a worker stopped by SIGTERM/SIGUSR1 after checkpointing (128 + SIGTERM, as shells report it).
EXIT_PREEMPTED = 143


class PeekabooError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class Stopped(BaseException):
    """A command stopped by a signal (SIGTERM, SIGUSR1) after saving what it had finished; the message says where
    it stopped (e.g. ``"signal 15 at step 68"``). Like ``KeyboardInterrupt`` it is a request to stop, not an error:
    handlers that keep a benchmark going past a failing part (``except Exception``) must not swallow it."""


class ConfigError(PeekabooError):
    """A bad configuration key or value."""


class ImageError(PeekabooError):
    """An image file that cannot be used."""


class ModelError(PeekabooError):
    """A model path or checkpoint that cannot be loaded as a Stable-Diffusion-style pipeline."""


class NonFiniteError(PeekabooError):
    """The optimization of one pair produced a non-finite loss or mask."""


class OutputError(PeekabooError):
    """An output file could not be written (full disk, read-only or unwritable folder).

    Writes are atomic, so files written before the failure are intact; the message names the file.
    """


#: What a stopped command tells its user, unless it says how it goes on itself (:func:`exit_status`).
RERUN_HINT = "what was finished is saved; rerun the same command to go on"


def exit_status(main: Callable[[], int | None], context: str = "", rerun_hint: str = RERUN_HINT) -> int:
    """Run a command's body and return its exit status.

    A :class:`PeekabooError` prints ``error: <context><message>`` on stderr (no traceback) and returns
    :data:`EXIT_USER_ERROR`; a :class:`Stopped` (a preemption signal) prints ``stopped: <context><where>;
    <rerun_hint>`` and returns :data:`EXIT_PREEMPTED`; Ctrl-C prints ``interrupted`` and returns
    :data:`EXIT_INTERRUPTED`. Any other exception is a bug and propagates with its traceback.

    Args:
        main: the command's body; its return value (None meaning 0) is the status.
        context: prefix naming where the error happened, e.g. ``"worker 1: "``.
        rerun_hint: how a stopped command goes on.
    """
    try:
        return main() or 0
    except PeekabooError as err:
        print(f"error: {context}{err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as err:
        print(f"stopped: {context}{err}; {rerun_hint}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
