"""Finished sweep trials in one JSON file that several processes share (:class:`TrialCache`).

A tuning sweep on a CPU takes hours and is interrupted; a rerun reads the trials it finished. Several sweep
processes (one per core or per GPU) may also share one file: a process claims a trial before running it, so the
others run the next trial of the stage instead of the same one, and reads the file again before each trial, so it
finds what the others finished. Claims are files beside the cache (``<cache>.claims/``), each holding its owner
(host, pid, the process's start time, a random token), taken and written under a lock, and touched as the trial
goes (:meth:`TrialCache.touch`). A claim whose process is gone (on the same machine), or, from another machine,
that nobody touched for :data:`STALE_SECONDS` (that machine stopped or was replaced), is stale and taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from peekaboo.bench.common import write_json
from peekaboo.utils import files

#: Seconds between looks at the file while waiting for a trial another process runs.
POLL_SECONDS = 30.0
#: Another machine's claim nobody touched for this long is stale (its holder touches it after each batch).
STALE_SECONDS = 3600.0
#: Claim tokens this process holds, of every cache instance: a claim naming this process's pid and start time
#: but no token held here is left over from an earlier run that had the same pid (a restarted container).
_HELD_TOKENS: set[str] = set()


class TrialCache:
    """Results by trial key, kept in ``path`` (in memory only when ``path`` is None)."""

    def __init__(self, path: Path | None, poll_seconds: float | None = None,
                 normalize: Callable[[str], str] | None = None):
        """``normalize``: maps a stored key to today's form of the same trial (keys given to the methods are in
        that form already); the file is rewritten in that form at the next :meth:`put`."""
        self.path = path
        self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self._normalize = normalize or (lambda key: key)
        self._memory: dict[str, Any] = {}
        self._mine: dict[str, str] = {}  # key -> token of the claims this instance holds

    # -- the results ----------------------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """Every finished trial, read again from the file."""
        if self.path is not None and self.path.is_file():
            self._memory = {self._normalize(k): v for k, v in json.loads(self.path.read_text()).items()}
        return self._memory

    def get(self, key: str) -> Any | None:
        """The finished trial ``key``, or None."""
        return self.load().get(key)

    def put(self, key: str, value: Any) -> None:
        """Store a finished trial (merged with what other processes stored meanwhile) and release its claim."""
        try:
            with self._locked():
                self.load()[key] = value
                if self.path is not None:
                    write_json(self._memory, self.path)
        finally:
            self.release(key)

    # -- claims ---------------------------------------------------------------------------------------------
    def claim(self, key: str) -> bool:
        """Take trial ``key`` for this process: False when another live process holds it, or finished it since
        this process last read the file."""
        if self.path is None or key in self._mine:
            self._mine.setdefault(key, "")
            return True
        claim = self._claim_path(key)
        # Under the lock, so two processes that both find a stale claim do not both take it over.
        with self._locked():
            if key in self.load():
                return False
            if claim.exists():
                if not _stale(claim):
                    return False
                claim.unlink()
            token = uuid.uuid4().hex
            # Held before the claim exists: a thread of this process that reads the claim finds it live.
            _HELD_TOKENS.add(token)
            write_json({"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                        "token": token, "since": time.time()}, claim)
        self._mine[key] = token
        return True

    def touch(self, key: str) -> None:
        """Show that this process is still running trial ``key`` (call it as the trial goes)."""
        if self.path is not None and key in self._mine and self._owns(key):
            with suppress(FileNotFoundError):
                os.utime(self._claim_path(key))  # never creates a file

    def release(self, key: str) -> None:
        """Give up this process's claim on ``key`` (also after a failure, so another process may run it)."""
        if key not in self._mine:
            return
        if self.path is not None:
            with self._locked():
                if self._owns(key):  # not a claim another process took over meanwhile
                    self._claim_path(key).unlink(missing_ok=True)
        _HELD_TOKENS.discard(self._mine.pop(key))

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

    def _owns(self, key: str) -> bool:
        owner = _read_claim(self._claim_path(key))
        return owner is not None and owner.get("token") == self._mine.get(key)

    def _claim_path(self, key: str) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".claims") / hashlib.sha1(key.encode()).hexdigest()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize claims and read-merge-writes of the file between processes."""
        if self.path is None:
            yield
            return
        with files.locked(self.path):
            yield


def _read_claim(claim: Path) -> dict[str, Any] | None:
    try:
        return json.loads(claim.read_text())
    except (OSError, ValueError):
        return None


def _stale(claim: Path) -> bool:
    """Whether a claim's process is gone: on this machine, no process of its pid and start time, or this very
    process without holding it; on another machine, nobody touched the claim for :data:`STALE_SECONDS`."""
    owner = _read_claim(claim)
    try:
        idle = time.time() - claim.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile
    if owner is None:
        return True  # claims are written whole under the lock: an unreadable one is left over from a crash
    if owner.get("host") != socket.gethostname():
        return idle > STALE_SECONDS
    pid = int(owner.get("pid", -1))
    if pid == os.getpid():
        return owner.get("token") not in _HELD_TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    started = owner.get("started")
    return started is not None and started != _process_start(pid)  # the pid was reused


def _process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux's /proc; None elsewhere): with the pid, it tells a
    process from a later one that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
