"""ScientistCloud's Mongo ``jobs`` documents and ``visstoredatas`` dataset statuses <-> canonical Jobs.

Two writers shared the ``jobs`` collection: SCLib_JobQueueManager (``parameters``, ``priority`` 1-3,
``attempts``/``max_attempts``, statuses pending/running/completed/failed/retrying/cancelled, workers polling
``find({'status': 'pending'}).sort([('priority', 1), ('created_at', 1)])``) and SCLib_UploadProcessor
(``job_id='upload_{epoch}_{hex}'``, a full ``config`` dict, UploadStatus statuses such as 'queued'). Decoding
reads both; encoding writes back the layout a record came in, and the JobQueueManager layout for new jobs.

Documents are read as pymongo returns them (naive UTC datetimes, or aware ones with ``tz_aware=True``);
Extended JSON ``{"$date": ...}`` and ISO strings are accepted too. Encoding writes naive UTC datetimes
truncated to the millisecond a BSON date keeps: what it returns is what the collection will hold.

Canonical fields the layout has no place for (name, org, tags, progress, ...) go in one sub-document,
``jobbridge``, which the legacy readers ignore; it is written only when the legacy fields alone would read
back differently. Each entry keeps the value the legacy fields implied when it was written and applies
only while they still imply it, so a ScientistCloud worker that later sets the status (or any other field)
wins over what jobbridge wrote (see :mod:`jobbridge.legacy.extension`).

The dataset status string in ``visstoredatas`` is a second, coarser vocabulary that depends on the job
type: see :func:`dataset_status` and :func:`status_from_dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from jobbridge.jobs import DEFAULT_PRIORITY, FINAL_STATUSES, LEGACY_TYPE_ALIASES, Job, JobStatus, JobType
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, build_job, job_id_for
from jobbridge.legacy.extension import EXTENSION, apply_overrides, overrides_for, read_overrides
from jobbridge.legacy.values import BadField, map_field, parse_timestamp, text_field

SYSTEM = "scientistcloud"

#: ``jobs`` status -> canonical status: SC_JobStatus plus the UploadStatus values of upload documents.
TO_CANONICAL: dict[str, JobStatus] = {
    "pending": JobStatus.PENDING,  # what the workers poll for: accepted, waiting
    "queued": JobStatus.QUEUED,  # UploadStatus: queued for the upload processor
    "initializing": JobStatus.RUNNING,  # UploadStatus: the upload has started
    "running": JobStatus.RUNNING,
    "uploading": JobStatus.RUNNING,  # UploadStatus
    "processing": JobStatus.RUNNING,  # UploadStatus: post-upload processing
    "retrying": JobStatus.RETRYING,  # in SC_JobStatus though the code never writes it (sample sc-job-09)
    "paused": JobStatus.PAUSED,  # UploadStatus
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
}

#: canonical status -> ``jobs`` status. A record's own spelling is written back while it still means the
#: job's status (so an upload document stays 'queued'); this table is for everything else.
FROM_CANONICAL: dict[JobStatus, str] = {
    JobStatus.PENDING: "pending",
    JobStatus.QUEUED: "pending",  # legacy workers and dashboards look for 'pending'
    JobStatus.RUNNING: "running",
    JobStatus.RETRYING: "retrying",
    JobStatus.PAUSED: "paused",
    JobStatus.CANCELLING: "running",  # still active until it stops; no cancelling state
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.CRASHED: "failed",
}

#: what a legacy reader sees for statuses it cannot tell apart (``jobbridge`` keeps the exact one).
COARSER: dict[JobStatus, JobStatus] = {
    JobStatus.QUEUED: JobStatus.PENDING,
    JobStatus.CANCELLING: JobStatus.RUNNING,
    JobStatus.CRASHED: JobStatus.FAILED,
}

#: canonical type -> the ScientistCloud job type written for new jobs (inverse of LEGACY_TYPE_ALIASES;
#: ``rsync_transfer`` also became ``sync`` and is kept through the record's own spelling).
LEGACY_TYPES: dict[str, str] = {
    JobType.SYNC: "google_sync",
    JobType.UPLOAD: "file_upload",
    JobType.CONVERT: "dataset_conversion",
    JobType.EXTRACT: "file_extraction",
    JobType.COMPRESS: "data_compression",
    JobType.BACKUP: "backup_creation",
    JobType.VALIDATE: "data_validation",
}

#: max_attempts per legacy job type (SC_JOB_TYPE_CONFIGS); 3 for anything else.
MAX_ATTEMPTS: dict[str, int] = {
    "google_sync": 3,
    "dataset_conversion": 2,
    "file_upload": 5,
    "file_extraction": 3,
    "data_compression": 2,
    "rsync_transfer": 3,
    "backup_creation": 2,
    "data_validation": 2,
}

OVERRIDES = EXTENSION
QUEUE_LAYOUT, UPLOAD_LAYOUT = "job_queue", "upload"
_QUEUE_FIELDS = frozenset(
    {"job_id", "job_type", "status", "priority", "created_at", "started_at", "completed_at", "attempts"}
    | {"parameters", "result", "error", "user_email", OVERRIDES}
)
_UPLOAD_FIELDS = frozenset(
    {"job_id", "job_type", "status", "created_at", "started_at", "completed_at", "config", "error"}
    | {"user_email", OVERRIDES}
)
_LEGACY_FIELD = {"type": "job_type", "owner": "user_email"}
#: What a ScientistCloud worker writes into a ``jobs`` document while it runs the job (``encode`` writes their
#: initial values): a mirror sets them only when it creates the document, never over a worker's values.
WORKER_FIELDS = ("worker_id", "pid", "lock_file", "logs")
#: The ``visstoredatas`` field that identifies a dataset (a job names it in ``parameters['dataset_uuid']``).
DATASET_KEY = "uuid"


# --- values -------------------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    """A Mongo date as aware UTC: datetime (naive = UTC, as utcnow() wrote it), ``$date``, ISO, epoch s."""
    if isinstance(value, Mapping) and "$date" in value:
        return _extended_date(value["$date"])
    if isinstance(value, Decimal):  # pymongo never returns one (BSON decimals are Decimal128): not a date
        raise ValueError(f"{value!r} is not a date")
    return parse_timestamp(value, noun="date")


def _extended_date(inner: Any) -> datetime | None:
    """Extended JSON ``$date``: ISO (relaxed), milliseconds (canonical ``$numberLong``) or a number."""
    if isinstance(inner, Mapping) and "$numberLong" in inner:
        inner = int(inner["$numberLong"])
    if isinstance(inner, int | float) and not isinstance(inner, bool):
        return datetime.fromtimestamp(inner / 1000, UTC)
    return parse_time(inner)


def _to_ms(moment: datetime) -> datetime:
    """Aware UTC truncated to milliseconds: the precision a BSON date keeps."""
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def to_mongo_time(moment: datetime | None) -> datetime | None:
    """Naive UTC to the millisecond, as ``utcnow()`` wrote it and pymongo returns it by default."""
    return None if moment is None else _to_ms(moment).replace(tzinfo=None)


def canonical_type(name: str) -> str:
    """A ScientistCloud job type as the canonical one; unknown names ('idx_rebuild') stay as they are."""
    key = name.strip().lower()
    return str(LEGACY_TYPE_ALIASES.get(key, key))


def _legacy_type(job_type: str, original: Any) -> str:
    """The ScientistCloud type name: the record's own spelling while it still means this type."""
    if isinstance(original, str) and canonical_type(original) == job_type:
        return original
    return LEGACY_TYPES.get(job_type, job_type)


