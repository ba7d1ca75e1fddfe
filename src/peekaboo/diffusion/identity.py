"""Which weights a model config names: a short digest that changes when the weights do, so a run started with one
model never resumes with another that shares its name (``bundled`` before and after a retraining, say)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from peekaboo.diffusion.checks import resolve_pretrained

__all__ = ["FINGERPRINT_CONTENT_BYTES", "model_fingerprint"]

#: Files up to this size are hashed by content; larger ones (a full-size checkpoint's weights) by size and
#: modification time, so a digest costs well under a second even for Stable Diffusion folders.
FINGERPRINT_CONTENT_BYTES = 64 * 2**20


@functools.cache
def model_fingerprint(pretrained: str, revision: str | None = None) -> str:
    """A short digest of a local model folder's files (names, sizes, contents); a hub id is its own key, with the
    revision when one is given (``org/model@rev``)."""
    folder = Path(resolve_pretrained(pretrained))
    if not folder.is_dir():
        return pretrained if revision is None else f"{pretrained}@{revision}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}:{stat.st_size}".encode())
        small = stat.st_size <= FINGERPRINT_CONTENT_BYTES
        digest.update(path.read_bytes() if small else str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]
