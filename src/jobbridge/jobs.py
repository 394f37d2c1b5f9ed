"""The Job model and the canonical vocabulary every other module speaks.

One job is one Prefect flow run (the job id is the flow run id). The model accepts the spellings the five
legacy systems used (``job_type``, ``config``, priority names) so that their records and clients read in
without a translation layer, and it always writes the canonical names so that a Job serialised to JSON reads
back equal (the receipt_trainer Job could not read its own JSON).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)


class JobStatus(StrEnum):
    """Canonical job status; every store and legacy vocabulary maps onto these."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"

    @property
    def is_final(self) -> bool:
        """True for the states a job never leaves by itself."""
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.CRASHED})


class JobType(StrEnum):
    """The built-in job types (custom ones are registered in :mod:`jobbridge.registry`)."""

    SYNC = "sync"
    UPLOAD = "upload"
    CONVERT = "convert"
    EXTRACT = "extract"
    COMPRESS = "compress"
    BACKUP = "backup"
    VALIDATE = "validate"
    TRAIN = "train"
    COMMAND = "command"
    BATCH = "batch"


#: ScientistCloud's job type names, read as the canonical type they became.
LEGACY_TYPE_ALIASES: dict[str, str] = {
    "google_sync": JobType.SYNC,
    "rsync_transfer": JobType.SYNC,
    "file_upload": JobType.UPLOAD,
    "dataset_conversion": JobType.CONVERT,
    "file_extraction": JobType.EXTRACT,
    "data_compression": JobType.COMPRESS,
    "backup_creation": JobType.BACKUP,
    "data_validation": JobType.VALIDATE,
}

#: Priority names accepted on input; 1 is the highest priority, 3 the lowest.
PRIORITY_NAMES: dict[str, int] = {"critical": 1, "high": 1, "medium": 2, "normal": 2, "low": 3}
DEFAULT_PRIORITY = 2

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")


def normalise_type(value: str) -> str:
    """Lower-case a job type name and map legacy names onto canonical ones."""
    name = value.strip().lower()
    return str(LEGACY_TYPE_ALIASES.get(name, name))


def parse_priority(value: Any) -> int:
    """Read a priority given as 1-3, "1"-"3" or one of :data:`PRIORITY_NAMES`."""
    if isinstance(value, bool):
        raise ValueError("priority must be 1, 2, 3 or one of low/medium/high/critical")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES[text]
        if text.isdigit():
            value = int(text)
    if isinstance(value, int | float) and float(value).is_integer() and 1 <= int(value) <= 3:
        return int(value)
    raise ValueError(
        f"priority {value!r} is not accepted: use 1 (high), 2, 3 (low) or one of low/medium/high/critical"
    )


def as_utc(value: datetime) -> datetime:
    """Make a datetime timezone-aware UTC; a naive one is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class JobItem(BaseModel):
    """One item of a batch job, with its own status."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: JobStatus = JobStatus.PENDING
    error: str | None = None
    result: Any = None


class Job(BaseModel):
    """A unit of work of a registered type, run as one Prefect flow run."""

    model_config = ConfigDict(
        populate_by_name=True, extra="forbid", validate_assignment=True, use_enum_values=False
    )

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: str = Field(min_length=1, max_length=200)
    type: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: int = DEFAULT_PRIORITY
    org: str | None = None
    owner: str | None = None
    tags: list[str] = Field(default_factory=list)
    status: JobStatus = JobStatus.PENDING
    progress: float = Field(default=0.0, ge=0.0, le=100.0)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(default=0, ge=0)
    error: str | None = None
    result: Any = None
    items: list[JobItem] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _accept_legacy_spellings(cls, data: Any) -> Any:
        """Fold ``job_type`` into ``type`` and ``config`` into ``parameters``; conflicting pairs fail."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for canonical, alias in (("type", "job_type"), ("parameters", "config")):
            if alias in data:
                aliased = data.pop(alias)
                if canonical in data and data[canonical] != aliased:
                    raise ValueError(
                        f"'{canonical}' ({data[canonical]!r}) and '{alias}' ({aliased!r}) disagree: "
                        f"give only one of them ('{alias}' is an alias of '{canonical}')"
                    )
                data[canonical] = aliased
        return data

    @field_validator("id")
    @classmethod
    def _id_is_uuid(cls, value: str) -> str:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise ValueError(f"id {value!r} is not a UUID") from None

    @field_validator("type")
    @classmethod
    def _type_is_a_name(cls, value: str) -> str:
        name = normalise_type(value)
        if not _TYPE_NAME.match(name):
            raise ValueError(
                f"type {value!r} is not a job type name: use lower-case letters, digits, '_' or '-'"
            )
        return name

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> int:
        return parse_priority(value)

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("created_at", "started_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else as_utc(value)

    @field_serializer("created_at", "started_at", "finished_at")
    def _iso(self, value: datetime | None) -> str | None:
        return None if value is None else value.isoformat().replace("+00:00", "Z")

    @property
    def job_type(self) -> str:
        """The receipt_trainer spelling of :attr:`type`."""
        return self.type

    @property
    def config(self) -> dict[str, Any]:
        """The receipt_trainer spelling of :attr:`parameters`."""
        return self.parameters

    @property
    def is_final(self) -> bool:
        """True once the job has reached a final status."""
        return self.status.is_final

    def to_json(self) -> str:
        """The job as JSON with canonical field names and ISO 8601 UTC timestamps."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        """Read a job written by :meth:`to_json` (or any JSON using the accepted spellings)."""
        return cls.model_validate_json(text)


#: Prefect state names whose meaning is finer than their state type.
_PREFECT_NAMED_STATUSES: dict[str, JobStatus] = {
    "awaitingretry": JobStatus.RETRYING,
    "awaitingconcurrencyslot": JobStatus.PENDING,
}

#: Prefect state type -> canonical status (the default for every name of that type).
_PREFECT_TYPE_STATUSES: dict[str, JobStatus] = {
    "SCHEDULED": JobStatus.QUEUED,
    "PENDING": JobStatus.QUEUED,
    "RUNNING": JobStatus.RUNNING,
    "PAUSED": JobStatus.PAUSED,
    "CANCELLING": JobStatus.CANCELLING,
    "COMPLETED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLED": JobStatus.CANCELLED,
    "CRASHED": JobStatus.CRASHED,
}


def status_from_prefect(state_type: str | None, state_name: str | None = None) -> JobStatus:
    """Map a Prefect state (type and name) onto the canonical status.

    Scheduled, Late, Pending, Submitting and InfrastructurePending are QUEUED (ready for a worker);
    AwaitingRetry is RETRYING; AwaitingConcurrencySlot is PENDING (waiting for a slot); Retrying is a
    running attempt and so RUNNING; Paused and Suspended are PAUSED. A run with no state yet is PENDING.
    """
    if state_type is None:
        return JobStatus.PENDING
    type_key = str(getattr(state_type, "value", state_type)).upper()
    if type_key not in _PREFECT_TYPE_STATUSES:
        raise ValueError(f"unknown Prefect state type {state_type!r}")
    name_key = (state_name or "").replace(" ", "").lower()
    if name_key in _PREFECT_NAMED_STATUSES:
        return _PREFECT_NAMED_STATUSES[name_key]
    return _PREFECT_TYPE_STATUSES[type_key]
