"""The chunk store: uploads staged on disk, chunk by chunk, with flat memory whatever the file size.

Each upload is a directory ``<upload_dir>/<upload_id>/`` holding one file under the client's (checked) file
name, created at its full size as a sparse file. Chunk ``n`` is written in place at ``n * chunk_size`` as
its bytes stream in (:mod:`jobbridge.api.writers`), so chunks may arrive in parallel and in any order, and
memory holds one small block per request in flight, never a chunk.

What arrived, and how far the whole-file SHA-256 got (:mod:`jobbridge.api.prefix_hash`), is in the ledger
(:mod:`jobbridge.api.ledger`): a restarted API carries on. Unfinished uploads idle for ``upload_expiry_hours``
are deleted by :meth:`UploadStore.expire`, which the API runs at start-up and periodically.

One API process serves one upload area (a lock file enforces it): two processes advancing the same hash
would corrupt it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobbridge.api.errors import (
    ChecksumMismatchError,
    ChunkRejectedError,
    InsufficientStorageError,
    UploadAreaBusyError,
    UploadConflictError,
    UploadError,
    UploadGoneError,
    UploadNotFoundError,
)
from jobbridge.api.ledger import (
    CANCELLED,
    COMPLETED,
    RECEIVED,
    RECEIVING,
    VERIFIED,
    Ledger,
    UploadRecord,
)
from jobbridge.api.names import new_upload_id, parse_upload_id, safe_filename
from jobbridge.api.prefix_hash import Hooks, Layout, PrefixHasher
from jobbridge.api.resumable_sha256 import new_sha256
from jobbridge.api.writers import ActiveUpload, ChunkWriter, SingleWriter
from jobbridge.errors import JobbridgeError

log = logging.getLogger("jobbridge.api.staging")

MIN_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 5 * 1024**3
#: The largest file accepted (ScientistCloud's limit).
MAX_FILE_SIZE = 10 * 1024**4
#: Free space kept in reserve when an upload is accepted.
DISK_MARGIN = 64 * 1024 * 1024
DATABASE = "uploads.sqlite3"
LOCK_FILE = ".api.lock"


# ------------------------------------------------------------------------------------------- helpers


def ranges(flags: bytearray | bytes, value: int = 1) -> list[list[int]]:
    """Runs of chunk numbers whose flag equals ``value``, as inclusive ``[first, last]`` pairs."""
    runs: list[list[int]] = []
    start = None
    for n, flag in enumerate(flags):
        if flag == value and start is None:
            start = n
        elif flag != value and start is not None:
            runs.append([start, n - 1])
            start = None
    if start is not None:
        runs.append([start, len(flags) - 1])
    return runs


def chunk_count_for(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has."""
    return -(-size // chunk_size)


# -------------------------------------------------------------------------------------------- store


class UploadStore:
    """All uploads of one upload area. Thread-safe; blocking calls are meant for worker threads."""

    def __init__(self, root: Path, *, chunk_size: int, expiry_seconds: float) -> None:
        self.root = root
        self.default_chunk_size = chunk_size
        self.expiry_seconds = expiry_seconds
        self._active: dict[str, ActiveUpload] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._lock_handle: Any = None
        self._ledger: Ledger | None = None

    # --- life cycle ------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The open ledger."""
        if self._ledger is None:
            raise UploadError("the upload store is not open")
        return self._ledger

    def open(self) -> UploadStore:
        """Lock the area, read the ledger back and resume hashing (opening an open store does nothing)."""
        if self._ledger is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._ledger = Ledger(self.root / DATABASE)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jobbridge-upload-hash")
        self._remove_orphans()
        for record in self.ledger.uploads(RECEIVING):
            if record.kind == "chunked":
                self._activate(record)
        return self

    def close(self) -> None:
        """Stop the hashers (saving their state) and release the area."""
        with self._lock:
            active = list(self._active.values())
            self._active.clear()
        for upload in active:
            upload.hasher.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> UploadStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self) -> None:
        handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the store's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UploadAreaBusyError(
                f"the upload area {self.root} is in use by another jobbridge api (pid {holder}): "
                "run one API per JOBBRIDGE_UPLOAD_DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def _remove_orphans(self) -> None:
        """Upload directories the ledger does not know (a crash between the two) are removed."""
        known = {record.upload_id for record in self.ledger.uploads()}
        for entry in self.root.iterdir():
            try:
                upload_id = parse_upload_id(entry.name)
            except JobbridgeError:
                continue
            if upload_id not in known and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _activate(self, record: UploadRecord) -> ActiveUpload:
        """Build the in-memory state of a receiving upload from its ledger rows."""
        path = self.data_path(record)
        layout = Layout(path, record.size, record.chunk_size, record.chunk_count)
        chunks = self.ledger.chunks(record.upload_id)
        if not path.exists() or path.stat().st_size != record.size:
            log.warning("upload %s lost its data file: every chunk must be sent again", record.upload_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.truncate(record.size)
            for n in chunks:
                self.ledger.mark_torn(record.upload_id, n)
            chunks = {n: ("writing", None) for n in chunks}
            record.hashed_chunks, record.hash_state = 0, None
        received = bytearray(record.chunk_count)
        for n, (state, _) in chunks.items():
            if state == RECEIVED and n < record.chunk_count:
                received[n] = 1
        digest = new_sha256(record.hash_state) if record.hash_state else None
        hashed = record.hashed_chunks if digest is not None else 0
        digest = digest or new_sha256()
        assert digest is not None
        upload_id = record.upload_id
        active_ref: list[ActiveUpload] = []
        hooks = Hooks(
            is_received=lambda n: bool(received[n]),
            chunk_sha256=lambda n: self.ledger.chunk_sha256(upload_id, n),
            on_torn=lambda n: self._torn(active_ref[0], n),
            save=lambda hashed_chunks, state: self.ledger.update(
                upload_id, hashed_chunks=hashed_chunks, hash_state=state
            ),
        )
        assert self._executor is not None
        # Chunks that arrived before a restart, beyond the saved hash, are re-checked as they are hashed.
        unverified = {n for n in range(hashed, record.chunk_count) if received[n]}
        hasher = PrefixHasher(layout, digest, hashed, hooks, self._executor, unverified=unverified)
        active = ActiveUpload(record, layout, received, set(chunks), hasher)
        active_ref.append(active)
        with self._lock:
            self._active[upload_id] = active
        hasher.kick()
        return active

    def _torn(self, active: ActiveUpload, n: int) -> None:
        self.ledger.mark_torn(active.record.upload_id, n)
        active.received[n] = 0

    # --- creating --------------------------------------------------------------------------------

    def data_path(self, record: UploadRecord) -> Path:
        """Where an upload's bytes are."""
        return self.root / record.upload_id / record.filename

    def _check_space(self, size: int) -> None:
        free = shutil.disk_usage(self.root).free
        if size + DISK_MARGIN > free:
            raise InsufficientStorageError(
                f"the upload area {self.root} has {free} bytes free, the file needs {size}"
            )

    def create(
        self,
        filename: str,
        size: int,
        metadata: dict[str, Any],
        *,
        chunk_size: int | None = None,
        expected_sha256: str | None = None,
    ) -> UploadRecord:
        """Start a chunked upload: a sparse file of ``size`` bytes, no chunk received yet."""
        filename = safe_filename(filename)
        chunk_size = chunk_size or self.default_chunk_size
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise UploadError(
                f"chunk_size {chunk_size} is out of range: use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            )
        if not 0 <= size <= MAX_FILE_SIZE:
            raise UploadError(f"size {size} is out of range: use 0 to {MAX_FILE_SIZE} bytes")
        self._check_space(size)
        now = time.time()
        record = UploadRecord(
            upload_id=new_upload_id(),
            kind="chunked",
            filename=filename,
            size=size,
            chunk_size=chunk_size,
            chunk_count=chunk_count_for(size, chunk_size),
            metadata=metadata,
            expected_sha256=expected_sha256,
            created_at=now,
            updated_at=now,
        )
        self.ledger.insert(record)
        path = self.data_path(record)
        path.parent.mkdir(mode=0o750)
        with open(path, "wb") as handle:
            handle.truncate(size)
        self._activate(record)
        return record

    def begin_single(self, filename: str | bytes, max_size: int) -> SingleWriter:
        """Start a one-request upload (its size is known only at the end; raw bytes are decoded strictly)."""
        filename = safe_filename(filename)
        now = time.time()
        record = UploadRecord(
            upload_id=new_upload_id(),
            kind="single",
            filename=filename,
            size=0,
            chunk_size=0,
            chunk_count=1,
            created_at=now,
            updated_at=now,
        )
        self.ledger.insert(record)
        path = self.data_path(record)
        path.parent.mkdir(mode=0o750)
        return SingleWriter(self, record, path, max_size)

    def _single_arrived(self, record: UploadRecord, size: int, sha256: str) -> UploadRecord:
        record.size, record.chunk_size, record.sha256, record.state = size, size, sha256, VERIFIED
        record.updated_at = time.time()
        self.ledger.update(
            record.upload_id,
            size=size,
            chunk_size=size,
            sha256=sha256,
            state=VERIFIED,
            updated_at=record.updated_at,
        )
        return record

    # --- chunks ----------------------------------------------------------------------------------

    def get(self, upload_id: str) -> UploadRecord:
        """The upload's record; an unknown id is an error naming it."""
        upload_id = parse_upload_id(upload_id)
        record = self.ledger.get(upload_id)
        if record is None:
            raise UploadNotFoundError(f"no upload with id {upload_id} (unfinished uploads expire when idle)")
        return record

    def _receiving(self, upload_id: str) -> ActiveUpload:
        record = self.get(upload_id)
        if record.state == CANCELLED:
            raise UploadGoneError(f"upload {record.upload_id} was cancelled")
        if record.state != RECEIVING or record.kind != "chunked":
            raise UploadConflictError(f"upload {record.upload_id} is complete; it takes no more chunks")
        with self._lock:
            active = self._active.get(record.upload_id)
        if active is None:
            raise UploadGoneError(f"upload {record.upload_id} has expired")
        return active

    def begin_chunk(self, upload_id: str, n: int, content_length: int | None = None) -> ChunkWriter:
        """Start receiving chunk ``n``; refuses a bad number, a wrong length or a duplicate in flight."""
        active = self._receiving(upload_id)
        count = active.layout.chunk_count
        if not 0 <= n < count:
            raise ChunkRejectedError(f"chunk {n} is out of range: this upload has chunks 0 to {count - 1}")
        length = active.layout.span(n)[1]
        if content_length is not None and content_length != length:
            raise ChunkRejectedError(f"chunk {n} must be {length} bytes, the request says {content_length}")
        with active.lock:
            if n in active.in_flight:
                raise UploadConflictError(
                    f"chunk {n} is being received by another request; send it again once that one ends"
                )
            active.in_flight.add(n)
        try:
            return ChunkWriter(self, active, n)
        except BaseException:
            with active.lock:
                active.in_flight.discard(n)
            raise

    def _chunk_arrived(self, writer: ChunkWriter, sha256: str) -> dict[str, Any]:
        active, n = writer.active, writer.n
        upload_id = active.record.upload_id
        with active.lock:
            if writer.already:
                recorded = self.ledger.chunk_sha256(upload_id, n)
                if recorded is not None and recorded != sha256:
                    raise UploadConflictError(
                        f"chunk {n} was already received with SHA-256 {recorded}; the file changed? "
                        "cancel this upload and start a new one"
                    )
            else:
                with self._lock:
                    if self._active.get(upload_id) is not active:
                        raise UploadGoneError(f"upload {upload_id} was cancelled or has expired")
                self.ledger.mark_received(upload_id, n, sha256, time.time())
                active.received[n] = 1
                active.rate.add(writer.started, time.monotonic(), writer.length)
        active.hasher.kick()
        return {
            "upload_id": upload_id,
            "chunk": n,
            "sha256": sha256,
            "already_received": writer.already,
            "chunks_received": active.received.count(1),
            "chunk_count": active.layout.chunk_count,
            "bytes_received": active.bytes_received(),
        }

    # --- progress ----------------------------------------------------------------------------------

    def describe(self, upload_id: str) -> dict[str, Any]:
        """Everything a client needs to resume: which chunks arrived, bytes, speed and ETA."""
        record = self.get(upload_id)
        with self._lock:
            active = self._active.get(record.upload_id)
        info: dict[str, Any] = {
            "upload_id": record.upload_id,
            "upload_type": "chunked" if record.kind == "chunked" else "standard",
            "state": record.state,
            "filename": record.filename,
            "size": record.size,
            "chunk_size": record.chunk_size,
            "chunk_count": record.chunk_count,
            "expected_sha256": record.expected_sha256,
            "sha256": record.sha256,
            "job_id": record.job_id,
            "created_at": _iso(record.created_at),
            "updated_at": _iso(record.updated_at),
            "expires_at": _iso(record.updated_at + self.expiry_seconds)
            if record.state == RECEIVING
            else None,
        }
        if active is not None:
            received = bytes(active.received)
            done = active.bytes_received()
            rate = active.rate.rate()
            hashed = active.hasher.hashed_bytes
        else:
            complete = record.state in (VERIFIED, COMPLETED)
            received = bytes([1 if complete else 0]) * record.chunk_count
            done = record.size if complete else 0
            rate, hashed = 0.0, done
        info.update(
            {
                "chunks_received": received.count(1),
                "bytes_received": done,
                "received_ranges": ranges(received, 1),
                "missing_ranges": ranges(received, 0),
                "hashed_bytes": hashed,
                "speed_mbps": round(rate / 1e6, 3),
                "eta_seconds": round((record.size - done) / rate, 1) if rate > 0 else None,
            }
        )
        return info

    def active_upload(self, upload_id: str) -> ActiveUpload | None:
        """The in-memory state of a receiving upload (None once it is not receiving)."""
        with self._lock:
            return self._active.get(upload_id)

    # --- completion ------------------------------------------------------------------------------

    def verify(self, upload_id: str, sha256: str | None, wait: float) -> UploadRecord | dict[str, Any]:
        """Finish receiving: every chunk must be in; wait up to ``wait`` s for the hash to reach the end.

        Returns the record (state ``verified``, ``sha256`` set) once the whole-file SHA-256 is known and
        matches what the client declared, or a progress dict when hashing is still going (ask again).
        """
        record = self.get(upload_id)
        if record.state in (VERIFIED, COMPLETED):
            self._check_declared(record, sha256)
            return record
        active = self._receiving(upload_id)
        missing = ranges(active.received, 0)
        if missing:
            raise UploadConflictError(
                f"upload {record.upload_id} is missing chunks {_describe_ranges(missing)}"
            )
        if sha256 and record.expected_sha256 and sha256.lower() != record.expected_sha256:
            raise ChecksumMismatchError(
                f"sha256 {sha256} differs from the {record.expected_sha256} given when the upload started"
            )
        if not active.hasher.wait(wait):
            if active.hasher.error:
                raise UploadError(f"hashing upload {record.upload_id} failed: {active.hasher.error}")
            if ranges(active.received, 0):  # a chunk was found torn while hashing
                return self.verify(upload_id, sha256, 0)
            return {**self.describe(upload_id), "state": "verifying"}
        digest = active.hasher.hexdigest()
        declared = (sha256 or record.expected_sha256 or "").lower() or None
        if declared and declared != digest:
            raise ChecksumMismatchError(
                f"the SHA-256 of the assembled file is {digest}, the client declared {declared}: "
                "the source changed while it was sent, or the declared checksum is wrong"
            )
        with self._lock:
            self._active.pop(record.upload_id, None)
        active.hasher.stop(save=False)  # the digest itself is what the ledger keeps now
        now = time.time()
        self.ledger.update(
            record.upload_id, state=VERIFIED, sha256=digest, expected_sha256=declared, updated_at=now
        )
        record.state, record.sha256, record.expected_sha256, record.updated_at = (
            VERIFIED,
            digest,
            declared,
            now,
        )
        return record

    @staticmethod
    def _check_declared(record: UploadRecord, sha256: str | None) -> None:
        if sha256 and record.sha256 and sha256.lower() != record.sha256:
            raise ChecksumMismatchError(
                f"the SHA-256 of the assembled file is {record.sha256}, the client declared {sha256}"
            )

    def attach_job(self, upload_id: str, job_id: str) -> None:
        """The upload became job ``job_id``."""
        self.ledger.update(upload_id, state=COMPLETED, job_id=job_id, updated_at=time.time())

    def by_job(self, job_id: str) -> UploadRecord | None:
        """The upload that became job ``job_id``."""
        return self.ledger.by_job(job_id)

    # --- cancel, expire ----------------------------------------------------------------------------

    def cancel(self, upload_id: str) -> UploadRecord:
        """Cancel an unfinished upload and delete its bytes; a finished one is left to its job."""
        record = self.get(upload_id)
        if record.state in (RECEIVING, VERIFIED):
            self._drop_active(record.upload_id)
            shutil.rmtree(self.root / record.upload_id, ignore_errors=True)
            self.ledger.update(record.upload_id, state=CANCELLED, updated_at=time.time())
            record.state = CANCELLED
        return record

    def discard(self, upload_id: str) -> None:
        """Forget an upload entirely (a failed one-request upload)."""
        self._drop_active(upload_id)
        shutil.rmtree(self.root / upload_id, ignore_errors=True)
        self.ledger.delete(upload_id)

    def _drop_active(self, upload_id: str) -> None:
        with self._lock:
            active = self._active.pop(upload_id, None)
        if active is not None:
            active.hasher.stop(save=False)

    def expire(
        self, now: float | None = None, job_is_final: Callable[[str], bool | None] | None = None
    ) -> list[str]:
        """Delete uploads idle longer than the expiry; returns their ids.

        Unfinished (receiving, verified) ones go with their bytes; cancelled ones leave the ledger; a
        completed one goes once its job is over (``job_is_final`` says so; None = cannot tell, keep it), so a
        file is never pulled from under a job that is about to move it.
        """
        now = time.time() if now is None else now
        removed = []
        for record in self.ledger.uploads():
            if record.updated_at > now - self.expiry_seconds:
                continue
            finished = record.state != COMPLETED or (
                job_is_final is not None and record.job_id is not None and job_is_final(record.job_id)
            )
            if not finished:
                continue
            self.discard(record.upload_id)
            removed.append(record.upload_id)
            log.info(
                "upload %s (%s, %s) expired and was removed", record.upload_id, record.filename, record.state
            )
        return removed

    def checkpoint_idle(self) -> None:
        """Save the hash state of uploads whose hashers have gone idle (the maintenance pass calls it)."""
        with self._lock:
            active = list(self._active.values())
        for upload in active:
            upload.hasher.checkpoint_if_idle()


def _iso(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _describe_ranges(runs: list[list[int]], limit: int = 10) -> str:
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    more = f" and {len(runs) - limit} more ranges" if len(runs) > limit else ""
    return ", ".join(parts) + more
