"""Process-wide logging for the command-line entry points and dataset-run workers (a leaf: imports no peekaboo
module, so every layer may call it)."""

from __future__ import annotations

import logging
import sys

# Lightning announces hardware and seeds for every pair's Trainer; one pair = one Trainer, so these would
# bury the one line per pair that users read.
_QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


def setup_logging() -> None:
    """Log ``INFO`` lines to stderr without decoration, and silence per-Trainer and weight-loading chatter."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import diffusers
    import transformers

    # Weight-loading progress bars and deprecation chatter would bury the one line per prompt users read.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
