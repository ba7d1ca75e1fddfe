"""Finished sweep trials in one JSON file that several processes share (:class:`TrialCache`).

A tuning sweep on a CPU takes hours and is interrupted; a rerun reads the trials it finished. Several sweep
processes (one per core or per GPU) may also share one file: a process claims a trial before running it, so the
others run the next trial of the stage instead of the same one, and reads the file again before each trial, so it
finds what the others finished. Claims are files beside the cache (``<cache>.claims/``) created atomically and
touched as the trial goes (:meth:`TrialCache.touch`); a claim whose process is gone (on the same machine), or, from
another machine, that nobody touched for :data:`STALE_SECONDS` (that machine stopped or was replaced), is stale
and taken over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peekaboo.utils import files

#: Seconds between looks at the file while waiting for a trial another process runs.
POLL_SECONDS = 30.0
#: Another machine's claim nobody touched for this long is stale (its holder touches it after each batch).
STALE_SECONDS = 3600.0


class TrialCache:
    """Results by trial key, kept in ``path`` (in memory only when ``path`` is None)."""

    def __init__(self, path: Path | None, poll_seconds: float = POLL_SECONDS):
        self.path = path
        self.poll_seconds = poll_seconds
        self._memory: dict[str, Any] = {}
        self._mine: set[str] = set()  # keys this process has claimed and not yet released

    # -- the results ----------------------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Every finished trial, read again from the file."""
        if self.path is not None and self.path.is_file():
            self._memory = json.loads(self.path.read_text())
        return self._memory

    def get(self, key: str) -> Any | None:
        """The finished trial ``key``, or None."""
        return self.load().get(key)

    def put(self, key: str, value: Any) -> None:
        """Store a finished trial (merged with what other processes stored meanwhile) and release its claim."""
        with self._locked():
            self.load()[key] = value
            if self.path is not None:
                files.write_text(json.dumps(self._memory, indent=1, default=str), self.path)
        self.release(key)

    # -- claims ---------------------------------------------------------------------------------------------
    def claim(self, key: str) -> bool:
        """Take trial ``key`` for this process: False when another live process holds it."""
        if self.path is None or key in self._mine:
            self._mine.add(key)
            return True
        claim = self._claim_path(key)
        claim.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _stale(claim):
                    return False
                claim.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            self._mine.add(key)
            return True
        return False

    def touch(self, key: str) -> None:
        """Show that this process is still running trial ``key`` (call it as the trial goes)."""
        if key in self._mine and self.path is not None:
            self._claim_path(key).touch()

    def release(self, key: str) -> None:
        """Give up this process's claim on ``key`` (also after a failure, so another process may run it)."""
        if key in self._mine:
            self._mine.discard(key)
            if self.path is not None:
                self._claim_path(key).unlink(missing_ok=True)

    def wait(self, key: str) -> Any | None:
        """The trial ``key`` once another process finished it; None when its claim went away unfinished."""
        while True:
            found = self.get(key)
            if found is not None:
                return found
            claim = self._claim_path(key) if self.path is not None else None
            if claim is None or not claim.exists() or _stale(claim):
                return None
            time.sleep(self.poll_seconds)

    def _claim_path(self, key: str) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".claims") / hashlib.sha1(key.encode()).hexdigest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-merge-write of the file between processes."""
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _stale(claim: Path) -> bool:
    """Whether a claim's process is gone: on this machine, no process of its pid; on another machine, nobody
    touched the claim for :data:`STALE_SECONDS`."""
    try:
        owner = json.loads(claim.read_text())
        idle = time.time() - claim.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile
    except (OSError, ValueError):
        # Being written right now, unless its process died between creating and writing it.
        return time.time() - claim.stat().st_mtime > 60
    if owner.get("host") != socket.gethostname():
        return idle > STALE_SECONDS
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