def _legacy_status(status: JobStatus, original: Any) -> str:
    """The status to write: the record's own spelling while it still means this status."""
    if isinstance(original, str) and TO_CANONICAL.get(original) == status:
        return original
    return FROM_CANONICAL[status]


# --- the jobs codec -----------------------------------------------------------------------------------


class ScientistCloudJobCodec:
    """Documents of ScientistCloud's ``jobs`` collection <-> canonical Jobs."""

    system: ClassVar[str] = SYSTEM
    to_canonical: ClassVar[Mapping[str, JobStatus]] = TO_CANONICAL
    from_canonical: ClassVar[Mapping[JobStatus, str]] = FROM_CANONICAL
    coarser: ClassVar[Mapping[JobStatus, JobStatus]] = COARSER

    def _error(self, record_id: str, field_name: str, problem: str) -> LegacyDecodeError:
        return LegacyDecodeError(self.system, record_id, field_name, problem)

    def decode(self, record: Mapping[str, Any]) -> LegacyRecord:
        """Read one ``jobs`` document; a field that cannot be read raises LegacyDecodeError naming it."""
        record_id = _record_id(record)
        try:
            legacy_id = text_field(record, "job_id")
            fields, extra = _fields(record)
            overrides = _overrides(record)
        except BadField as exc:
            raise self._error(record_id, exc.field_name, exc.problem) from None
        base = self._build(record_id, legacy_id, fields)
        job = apply_overrides(base, overrides, self.system, record_id)
        return LegacyRecord(job=job, legacy_id=legacy_id, extra=extra)

    def _build(self, record_id: str, legacy_id: str, fields: Mapping[str, Any]) -> Job:
        """The Job, with a pydantic complaint turned into an error naming the legacy field."""
        full = {"id": job_id_for(legacy_id), **fields}
        return build_job(
            full, system=self.system, record_id=record_id, legacy_names=_LEGACY_FIELD, fallback="record"
        )

    def encode(self, record: LegacyRecord) -> list[dict[str, Any]]:
        """The ``jobs`` document for this job, in the layout the record came in (JobQueueManager if new)."""
        extra = record.extra
        doc = _upload_document(record) if extra.get("layout") == UPLOAD_LAYOUT else _queue_document(record)
        overrides = _overrides_for(record, doc)
        if overrides:
            doc[OVERRIDES] = overrides
        return [doc]


