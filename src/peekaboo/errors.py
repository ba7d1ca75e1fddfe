"""User-facing errors.

Anything a user can cause (bad path, bad image, bad config, missing model component, a full disk) raises
:class:`PeekabooError` with one sentence naming the input and the fix; the command-line entry points print
it without a traceback and exit non-zero. Everything else is a bug and keeps its traceback.
docs/TROUBLESHOOTING.md lists the messages.
"""


class PeekabooError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


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
