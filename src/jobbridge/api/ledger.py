"""The upload ledger: one SQLite database in the staging area, the only module that talks to it.

It records each upload (its file, size, chunking, the job fields it was started with), which chunks arrived
with their SHA-256, how far the whole-file hash has got (with the hash's saved state), and the job an
upload became. A restarted API reads everything back from here, so a client can resume where it stopped.

WAL with ``synchronous=NORMAL``: a commit survives the API process dying (the restart case); after a power
loss the last commits may be gone, which only makes chunks look missing, and the client sends them again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    expected_sha256 TEXT,
    metadata TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    hashed_chunks INTEGER NOT NULL DEFAULT 0,
    hash_state BLOB,
    sha256 TEXT,
    job_id TEXT
);
CREATE INDEX IF NOT EXISTS uploads_by_job ON uploads (job_id);
CREATE TABLE IF NOT EXISTS chunks (
    upload_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    state TEXT NOT NULL,
    sha256 TEXT,
    PRIMARY KEY (upload_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credential_blocks (
    block_name TEXT PRIMARY KEY,
    job_id TEXT,
    created_at REAL NOT NULL
);
"""

#: Upload states. ``receiving``: chunks may arrive; ``verified``: every byte is in and the whole-file
#: SHA-256 is known, the job is being submitted; ``completed``: the job exists; ``cancelled``.
RECEIVING, VERIFIED, COMPLETED, CANCELLED = "receiving", "verified", "completed", "cancelled"
#: Chunk states: ``writing`` (bytes may be on disk, not verified) and ``received`` (verified, counted).
WRITING, RECEIVED = "writing", "received"


@dataclass
class UploadRecord:
    """One upload as the ledger holds it."""

    upload_id: str
    kind: str  # "chunked" or "single"
    filename: str
    size: int
    chunk_size: int
    chunk_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    expected_sha256: str | None = None
    state: str = RECEIVING
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    hashed_chunks: int = 0
    hash_state: bytes | None = None
    sha256: str | None = None
    job_id: str | None = None


_COLUMNS = (
    "upload_id, kind, filename, size, chunk_size, chunk_count, expected_sha256, metadata, state, "
    "created_at, updated_at, hashed_chunks, hash_state, sha256, job_id"
)


def _record(row: tuple[Any, ...]) -> UploadRecord:
    (upload_id, kind, filename, size, chunk_size, chunk_count, expected, metadata, state) = row[:9]
    (created, updated, hashed, hash_state, sha256, job_id) = row[9:]
    return UploadRecord(
        upload_id=upload_id,
        kind=kind,
        filename=filename,
        size=size,
        chunk_size=chunk_size,
        chunk_count=chunk_count,
        expected_sha256=expected,
        metadata=json.loads(metadata),
        state=state,
        created_at=created,
        updated_at=updated,
        hashed_chunks=hashed,
        hash_state=hash_state,
        sha256=sha256,
        job_id=job_id,
    )


