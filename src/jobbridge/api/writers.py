"""Writing request bodies into the staged files: one chunk in place, or a whole file in one request.

A writer gets fixed-size blocks from a worker thread (:mod:`jobbridge.api.streaming`), hashes them and
writes them with ``pwrite``. A chunk counts only once all of its bytes are in and match the SHA-256 the
client sent; a chunk that was already received is checked, never written again, so a bad re-send cannot
spoil good bytes. Blocks of zeros landing on a region never written are skipped, so the staged copy of a
sparse file stays sparse.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobbridge.api.errors import ChunkRejectedError, InsufficientStorageError, UploadError
from jobbridge.api.ledger import UploadRecord
from jobbridge.api.prefix_hash import Layout, PrefixHasher

if TYPE_CHECKING:
    from jobbridge.api.staging import UploadStore

#: Bytes a request hands to a writer at a time (the unit of memory per request in flight).
BLOCK_SIZE = 2 * 1024 * 1024
_ZEROS = bytes(BLOCK_SIZE)
_RATE_WINDOW = 30.0


class RateMeter:
    """Bytes per second over the last 30 s of chunks, counting parallel chunks once."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, started: float, ended: float, nbytes: int) -> None:
        """One chunk of ``nbytes`` received between ``started`` and ``ended`` (monotonic seconds)."""
        with self._lock:
            self._events.append((started, ended, nbytes))
            self._trim(ended)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][1] < now - _RATE_WINDOW:
            self._events.popleft()

    def rate(self) -> float:
        """Bytes per second recently; 0 when nothing arrived in the window."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._events:
                return 0.0
            start = min(event[0] for event in self._events)
            total = sum(event[2] for event in self._events)
        return total / max(now - start, 1e-3)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            message = f"the upload area is full ({exc.strerror}): nothing was kept"
            raise InsufficientStorageError(message) from None
        raise


def _is_zero(block: bytearray, fill: int) -> bool:
    """True when the first ``fill`` bytes are zeros (a memcmp, about 30 GB/s)."""
    if fill == BLOCK_SIZE:
        return block == _ZEROS
    return block[:fill] == _ZEROS[:fill]


@dataclass
class ActiveUpload:
    """What the store keeps in memory for an upload that is still receiving chunks."""

    record: UploadRecord
    layout: Layout
    received: bytearray
    touched: set[int]
    hasher: PrefixHasher
    in_flight: set[int] = field(default_factory=set)
    rate: RateMeter = field(default_factory=RateMeter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: One pwrite at a time per file: ext4 serialises buffered writes to one inode anyway, and threads
    #: spinning on its lock in the kernel burnt a second core for nothing (sys time 4x with 4 chunks).
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_received(self) -> int:
        """Sum of the lengths of the chunks that arrived."""
        count = self.received.count(1)
        if count and self.received[-1] == 1:
            last = self.layout.span(self.layout.chunk_count - 1)[1]
            return (count - 1) * self.layout.chunk_size + last
        return count * self.layout.chunk_size


class BlockSink:
    """Where a request's body goes, one block at a time (written from a worker thread)."""

    def write_block(self, block: bytearray, fill: int) -> None:
        """Take ``block[:fill]``."""
        raise NotImplementedError


class ChunkWriter(BlockSink):
    """Receives one chunk: hashes it and writes it in place, and counts it only if it is whole and right."""

    def __init__(self, store: UploadStore, active: ActiveUpload, n: int) -> None:
        self.store, self.active, self.n = store, active, n
        self.offset, self.length = active.layout.span(n)
        self.already = bool(active.received[n])  # a re-send: check it, never overwrite good bytes
        self.pristine = n not in active.touched  # the region still holds the zeros of the sparse file
        self.written = 0
        self.started = time.monotonic()
        self._sha = hashlib.sha256()
        self._fd = os.open(active.layout.path, os.O_WRONLY)
        self._marked = False

    def write_block(self, block: bytearray, fill: int) -> None:
        """Hash and write ``block[:fill]`` at its place; a body longer than the chunk is refused."""
        if self.written + fill > self.length:
            raise ChunkRejectedError(
                f"chunk {self.n} is longer than {self.length} bytes: nothing was kept, send it again"
            )
        view = memoryview(block)[:fill]
        self._sha.update(view)
        if not self.already and not (self.pristine and _is_zero(block, fill)):
            if not self._marked:
                self.store.ledger.mark_writing(self.active.record.upload_id, self.n)
                self.active.touched.add(self.n)
                self._marked = True
            with self.active.write_lock:
                _write_all(self._fd, view, self.offset + self.written)
        self.written += fill

    def finish(self, expected_sha256: str) -> dict[str, Any]:
        """Count the chunk if it is whole and its SHA-256 matches; otherwise refuse it (send it again)."""
        if self.written != self.length:
            raise ChunkRejectedError(
                f"chunk {self.n} has {self.written} bytes, expected {self.length}: nothing was kept, "
                "send it again"
            )
        actual = self._sha.hexdigest()
        if actual != expected_sha256:
            raise ChunkRejectedError(
                f"chunk {self.n}: SHA-256 of the bytes received is {actual}, X-Chunk-SHA256 says "
                f"{expected_sha256}: nothing was kept, send it again"
            )
        return self.store._chunk_arrived(self, actual)

    def close(self) -> None:
        """Release the file and the chunk's in-flight mark."""
        os.close(self._fd)
        with self.active.lock:
            self.active.in_flight.discard(self.n)


class SingleWriter(BlockSink):
    """Receives a whole file in one request (multipart), written sequentially and hashed as it streams."""

    def __init__(self, store: UploadStore, record: UploadRecord, path: Path, max_size: int) -> None:
        self.store, self.record, self.path, self.max_size = store, record, path, max_size
        self.size = 0
        self._sha = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def write_block(self, block: bytearray, fill: int) -> None:
        """Hash and append ``block[:fill]`` (zero blocks become holes)."""
        if self.size + fill > self.max_size:
            raise UploadError(f"the file is larger than {self.max_size} bytes: use a chunked upload")
        view = memoryview(block)[:fill]
        self._sha.update(view)
        if not _is_zero(block, fill):
            _write_all(self._fd, view, self.size)
        self.size += fill

    def finish(self) -> UploadRecord:
        """Fix the file's length (trailing holes) and record it as verified with its SHA-256."""
        os.ftruncate(self._fd, self.size)
        os.close(self._fd)
        self._fd = -1
        return self.store._single_arrived(self.record, self.size, self._sha.hexdigest())

    def discard(self) -> None:
        """The request failed: forget the upload and its bytes."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.store.discard(self.record.upload_id)
