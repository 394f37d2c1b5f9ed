"""The mirror's durable outbox: every change waits on disk until each of its targets has taken it.

Why a file: a store can be down for minutes and the mirror service can be killed at any moment; what it
has accepted from Prefect must survive both. One SQLite database (WAL, one connection per thread) holds:

* ``outbox``: one row per (transition, target), delivered per target in insertion order and deleted
  once the target has taken it (or has refused it for good, which is recorded in ``rejected``);
* ``seen``: every (job, seq) the mirror has accepted, with its status, so that a duplicated event or a
  reconciliation finding the same state enqueues nothing, a transition older than the newest one known
  is delivered as *history only*, and a change that does not change the job's status is not written;
* ``cursor``: where the event stream was read up to, so that a restart catches up from there;
* ``targets``: per target, when it last delivered, its recent lag and its last error, for
  ``jobbridge mirror status``.

Rows of ``seen`` older than :data:`SEEN_RETENTION_SECONDS` are pruned; by then a job's events have long
been replayed or reconciled.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jobbridge.jobs import JobStatus
from jobbridge.mirror.transition import Transition

__all__ = ["Delivery", "Outbox", "OutboxStatus", "Verdict"]

SEEN_RETENTION_SECONDS = 24 * 3600
_LAG_WINDOW = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    lane INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    transition TEXT NOT NULL,
    enqueued REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_target ON outbox (target, lane, id);
CREATE TABLE IF NOT EXISTS seen (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    recorded REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS seen_by_time ON seen (recorded);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    final INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (final, updated);
CREATE TABLE IF NOT EXISTS cursor (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS targets (
    target TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    last_delivered REAL,
    lags TEXT NOT NULL DEFAULT '[]',
    last_error TEXT,
    last_error_at REAL
);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class Verdict:
    """What the outbox made of an offered transition."""

    CURRENT = "current"  # the newest state of the job: written to every target
    HISTORY = "history"  # older than what is known, but never recorded: history only
    DUPLICATE = "duplicate"  # this (job, seq) was accepted before
    UNCHANGED = "unchanged"  # same status as the transition just before it: nothing to write


@dataclass(frozen=True)
class Delivery:
    """One pending (transition, target) row."""

    row_id: int
    target: str
    transition: Transition
    enqueued: float
    attempts: int


@dataclass(frozen=True)
class TargetStatus:
    """What ``jobbridge mirror status`` shows for one target."""

    target: str
    depth: int
    oldest_age: float | None
    delivered: int
    skipped: int
    last_delivered: float | None
    lag_p50: float | None
    lag_p99: float | None
    last_error: str | None
    last_error_at: float | None
    rejected: int


@dataclass(frozen=True)
class OutboxStatus:
    """The whole outbox at a glance."""

    targets: list[TargetStatus]
    open_jobs: int
    cursor: str | None


def percentile(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile (nearest rank) of ``values``, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class Outbox:
    """The SQLite file behind the mirror service; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()  # one writer at a time: SQLite would make others wait anyway
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- intake ---------------------------------------------------------------------------------------

    def offer(self, transition: Transition, targets: Iterable[tuple[str, int]]) -> str:
        """Record a transition and queue it for ``targets`` ((name, lane) pairs) in one transaction.

        Returns the :class:`Verdict`; only CURRENT and HISTORY queue anything.
        """
        job = transition.job
        now = time.time()
        with self._transaction() as db:
            if db.execute(
                "SELECT 1 FROM seen WHERE job_id = ? AND seq = ?", (job.id, transition.seq)
            ).fetchone():
                return Verdict.DUPLICATE
            db.execute(
                "INSERT INTO seen (job_id, seq, status, recorded) VALUES (?, ?, ?, ?)",
                (job.id, transition.seq, job.status.value, now),
            )
            before = db.execute(
                "SELECT status FROM seen WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT 1",
                (job.id, transition.seq),
            ).fetchone()
            newest = db.execute("SELECT seq FROM jobs WHERE job_id = ?", (job.id,)).fetchone()
            verdict = Verdict.CURRENT if newest is None or transition.seq > newest[0] else Verdict.HISTORY
            if verdict == Verdict.CURRENT:
                db.execute(
                    "INSERT INTO jobs (job_id, seq, status, final, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (job_id) DO UPDATE SET seq = excluded.seq, status = excluded.status, "
                    "final = excluded.final, updated = excluded.updated",
                    (job.id, transition.seq, job.status.value, int(job.is_final), now),
                )
            if before is not None and before[0] == job.status.value and not job.is_final:
                return Verdict.UNCHANGED
            if verdict == Verdict.HISTORY:  # a late arrival may repeat the status the next one recorded
                after = db.execute(
                    "SELECT status FROM seen WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT 1",
                    (job.id, transition.seq),
                ).fetchone()
                if after is not None and after[0] == job.status.value:
                    return Verdict.UNCHANGED
            payload = transition.model_copy(update={"history_only": verdict == Verdict.HISTORY})
            text = payload.model_dump_json()
            db.executemany(
                "INSERT INTO outbox (target, lane, job_id, seq, transition, enqueued) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(name, lane, job.id, transition.seq, text, now) for name, lane in targets],
            )
            return verdict

    def known_status(self, job_id: str) -> tuple[int, JobStatus] | None:
        """The newest (seq, status) accepted for a job, or None."""
        with self._connection() as db:
            row = db.execute("SELECT seq, status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else (int(row[0]), JobStatus(row[1]))

    def open_jobs(self, limit: int = 1000) -> list[tuple[str, int, JobStatus]]:
        """Jobs not final as far as the mirror knows: (id, seq, status), least recently changed first."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT job_id, seq, status FROM jobs WHERE final = 0 ORDER BY updated LIMIT ?", (limit,)
            ).fetchall()
        return [(row[0], int(row[1]), JobStatus(row[2])) for row in rows]

    def prune(self, older_than: float = SEEN_RETENTION_SECONDS) -> None:
        """Forget dedup entries, and final jobs, older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        with self._transaction() as db:
            db.execute("DELETE FROM seen WHERE recorded < ?", (cutoff,))
            db.execute("DELETE FROM jobs WHERE final = 1 AND updated < ?", (cutoff,))

    # -- cursor ---------------------------------------------------------------------------------------

    def cursor(self, name: str = "events") -> str | None:
        """The stored position of a reader (an ISO timestamp for the event stream)."""
        with self._connection() as db:
            row = db.execute("SELECT value FROM cursor WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_cursor(self, value: str, name: str = "events") -> None:
        """Move a reader's position (the caller only ever moves it forward)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO cursor (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # -- delivery -------------------------------------------------------------------------------------

    def pending(self, target: str, lane: int, limit: int = 100) -> list[Delivery]:
        """The oldest undelivered rows of one target's lane, in the order they were queued."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT id, transition, enqueued, attempts FROM outbox WHERE target = ? AND lane = ? "
                "ORDER BY id LIMIT ?",
                (target, lane, limit),
            ).fetchall()
        return [
            Delivery(row[0], target, Transition.model_validate_json(row[1]), row[2], row[3]) for row in rows
        ]

    def delivered(self, delivery: Delivery, *, written: bool, lag: float) -> None:
        """The target took the row (``written`` False: it already held that or something newer)."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (delivery.row_id,))
            self._ensure_target(db, delivery.target)
            lags = json.loads(
                db.execute("SELECT lags FROM targets WHERE target = ?", (delivery.target,)).fetchone()[0]
            )
            if written:  # a skipped row (the store already held it) says nothing about the lag
                lags = [*lags[-(_LAG_WINDOW - 1) :], round(lag, 4)]
            db.execute(
                "UPDATE targets SET delivered = delivered + ?, skipped = skipped + ?, last_delivered = ?, "
                "lags = ? WHERE target = ?",
                (int(written), int(not written), time.time(), json.dumps(lags), delivery.target),
            )

    def failed(self, delivery: Delivery, error: str) -> None:
        """The target could not be reached: the row stays, and the error is shown by ``mirror status``."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (delivery.row_id,))
            self._ensure_target(db, delivery.target)
            db.execute(
                "UPDATE targets SET last_error = ?, last_error_at = ? WHERE target = ?",
                (error, time.time(), delivery.target),
            )

    def rejected(self, delivery: Delivery, reason: str) -> None:
        """The target can never hold this job: drop the row and keep the reason."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (delivery.row_id,))
            db.execute(
                "INSERT INTO rejected (target, job_id, seq, reason, at) VALUES (?, ?, ?, ?, ?)",
                (delivery.target, delivery.transition.job.id, delivery.transition.seq, reason, time.time()),
            )
            self._ensure_target(db, delivery.target)
            db.execute(
                "UPDATE targets SET last_error = ?, last_error_at = ? WHERE target = ?",
                (reason, time.time(), delivery.target),
            )

    @staticmethod
    def _ensure_target(db: sqlite3.Connection, target: str) -> None:
        db.execute("INSERT OR IGNORE INTO targets (target) VALUES (?)", (target,))

    # -- status ---------------------------------------------------------------------------------------

    def status(self, targets: Iterable[str] = ()) -> OutboxStatus:
        """Depth, lag and last error of every target (those named, plus any with rows or history)."""
        now = time.time()
        with self._connection() as db:
            names = set(targets)
            names.update(row[0] for row in db.execute("SELECT target FROM targets"))
            names.update(row[0] for row in db.execute("SELECT DISTINCT target FROM outbox"))
            shown = [self._target_status(db, name, now) for name in sorted(names)]
            open_jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE final = 0").fetchone()[0]
        return OutboxStatus(targets=shown, open_jobs=int(open_jobs), cursor=self.cursor())

    @staticmethod
    def _target_status(db: sqlite3.Connection, name: str, now: float) -> TargetStatus:
        depth, oldest = db.execute(
            "SELECT COUNT(*), MIN(enqueued) FROM outbox WHERE target = ?", (name,)
        ).fetchone()
        row = db.execute(
            "SELECT delivered, skipped, last_delivered, lags, last_error, last_error_at FROM targets "
            "WHERE target = ?",
            (name,),
        ).fetchone() or (0, 0, None, "[]", None, None)
        rejected = db.execute("SELECT COUNT(*) FROM rejected WHERE target = ?", (name,)).fetchone()[0]
        lags = [float(value) for value in json.loads(row[3])]
        return TargetStatus(
            target=name,
            depth=int(depth),
            oldest_age=None if oldest is None else max(0.0, now - float(oldest)),
            delivered=int(row[0]),
            skipped=int(row[1]),
            last_delivered=row[2],
            lag_p50=percentile(lags, 0.5),
            lag_p99=percentile(lags, 0.99),
            last_error=row[4],
            last_error_at=row[5],
            rejected=int(rejected),
        )
