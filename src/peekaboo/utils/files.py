"""Atomic output files: a kill or a full disk never leaves a half-written file, and a failed write ends in one
:class:`~peekaboo.errors.OutputError` naming the file and the fix."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from peekaboo.errors import OutputError
from peekaboo.utils.images import FinalMask
from peekaboo.utils.overlays import cutout, overlay

try:  # POSIX only; without it concurrent appends still land whole, only the rollback of a failed one is unsafe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)



#: The files :func:`write_pair_files` can write for a pair.
PAIR_FILES = ("mask", "alpha", "overlay", "cutout")


def write_pair_files(img: Image.Image, final: FinalMask, paths: dict[str, Path]) -> dict[str, Path]:
    """Write a pair's PNGs (each atomically) at the paths given per kind of :data:`PAIR_FILES`.

    ``mask`` is 0/255, ``alpha`` the soft alpha 0..255, ``overlay`` the mask shown over the image
    (:func:`overlay`) and ``cutout`` the RGBA image with the soft alpha as its alpha channel.
    """
    render = {
        "mask": lambda: Image.fromarray(final.mask.astype(np.uint8) * 255, "L"),
        "alpha": lambda: Image.fromarray(final.alpha_u8, "L"),
        "overlay": lambda: overlay(img, final.mask),
        "cutout": lambda: cutout(img, final.alpha_u8),
    }
    unknown = set(paths) - set(render)
    if unknown:
        raise ValueError(f"unknown pair file kinds {sorted(unknown)}; expected some of {PAIR_FILES}")
    return {kind: save_png(render[kind](), path) for kind, path in paths.items()}



def output_error(path: str | os.PathLike, err: OSError) -> OutputError:
    """The user-facing error for an output file that could not be written, with the fix for its cause."""
    code = err.errno if err.errno is not None else next((a for a in err.args if isinstance(a, int)), None)
    reason = err.strerror or (os.strerror(code) if code is not None else str(err) or type(err).__name__)
    if code in _NO_SPACE:
        fix = "free disk space or choose an output folder on another disk, then run again"
    elif code in _NOT_WRITABLE:
        fix = "make that folder writable or choose another output folder"
    else:
        fix = "check that the output folder exists, is writable and has free space"
    return OutputError(f"Could not write {path}: {reason}; {fix} (files written before are intact).")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX).

    On any failure the temporary file is removed and ``path`` keeps its previous content (or stays absent).

    Raises:
        OutputError: the folder cannot be created or written (full disk, read-only, permissions).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise output_error(path, err) from err
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise output_error(path, err) from err
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (beside ``path``, whose folder is created) for the block: several
    processes doing a read-merge-write of ``path`` take turns. Without ``fcntl`` (Windows) nothing is locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` as PNG atomically (raises OutputError)."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` atomically (raises OutputError)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_line(line: str, path: str | os.PathLike) -> None:
    """Append one line so that the file never holds a partial line.

    The line goes out in one ``O_APPEND`` write (each write lands whole at the end, also with several worker
    processes appending), then fsync. A failed or short write (full disk) is rolled back by truncating to the
    size before it, under an exclusive lock so no other writer's line lands in between.

    Raises:
        OutputError: the file cannot be opened or the line cannot be written.
    """
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise output_error(path, err) from err
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise output_error(path, err) from err
    finally:
        os.close(fd)


def safe_name(name: str, max_len: int = 80) -> str:
    """A file-system-safe, collision-resistant name for ``name`` (a pair id or prompt).

    Spaces become ``_``; keeps ``[A-Za-z0-9._-]`` and replaces everything else (``/``, ``\\``, control and
    non-ASCII characters) with ``-``; strips leading and trailing ``-``/``.`` (no hidden files, no ``..``);
    when that (or shortening to ``max_len``) changed the name beyond its spaces, a short digest of the original
    is appended so distinct ids do not share an output file. The result is never empty, ``.`` or ``..``, has
    no path separator and is at most ``max_len + 9`` characters, so ``folder / safe_name(x)`` stays in
    ``folder`` for any ``x``.
    """
    spaced = name.strip().replace(" ", "_")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", spaced).strip("-.")[:max_len] or "pair"
    if clean != spaced:
        clean = f"{clean}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return clean
