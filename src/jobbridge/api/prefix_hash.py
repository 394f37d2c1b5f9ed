"""The whole-file SHA-256 of an upload, advanced over the chunks that have arrived contiguously.

Completing a TB upload must not mean reading a TB: as chunk ``k`` arrives while chunks ``0..k-1`` are in,
a worker thread re-reads it (from the page cache, it was just written) and feeds the file's SHA-256. Chunks
arriving out of order wait until the gap before them is filled. So at ``complete`` only the tail that was
still in flight is left to hash.

The hash state is saved in the ledger every 30 s, after an ``fdatasync`` of the data file, so a
restarted API resumes hashing where the last save was. Chunks received after that save are re-checked
against their own recorded SHA-256 as they are hashed: a chunk whose bytes did not survive (power loss) is
dropped and the client is asked for it again, instead of the whole upload failing at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from jobbridge.api.resumable_sha256 import ResumableHash

log = logging.getLogger("jobbridge.api.hash")

#: Bytes read per pread while hashing (one buffer per running hasher).
READ_BLOCK = 4 * 1024 * 1024
#: Save the hash state at most this often (each save costs an fdatasync of what was written since). A
#: crash loses at most this much hashing, which a restart redoes from the page cache or the disk.
CHECKPOINT_SECONDS = 30.0


@dataclass(frozen=True)
class Layout:
    """Where an upload's bytes are and how they are cut into chunks."""

    path: Path
    size: int
    chunk_size: int
    chunk_count: int

    def span(self, n: int) -> tuple[int, int]:
        """Offset and length of chunk ``n``."""
        offset = n * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)


@dataclass(frozen=True)
class Hooks:
    """How the hasher reads and reports the upload's state (kept by the store)."""

    is_received: Callable[[int], bool]
    chunk_sha256: Callable[[int], str | None]
    on_torn: Callable[[int], None]
    save: Callable[[int, bytes], None]


class PrefixHasher:
    """One upload's whole-file hash; thread-safe; work runs on a shared executor."""

    def __init__(
        self,
        layout: Layout,
        digest: ResumableHash,
        hashed: int,
        hooks: Hooks,
        executor: Executor,
        *,
        unverified: set[int] | None = None,
    ) -> None:
        self.layout = layout
        self._digest = digest
        self.hashed = hashed
        self._hooks = hooks
        self._executor = executor
        self._unverified = set(unverified or ())
        self._cond = threading.Condition()
        self._running = False
        self._stopped = False
        self._saved = hashed
        self._last_save = time.monotonic()
        self.error: str | None = None

    @property
    def done(self) -> bool:
        """True once every chunk is in the hash."""
        return self.hashed >= self.layout.chunk_count

    @property
    def hashed_bytes(self) -> int:
        """Bytes covered by the hash so far."""
        return min(self.hashed * self.layout.chunk_size, self.layout.size)

    def hexdigest(self) -> str:
        """The digest of the chunks hashed so far (the whole file's once :attr:`done`)."""
        with self._cond:
            return self._digest.hexdigest()

    def _can_advance(self) -> bool:
        return not self._stopped and not self.done and self._hooks.is_received(self.hashed)

    def kick(self) -> None:
        """Start hashing if the next chunk is in and no worker is at it already."""
        with self._cond:
            if self._running or not self._can_advance():
                return
            self._running = True
        self._executor.submit(self._run)

    def _run(self) -> None:
        try:
            with open(self.layout.path, "rb", buffering=0) as handle:
                buffer = bytearray(READ_BLOCK)
                while True:
                    with self._cond:
                        if not self._can_advance():
                            self._running = False
                            self._cond.notify_all()
                            return
                        n, trial = self.hashed, self._digest.copy()
                    ok = self._hash_chunk(handle.fileno(), n, trial, buffer)
                    with self._cond:
                        if ok:
                            self._digest, self.hashed = trial, n + 1
                            self._unverified.discard(n)
                        self._cond.notify_all()
                    if not ok:
                        self._hooks.on_torn(n)
                    elif time.monotonic() - self._last_save >= CHECKPOINT_SECONDS:
                        self._checkpoint(handle.fileno())
        except Exception as exc:  # a read error must not leave a hasher marked running forever
            log.exception("hashing %s failed", self.layout.path)
            with self._cond:
                self.error = f"{type(exc).__name__}: {exc}"
                self._running = False
                self._cond.notify_all()

    def _hash_chunk(self, fd: int, n: int, trial: ResumableHash, buffer: bytearray) -> bool:
        """Feed chunk ``n`` into ``trial``; False when it is a re-checked chunk that no longer matches."""
        offset, length = self.layout.span(n)
        check = hashlib.sha256() if n in self._unverified else None
        view = memoryview(buffer)
        done = 0
        while done < length:
            want = min(READ_BLOCK, length - done)
            got = os.preadv(fd, [view[:want]], offset + done)
            if got <= 0:
                return False  # the file is shorter than the chunks recorded: treat as torn
            trial.update(view[:got])
            if check is not None:
                check.update(view[:got])
            done += got
        if check is None:
            return True
        expected = self._hooks.chunk_sha256(n)
        if expected == check.hexdigest():
            return True
        log.warning(
            "chunk %d of %s does not match its recorded SHA-256: asking for it again", n, self.layout.path
        )
        return False

    def _checkpoint(self, fd: int) -> None:
        """Save the hash state, after the bytes it covers are on disk."""
        with self._cond:
            hashed, state = self.hashed, self._digest.state()
        if state is None or hashed == self._saved:
            self._last_save = time.monotonic()
            return
        os.fdatasync(fd)
        self._hooks.save(hashed, state)
        self._saved, self._last_save = hashed, time.monotonic()

    def checkpoint_if_idle(self, min_age: float = CHECKPOINT_SECONDS) -> None:
        """From the maintenance pass: save a state that is newer than the saved one, when no worker runs."""
        with self._cond:
            if self._running or self.hashed == self._saved:
                return
            if time.monotonic() - self._last_save < min_age:
                return
            self._running = True
        try:
            with open(self.layout.path, "rb", buffering=0) as handle:
                self._checkpoint(handle.fileno())
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
        self.kick()

    def wait(self, timeout: float) -> bool:
        """Wait until every chunk is hashed or nothing more can be hashed; True when done."""
        self.kick()
        with self._cond:
            self._cond.wait_for(lambda: self.done or not self._running, timeout)
            return self.done

    def stop(self, timeout: float = 30.0, *, save: bool = True) -> None:
        """Stop hashing (at a chunk boundary) and, with ``save``, save the state reached (an fdatasync:
        worth it at shutdown, not when the upload is complete or cancelled)."""
        with self._cond:
            self._stopped = True
            self._cond.wait_for(lambda: not self._running, timeout)
        if not save:
            return
        try:
            with open(self.layout.path, "rb", buffering=0) as handle:
                self._checkpoint(handle.fileno())
        except FileNotFoundError:
            pass