class Ledger:
    """Thread-safe access to the ledger database (one connection behind a lock: every call is short)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # --- uploads -------------------------------------------------------------------------------

    def insert(self, record: UploadRecord) -> None:
        """Add a new upload."""
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO uploads ({_COLUMNS}) VALUES ({', '.join('?' * 15)})",
                (
                    record.upload_id,
                    record.kind,
                    record.filename,
                    record.size,
                    record.chunk_size,
                    record.chunk_count,
                    record.expected_sha256,
                    json.dumps(record.metadata),
                    record.state,
                    record.created_at,
                    record.updated_at,
                    record.hashed_chunks,
                    record.hash_state,
                    record.sha256,
                    record.job_id,
                ),
            )

    def get(self, upload_id: str) -> UploadRecord | None:
        """The upload with this id, if the ledger has it."""
        rows = self._query(f"SELECT {_COLUMNS} FROM uploads WHERE upload_id = ?", (upload_id,))
        return _record(rows[0]) if rows else None

    def by_job(self, job_id: str) -> UploadRecord | None:
        """The upload that became job ``job_id``, if any."""
        rows = self._query(f"SELECT {_COLUMNS} FROM uploads WHERE job_id = ?", (job_id,))
        return _record(rows[0]) if rows else None

    def uploads(self, *states: str) -> list[UploadRecord]:
        """Every upload, or those in one of ``states``."""
        if not states:
            return [_record(row) for row in self._query(f"SELECT {_COLUMNS} FROM uploads")]
        marks = ", ".join("?" * len(states))
        rows = self._query(f"SELECT {_COLUMNS} FROM uploads WHERE state IN ({marks})", tuple(states))
        return [_record(row) for row in rows]

    def update(self, upload_id: str, **values: Any) -> None:
        """Set some columns of one upload (``metadata`` is given as a dict)."""
        if "metadata" in values:
            values["metadata"] = json.dumps(values["metadata"])
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._transaction() as db:
            db.execute(f"UPDATE uploads SET {assignments} WHERE upload_id = ?", (*values.values(), upload_id))

    def delete(self, upload_id: str) -> None:
        """Forget an upload and its chunks."""
        with self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE upload_id = ?", (upload_id,))
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))

    # --- chunks --------------------------------------------------------------------------------

    def chunks(self, upload_id: str) -> dict[int, tuple[str, str | None]]:
        """Chunk number -> (state, sha256) for every chunk that was ever written."""
        rows = self._query("SELECT n, state, sha256 FROM chunks WHERE upload_id = ?", (upload_id,))
        return {n: (state, sha) for n, state, sha in rows}

    def chunk_sha256(self, upload_id: str, n: int) -> str | None:
        """The recorded SHA-256 of a received chunk."""
        rows = self._query(
            "SELECT sha256 FROM chunks WHERE upload_id = ? AND n = ? AND state = ?", (upload_id, n, RECEIVED)
        )
        return rows[0][0] if rows else None

    def mark_writing(self, upload_id: str, n: int) -> None:
        """Chunk ``n``'s bytes are about to be written: its region is no longer known to be zeros."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO chunks (upload_id, n, state, sha256) VALUES (?, ?, ?, NULL) "
                "ON CONFLICT (upload_id, n) DO UPDATE SET state = excluded.state, sha256 = NULL",
                (upload_id, n, WRITING),
            )

    def mark_received(self, upload_id: str, n: int, sha256: str, now: float) -> None:
        """Chunk ``n`` arrived whole and matched its SHA-256."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO chunks (upload_id, n, state, sha256) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (upload_id, n) DO UPDATE SET state = excluded.state, sha256 = excluded.sha256",
                (upload_id, n, RECEIVED, sha256),
            )
            db.execute("UPDATE uploads SET updated_at = ? WHERE upload_id = ?", (now, upload_id))

    def mark_torn(self, upload_id: str, n: int) -> None:
        """A received chunk no longer matches its SHA-256 (lost in a crash): it must be sent again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE chunks SET state = ?, sha256 = NULL WHERE upload_id = ? AND n = ?",
                (WRITING, upload_id, n),
            )

    # --- credential blocks ----------------------------------------------------------------------

    def add_credential_block(self, block_name: str, job_id: str | None) -> None:
        """Remember a secret block made for one job, to delete it once the job is over."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO credential_blocks (block_name, job_id, created_at) VALUES (?, ?, ?)",
                (block_name, job_id, time.time()),
            )

    def credential_blocks(self) -> list[tuple[str, str | None, float]]:
        """(block name, job id, created at) of every remembered secret block."""
        return [(name, job, at) for name, job, at in self._query("SELECT * FROM credential_blocks")]

    def drop_credential_block(self, block_name: str) -> None:
        """Forget a secret block (after deleting it)."""
        with self._transaction() as db:
            db.execute("DELETE FROM credential_blocks WHERE block_name = ?", (block_name,))
