"""What the package says on the console, and what it keeps libraries from saying (a leaf: imports no peekaboo
module, so every layer may call it).

The command lines configure the process once (:func:`setup_logging`); library calls configure nothing global
and quiet their own calls for the duration instead (:func:`quiet_lightning`, :func:`warnings_to_log`,
:func:`quiet_loading`), so a notebook or a script keeps its own logging set-up.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

# Lightning announces hardware, tips (litlogger, litmodels) and why a fit stopped for every Trainer at INFO; one
# batch of pairs = one Trainer, so these would bury the one line per pair that users read.
LIGHTNING_CHATTER = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


def setup_logging() -> None:
    """Log ``INFO`` lines to stderr without decoration, and silence per-Trainer and weight-loading chatter for
    the whole process (the command lines' set-up)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in LIGHTNING_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    import diffusers
    import transformers

    # Weight-loading progress bars and deprecation chatter would bury the one line per prompt users read.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Drop Lightning's per-Trainer INFO announcements (:data:`LIGHTNING_CHATTER`) inside the block; its
    warnings and errors still pass, and each logger's level is restored afterwards."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_CHATTER]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def warnings_to_log(log: logging.Logger, ignore: Sequence[str] = ()) -> Iterator[None]:
    """Python warnings raised inside the block become ``WARNING`` records of ``log`` (after the block) instead of
    lines printed to stderr, so the caller's logging set-up decides where they go; those whose message matches a
    regular expression in ``ignore`` are dropped. The filters already set still apply first: an ignored warning
    stays ignored, and one turned into an error still raises."""
    with warnings.catch_warnings(record=True) as caught:
        for message in ignore:
            warnings.filterwarnings("ignore", message)
        try:
            yield
        finally:
            for w in caught:
                log.warning("%s: %s", w.category.__name__, w.message)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading progress bars or advice (e.g. "install accelerate") from diffusers and transformers
    inside the block; both libraries' verbosity and bars are restored afterwards. Errors still raise."""
    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, saved, strict=True):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