def _record_id(record: Mapping[str, Any]) -> str:
    """The document's ``job_id``, else its ``_id``, for error messages."""
    value = record.get("job_id") or record.get("_id")
    return str(value) if value else "<document without job_id>"


def _layout(doc: Mapping[str, Any]) -> str:
    """UploadProcessor documents hold a ``config`` dict and no ``parameters``."""
    return UPLOAD_LAYOUT if "config" in doc and "parameters" not in doc else QUEUE_LAYOUT


def _fields(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Canonical fields the legacy document carries, and what only the legacy layout holds."""
    layout = _layout(doc)
    legacy_type = text_field(doc, "job_type")
    status_text = text_field(doc, "status").strip().lower()
    if status_text not in TO_CANONICAL:
        raise BadField(
            "status", f"is {status_text!r}, not a ScientistCloud job status: use one of {list(TO_CANONICAL)}"
        )
    status = TO_CANONICAL[status_text]
    params = map_field(doc, "config" if layout == UPLOAD_LAYOUT else "parameters", noun="document")
    known = _UPLOAD_FIELDS if layout == UPLOAD_LAYOUT else _QUEUE_FIELDS
    extra = {
        "layout": layout,
        "job_type": legacy_type,
        "status": status_text,
        "fields": {k: v for k, v in doc.items() if k not in known},
    }
    created = _time(doc, "created_at") or _time(doc, "updated_at")
    if created is None:
        raise BadField("created_at", "is missing: a date is required")
    fields = {
        "name": _default_name(doc, legacy_type, params),
        "type": canonical_type(legacy_type),
        "parameters": params,
        "priority": DEFAULT_PRIORITY if doc.get("priority") is None else doc["priority"],
        "owner": doc.get("user_email") or params.get("user_email") or None,
        "status": status,
        "created_at": created,
        "started_at": _time(doc, "started_at"),
        "finished_at": _finished_at(doc, status),
        "attempts": _attempts(doc),
        "error": doc.get("error") or None,
        "result": doc.get("result"),
    }
    return fields, extra


def _default_name(doc: Mapping[str, Any], legacy_type: str, params: Mapping[str, Any]) -> str:
    """Legacy jobs have no name: the dataset's name when the upload config has one, else type and dataset."""
    dataset_name = params.get("dataset_name")
    if isinstance(dataset_name, str) and dataset_name.strip():
        return dataset_name[:200]
    return f"{legacy_type} {doc.get('dataset_uuid') or doc.get('job_id')}"[:200]


def _finished_at(doc: Mapping[str, Any], status: JobStatus) -> datetime | None:
    """``completed_at`` is only set for 'completed': a failed or cancelled job ended at its last update."""
    completed = _time(doc, "completed_at")
    if completed is None and status in FINAL_STATUSES:
        return _time(doc, "updated_at")
    return completed


def _attempts(doc: Mapping[str, Any]) -> int:
    value = doc.get("attempts")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise BadField("attempts", f"is {value!r}, not a whole number")
    return int(value)


def _queue_document(record: LegacyRecord) -> dict[str, Any]:
    """A JobQueueManager document (the shape ``create_job`` inserts); leftover legacy fields win defaults."""
    job, extra, fields = record.job, record.extra, record.extra.get("fields") or {}
    legacy_type = _legacy_type(job.type, extra.get("job_type"))
    defaults: dict[str, Any] = {
        "dataset_uuid": job.parameters.get("dataset_uuid"),
        "max_attempts": MAX_ATTEMPTS.get(legacy_type, 3),
        "worker_id": None,
        "pid": None,
        "lock_file": None,
        "logs": [],
    }
    last_update = parse_time(fields.get("updated_at"))
    times = [t for t in (job.created_at, job.started_at, job.finished_at, last_update) if t is not None]
    core: dict[str, Any] = {
        "job_id": record.legacy_id,
        "job_type": legacy_type,
        "status": _legacy_status(job.status, extra.get("status")),
        "priority": job.priority,
        "created_at": to_mongo_time(job.created_at),
        "started_at": to_mongo_time(job.started_at),
        "completed_at": to_mongo_time(job.finished_at) if job.status is JobStatus.COMPLETED else None,
        "attempts": job.attempts,
        "parameters": dict(job.parameters),
        "result": job.result,
        "error": job.error,
        "updated_at": to_mongo_time(max(times)),
    }
    if job.owner and job.owner != job.parameters.get("user_email"):
        core["user_email"] = job.owner
    return {**defaults, **fields, **core}


def _upload_document(record: LegacyRecord) -> dict[str, Any]:
    """An UploadProcessor document: ``config`` holds the parameters, no priority or attempts."""
    job, extra = record.job, record.extra
    doc: dict[str, Any] = {
        **(extra.get("fields") or {}),
        "job_id": record.legacy_id,
        "job_type": _legacy_type(job.type, extra.get("job_type")),
        "status": _legacy_status(job.status, extra.get("status")),
        "created_at": to_mongo_time(job.created_at),
        "config": dict(job.parameters),
    }
    if job.owner:
        doc["user_email"] = job.owner
    optional = {
        "started_at": to_mongo_time(job.started_at),
        "completed_at": to_mongo_time(job.finished_at),
        "error": job.error,
    }
    doc.update({k: v for k, v in optional.items() if v is not None})
    return doc


def _overrides_for(record: LegacyRecord, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical fields the legacy fields would read back differently (timestamps compared to the ms)."""
    fields, _ = _fields(doc)
    derived = Job(id=record.job.id, **fields)
    return overrides_for(record.job, derived, lambda v: _to_ms(v) if isinstance(v, datetime) else v)


def _overrides(doc: Mapping[str, Any]) -> dict[str, Any]:
    return read_overrides(doc, noun="sub-document", fields_noun="Job fields")


def _time(doc: Mapping[str, Any], name: str) -> datetime | None:
    try:
        return parse_time(doc.get(name))
    except ValueError as exc:
        raise BadField(name, f"is not a date ({exc})") from None


# --- visstoredatas dataset status -----------------------------------------------------------------------

#: dataset status -> canonical status: SC_DatasetStatus, the HEAD BackgroundService's 'conversion failed'
#: and what UploadProcessor._map_upload_status_to_dataset_status writes. 'unknown' (its fallback) is refused.
DATASET_TO_CANONICAL: dict[str, JobStatus] = {
    "submitted": JobStatus.PENDING,
    "sync queued": JobStatus.QUEUED,
    "conversion queued": JobStatus.QUEUED,
    "upload queued": JobStatus.QUEUED,
    "syncing": JobStatus.RUNNING,
    "converting": JobStatus.RUNNING,
    "uploading": JobStatus.RUNNING,
    "unzipping": JobStatus.RUNNING,
    "zipping": JobStatus.RUNNING,
    "processing": JobStatus.RUNNING,
    "retrying": JobStatus.RETRYING,
    "paused": JobStatus.PAUSED,
    "done": JobStatus.COMPLETED,
    "completed": JobStatus.COMPLETED,
    "sync error": JobStatus.FAILED,
    "conversion error": JobStatus.FAILED,
    "conversion failed": JobStatus.FAILED,
    "upload error": JobStatus.FAILED,
    "unzip error": JobStatus.FAILED,
    "compression error": JobStatus.FAILED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
}

#: per canonical type: (queued, running, error) dataset strings. Types with no queued string use
#: 'submitted' (waiting for processing); types with no strings of their own use the generic ones.
_DATASET_PHASES: dict[str, tuple[str, str, str]] = {
    JobType.SYNC: ("sync queued", "syncing", "sync error"),
    JobType.CONVERT: ("conversion queued", "converting", "conversion failed"),  # as HEAD writes it
    JobType.UPLOAD: ("upload queued", "uploading", "upload error"),
    JobType.EXTRACT: ("submitted", "unzipping", "unzip error"),
    JobType.COMPRESS: ("submitted", "zipping", "compression error"),
}
_GENERIC_PHASES = ("submitted", "processing", "failed")

#: dataset statuses can tell even less apart than ``jobs`` statuses.
DATASET_COARSER: dict[JobStatus, JobStatus] = {
    JobStatus.QUEUED: JobStatus.PENDING,  # only for types without a '... queued' string
    JobStatus.CANCELLING: JobStatus.RUNNING,
    JobStatus.CRASHED: JobStatus.FAILED,
}


def dataset_uuid(job: Job) -> str | None:
    """The dataset a job works on (``parameters['dataset_uuid']`` as in ScientistCloud's jobs), if any."""
    value = job.parameters.get("dataset_uuid")
    return value if isinstance(value, str) and value.strip() else None


def dataset_status(job: Job) -> str:
    """The ``visstoredatas`` status string that shows this job's state on its dataset."""
    queued, running, error = _DATASET_PHASES.get(job.type, _GENERIC_PHASES)
    by_status = {
        JobStatus.PENDING: "submitted",
        JobStatus.QUEUED: queued,
        JobStatus.RUNNING: running,
        JobStatus.CANCELLING: running,
        JobStatus.RETRYING: "retrying",
        JobStatus.PAUSED: "paused",
        JobStatus.COMPLETED: "done",
        JobStatus.FAILED: error,
        JobStatus.CRASHED: error,
        JobStatus.CANCELLED: "cancelled",
    }
    return by_status[job.status]


def status_from_dataset(status: str, record_id: str = "<dataset>") -> JobStatus:
    """The canonical status a dataset status string means; anything else raises naming the record."""
    key = status.strip().lower() if isinstance(status, str) else status
    if key not in DATASET_TO_CANONICAL:
        raise LegacyDecodeError(
            SYSTEM,
            record_id,
            "status",
            f"is {status!r}, not a ScientistCloud dataset status: use one of {list(DATASET_TO_CANONICAL)}",
        )
    return DATASET_TO_CANONICAL[key]
