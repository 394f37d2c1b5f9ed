"""A job transition as the mirror writers see it, and the rule that decides whether it may be applied.

Prefect delivers state events out of order and sometimes twice, so a mirror cannot trust arrival order.
Every transition carries a per-job sequence number derived from the time the state occurred; a store
applies a transition only if its sequence is greater than the one it holds, and never lets a non-final
status replace a final one. The stores encode the same rule in their conditional writes; :func:`supersedes`
is its plain-Python statement (for readers, tests and callers that want to pre-filter).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobbridge.jobs import Job, JobStatus, as_utc

__all__ = [
    "TIEBREAK_LIMIT",
    "HistoryEntry",
    "Transition",
    "epoch_micros",
    "exact_decimal",
    "iso_utc",
    "sequence_for",
    "supersedes",
]

#: Tiebreaks per microsecond: room for events that share an occurred timestamp.
TIEBREAK_LIMIT = 1000


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch, computed in integers so that no float rounding creeps in."""
    delta = as_utc(moment) - datetime(1970, 1, 1, tzinfo=as_utc(moment).tzinfo)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso_utc(moment: datetime) -> str:
    """Fixed-width ISO 8601 UTC (always with microseconds) so that strings sort like the times they hold."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def exact_decimal(value: float | int | str | Decimal) -> Decimal:
    """The value as written (``33.3`` -> ``Decimal("33.3")``), never the binary float's long digits."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


def sequence_for(occurred: datetime, tiebreak: int = 0) -> int:
    """A monotonic per-job sequence: the occurred time in microseconds, times 1000, plus a tiebreak.

    It fits a signed 64-bit integer until the year 2262, so both stores hold it exactly.
    """
    if not 0 <= tiebreak < TIEBREAK_LIMIT:
        raise ValueError(f"tiebreak must be in [0, {TIEBREAK_LIMIT}), got {tiebreak}")
    return epoch_micros(occurred) * TIEBREAK_LIMIT + tiebreak


def supersedes(new_seq: int, new_status: JobStatus, stored_seq: int | None, stored_final: bool) -> bool:
    """True when a transition may replace what a store holds: newer, and not un-finishing a final job."""
    if stored_seq is None:
        return True
    if new_seq <= stored_seq:
        return False
    return new_status.is_final or not stored_final


class Transition(BaseModel):
    """One observed change of a job: the job as it is after the change, and where that change sits in time."""

    model_config = ConfigDict(frozen=True)

    job: Job
    seq: int = Field(ge=0)
    event_id: str = Field(min_length=1)
    occurred: datetime
    #: Set by the mirror service for a transition that arrived after a newer one of the same job: the
    #: stores record it in the job's history but leave the current job alone.
    history_only: bool = False

    @field_validator("occurred")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    @classmethod
    def of(
        cls, job: Job, occurred: datetime, *, event_id: str | None = None, tiebreak: int = 0
    ) -> Transition:
        """A transition whose ``seq`` derives from ``occurred`` (the Prefect state timestamp)."""
        return cls(
            job=job.model_copy(deep=True),
            seq=sequence_for(occurred, tiebreak),
            event_id=event_id or str(uuid.uuid4()),
            occurred=occurred,
        )

    @property
    def is_final(self) -> bool:
        """True when this transition puts the job in a final status."""
        return self.job.status.is_final

    def history_entry(self) -> HistoryEntry:
        """What the history collection/items record for this transition."""
        return HistoryEntry(
            job_id=self.job.id,
            seq=self.seq,
            event_id=self.event_id,
            status=self.job.status,
            progress=exact_decimal(self.job.progress),
            occurred=self.occurred,
        )


class HistoryEntry(BaseModel):
    """One recorded status/progress change of a job, as read back from a store's history."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    seq: int
    event_id: str
    status: JobStatus
    progress: Decimal
    occurred: datetime

    @field_validator("occurred")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)
