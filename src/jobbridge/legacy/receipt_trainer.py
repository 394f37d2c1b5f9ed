"""receipt_trainer's DynamoDB single-table job records <-> canonical Jobs.

One ``JOB`` item per job (``PK=JOB#{id}``, ``SK=JOB``, GSI1 ``STATUS#``/``CREATED#``, ``TYPE=JOB``) kept
current, append-only ``STATUS#{iso}`` and ``LOG#{iso}`` history beside it, and ``Job.to_json()`` SQS bodies.
Items are read as boto3's resource API returns them (Decimal) or as DynamoDB JSON (exports, low-level
client). Canonical fields the JOB item cannot hold go in one map attribute, ``jobbridge`` (``item_to_job``
ignores it), written only when the legacy attributes alone would read back differently; each entry applies
only while the attributes still imply what they implied when it was written, so the legacy processor's
later change (claiming, finishing the job) wins (see :mod:`jobbridge.legacy.extension`).

Times: receipt_trainer wrote ``datetime.now().isoformat()``, naive local time; its EC2 and container hosts
ran on UTC, so naive means UTC unless ``local_tz`` says otherwise. Encoding writes naive ISO in that zone
with microseconds: fixed width, so ``STATUS#``/``LOG#`` sort keys stay in time order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from boto3.dynamodb.types import TypeDeserializer

from jobbridge.jobs import PRIORITY_NAMES, Job, JobStatus
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, build_job, job_id_for
from jobbridge.legacy.extension import EXTENSION, apply_overrides, overrides_for, read_overrides
from jobbridge.legacy.values import BadField, map_field, parse_timestamp, plain_number, text_field, to_decimal

#: receipt_trainer status -> canonical status; 'queued' (rt-job-09, by hand) is not in its validator list.
TO_CANONICAL: dict[str, JobStatus] = {
    "pending": JobStatus.PENDING,  # accepted, waiting on the SQS queue
    "queued": JobStatus.PENDING,  # not a receipt_trainer status: read as its 'pending'; encode repairs it
    "running": JobStatus.RUNNING,
    "interrupted": JobStatus.RETRYING,  # spot interruption: the processor re-queues it for another attempt
    "succeeded": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
}

#: canonical status -> the status receipt_trainer's readers accept (its validator list, nothing else).
FROM_CANONICAL: dict[JobStatus, str] = {
    JobStatus.PENDING: "pending",
    JobStatus.QUEUED: "pending",  # one waiting state only
    JobStatus.RUNNING: "running",
    JobStatus.RETRYING: "interrupted",
    JobStatus.PAUSED: "pending",  # no paused state: a paused job is waiting
    JobStatus.CANCELLING: "running",  # still active until it stops; 'cancelled' early would be a lie
    JobStatus.COMPLETED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.CRASHED: "failed",
}

#: what a legacy reader sees for statuses it cannot tell apart (``jobbridge`` keeps the exact one).
COARSER: dict[JobStatus, JobStatus] = {
    JobStatus.QUEUED: JobStatus.PENDING,
    JobStatus.PAUSED: JobStatus.PENDING,
    JobStatus.CANCELLING: JobStatus.RUNNING,
    JobStatus.CRASHED: JobStatus.FAILED,
}

LEGACY_PRIORITIES = ("low", "medium", "high", "critical")
_PRIORITY_FOR: dict[int, str] = {1: "high", 2: "medium", 3: "low"}
#: receipt_trainer job type names that became canonical types; other names are kept as they are.
TYPE_ALIASES: dict[str, str] = {"training": "train"}
_LEGACY_TYPE: dict[str, str] = {canonical: legacy for legacy, canonical in TYPE_ALIASES.items()}
#: The processor writes ``f"Job {name} of type {job_type}"`` as description: the item's only type.
_DESCRIPTION = re.compile(r"^Job (?P<name>.*) of type (?P<type>[A-Za-z0-9_\-]+)$", re.DOTALL)
DEFAULT_TYPE = "train"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OVERRIDES = EXTENSION
_JOB_ATTRIBUTES = frozenset({"PK", "SK", "GSI1PK", "GSI1SK", "TYPE", OVERRIDES, "name", "description"})
_JOB_ATTRIBUTES |= {"created_at", "created_by", "status", "priority", "job_config", "tags"}
_MESSAGE_FIELDS = frozenset({"name", "type", "job_type", "config", "job_id", "status", "priority", "tags"})
_MESSAGE_FIELDS |= {"created_at", "started_at", "completed_at", "attempt_count", "error_message"}
#: Job field -> the legacy name to put in an error message.
_LEGACY_FIELD = {"parameters": "job_config", "owner": "created_by", "type": "description"}
_DESERIALIZER = TypeDeserializer()


_BOOL_AS_NUMBER = (
    "a number attribute holding no number, e.g. a boolean written as {'N': 'True'} (a receipt_trainer "
    "serializer bug); DynamoDB rejects such an item, so it was never stored: write {'BOOL': true|false}"
)


@dataclass(frozen=True)
class StatusEntry:
    """One ``STATUS#`` history item, read."""

    job_id: str
    at: datetime
    legacy_status: str
    status: JobStatus
    message: str | None = None
    progress: float | None = None
    instance_id: str | None = None


def is_wire_item(item: Mapping[str, Any]) -> bool:
    """True for DynamoDB JSON: the key attribute is a type descriptor such as ``{"S": ...}``."""
    return isinstance(item.get("PK"), Mapping)


def plain(value: Any, path: str = "value") -> Any:
    """A boto3 resource value as plain Python: Decimal -> int/float, sets -> sorted lists."""
    if isinstance(value, Decimal):
        if not value.is_finite():  # TypeDeserializer reads {"N": "True"} as Decimal('NaN')
            raise BadField(path, f"is {_BOOL_AS_NUMBER}")
        return plain_number(value)
    if isinstance(value, Mapping):
        return {k: plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(plain(v, path) for v in value)
    if isinstance(value, list | tuple):
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def to_dynamo(value: Any) -> Any:
    """Plain Python as boto3's resource API stores it: numbers as Decimal (floats via repr, so exactly)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes | Decimal):
        return value
    if isinstance(value, int | float):
        return to_decimal(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_dynamo(v) for v in value]
    raise TypeError(f"{type(value).__name__} cannot be stored in DynamoDB")


def _tag_list(tags: Mapping[str, Any]) -> list[str]:
    """receipt_trainer tags are a map; canonical tags are strings ``key=value``."""
    return [f"{key}={value}" for key, value in tags.items()]


def canonical_type(name: str) -> str:
    """A receipt_trainer job type name as the canonical one ('training' -> 'train')."""
    key = name.strip().lower()
    return TYPE_ALIASES.get(key, key)


def _legacy_type(job_type: str, original: Any) -> str:
    """The receipt_trainer type name: the record's own spelling while it still means this type."""
    if isinstance(original, str) and canonical_type(original) == job_type:
        return original
    return _LEGACY_TYPE.get(job_type, job_type)


class ReceiptTrainerJobCodec:
    """receipt_trainer JOB items (and STATUS#/LOG# history, SQS bodies) <-> canonical Jobs."""

    system: ClassVar[str] = "receipt_trainer"
    to_canonical: ClassVar[Mapping[str, JobStatus]] = TO_CANONICAL
    from_canonical: ClassVar[Mapping[JobStatus, str]] = FROM_CANONICAL
    coarser: ClassVar[Mapping[JobStatus, JobStatus]] = COARSER

    def __init__(self, local_tz: tzinfo = UTC) -> None:
        self.local_tz = local_tz

    def _error(self, record_id: str, field_name: str, problem: str) -> LegacyDecodeError:
        return LegacyDecodeError(self.system, record_id, field_name, problem)

    def decode(self, record: Mapping[str, Any]) -> LegacyRecord:
        """Read a JOB item (resource values or DynamoDB JSON); a bad field raises LegacyDecodeError."""
        record_id = _record_id(record)
        try:
            item = self._plain_item(record)
            legacy_id = _job_id(item, "JOB")
            fields, extra = self._job_fields(item)
            overrides = read_overrides(item)
        except BadField as exc:
            raise self._error(record_id, exc.field_name, exc.problem) from None
        base = self._build(record_id, legacy_id, fields)
        job = apply_overrides(base, overrides, self.system, record_id)
        return LegacyRecord(job=job, legacy_id=legacy_id, extra=extra)

    def _plain_item(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if is_wire_item(record):  # boto3 reads {"N": "True"} as Decimal('NaN'), which plain() refuses
            try:
                record = {name: _DESERIALIZER.deserialize(value) for name, value in record.items()}
            except (TypeError, ValueError, AttributeError) as exc:
                raise BadField("item", f"is not DynamoDB JSON ({exc})") from None
        return {name: plain(value, name) for name, value in record.items()}

    def _job_fields(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Canonical fields the JOB item's attributes carry, and what only the legacy layout holds."""
        fields, extra = self._common(item, "job_config", _JOB_ATTRIBUTES)
        if "description" in item:
            extra["description"] = item["description"]
        fields |= {"type": self._type_of(item), "owner": item.get("created_by") or None}
        return fields, extra

    def _common(
        self, data: Mapping[str, Any], config: str, consumed: frozenset[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """What JOB items and SQS bodies share; their own spellings are kept in ``extra`` for encode."""
        status_text, priority_text = _text(data, "status").lower(), _text(data, "priority").lower()
        tags = data.get("tags")
        if tags is not None and not isinstance(tags, Mapping):
            raise BadField("tags", f"is {tags!r}, not a map of strings")
        extra: dict[str, Any] = {"status": status_text, "priority": priority_text}
        if tags is not None:
            extra["tags"] = dict(tags)
        extra["attributes"] = {k: v for k, v in data.items() if k not in consumed}
        fields = {
            "name": _text(data, "name"),
            "parameters": map_field(data, config),
            "priority": _priority(priority_text),
            "tags": _tag_list(tags or {}),
            "status": self._status(status_text),
            "created_at": self._at(data, "created_at"),
        }
        return fields, extra

    def _type_of(self, item: Mapping[str, Any]) -> str:
        """The type named in the processor's description; receipt_trainer jobs are training otherwise."""
        match = _DESCRIPTION.match(str(item.get("description") or ""))
        if match and match["name"] == item.get("name"):
            return canonical_type(match["type"])
        return DEFAULT_TYPE

    def _status(self, text: str) -> JobStatus:
        if text not in TO_CANONICAL:
            raise BadField(
                "status", f"is {text!r}, not a receipt_trainer status: use one of {list(TO_CANONICAL)}"
            )
        return TO_CANONICAL[text]

    def _time(self, item: Mapping[str, Any], name: str) -> datetime | None:
        try:
            return parse_timestamp(item.get(name), self.local_tz)  # SQS bodies hold epoch seconds
        except ValueError as exc:
            raise BadField(name, f"is not a timestamp ({exc})") from None

    def _at(self, item: Mapping[str, Any], name: str) -> datetime:
        """A required timestamp."""
        moment = self._time(item, name)
        if moment is None:
            raise BadField(name, "is missing: an ISO 8601 timestamp is required")
        return moment

    def _build(self, record_id: str, legacy_id: str, fields: Mapping[str, Any]) -> Job:
        """The Job, with a pydantic complaint turned into an error naming the legacy field."""
        full = {"id": job_id_for(legacy_id), **fields}
        return build_job(
            full, system=self.system, record_id=record_id, legacy_names=_LEGACY_FIELD, fallback="record"
        )

    def encode(self, record: LegacyRecord) -> list[dict[str, Any]]:
        """The JOB item with its GSI attributes (history: :meth:`status_item`, :meth:`log_item`)."""
        job, extra = record.job, record.extra
        created = self._iso(job.created_at)
        status = FROM_CANONICAL[job.status]
        item: dict[str, Any] = {
            "PK": f"JOB#{record.legacy_id}",
            "SK": "JOB",
            "GSI1PK": f"STATUS#{status}",
            "GSI1SK": f"CREATED#{created}",
            "TYPE": "JOB",
            "name": job.name,
            "description": self._description(job, extra),
            "created_at": created,
            "created_by": job.owner or "jobbridge",  # item_to_job requires a non-empty created_by
            "status": status,
            "priority": _priority_name(job.priority, extra.get("priority")),
            "job_config": to_dynamo(job.parameters),
        }
        tags = _tags_for(job.tags, extra.get("tags"))
        if tags is not None:
            item["tags"] = tags
        for name, value in (extra.get("attributes") or {}).items():
            item.setdefault(name, to_dynamo(value))
        overrides = self._overrides_for(record, item)
        if overrides:
            item[OVERRIDES] = to_dynamo(overrides)
        return [item]

    def _description(self, job: Job, extra: Mapping[str, Any]) -> str:
        if isinstance(extra.get("description"), str):
            return str(extra["description"])
        return f"Job {job.name} of type {_legacy_type(job.type, extra.get('job_type'))}"

    def _overrides_for(self, record: LegacyRecord, item: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical fields the legacy attributes would read back differently: kept in ``jobbridge``."""
        fields, _ = self._job_fields(self._plain_item(item))
        return overrides_for(record.job, Job(id=record.job.id, **fields))

    def _iso(self, moment: datetime) -> str:
        """Naive ISO in the legacy zone with microseconds, as ``datetime.now().isoformat()`` wrote it."""
        return moment.astimezone(self.local_tz).replace(tzinfo=None).isoformat(timespec="microseconds")

    def _history_keys(
        self, job: Job | LegacyRecord, at: datetime, kind: str
    ) -> tuple[str, str, dict[str, Any]]:
        """Job id, time stamp and the key attributes of a ``STATUS#``/``LOG#`` item."""
        job_id = job.legacy_id if isinstance(job, LegacyRecord) else job.id
        stamp = self._iso(at)
        return job_id, stamp, {"PK": f"JOB#{job_id}", "SK": f"{kind}#{stamp}", "TYPE": f"JOB_{kind}"}

    def status_item(
        self,
        job: Job | LegacyRecord,
        at: datetime,
        message: str | None = None,
        *,
        progress: float | None = None,
        instance_id: str | None = None,
    ) -> dict[str, Any]:
        """A ``STATUS#{iso}`` history item for the job's current status (the history is append-only)."""
        status = FROM_CANONICAL[job.job.status if isinstance(job, LegacyRecord) else job.status]
        _, stamp, item = self._history_keys(job, at, "STATUS")
        item |= {
            "GSI1PK": f"STATUS#{status}",
            "GSI1SK": f"UPDATED#{stamp}",
            "status": status,
            "updated_at": stamp,
        }
        optional = {"message": message, "progress": progress, "instance_id": instance_id}
        return item | {k: to_dynamo(v) for k, v in optional.items() if v is not None}

    def decode_status_item(self, record: Mapping[str, Any]) -> StatusEntry:
        """Read a ``STATUS#`` item; a bad field raises LegacyDecodeError naming it."""
        try:
            item = self._plain_item(record)
            legacy = _text(item, "status").lower()
            progress = item.get("progress")
            return StatusEntry(
                job_id=_job_id(item, "STATUS#"),
                at=self._at(item, "updated_at"),
                legacy_status=legacy,
                status=self._status(legacy),
                message=item.get("message"),
                progress=None if progress is None else _number(progress, "progress"),
                instance_id=item.get("instance_id"),
            )
        except BadField as exc:
            raise self._error(_record_id(record), exc.field_name, exc.problem) from None

    def latest_status(self, records: Sequence[Mapping[str, Any]]) -> StatusEntry | None:
        """The newest STATUS# entry, as the legacy query (``ScanIndexForward=False, Limit=1``) found it."""
        entries = [self.decode_status_item(r) for r in records if str(_key(r, "SK")).startswith("STATUS#")]
        return max(entries, key=lambda entry: entry.at, default=None)

    def log_item(
        self,
        job: Job | LegacyRecord,
        at: datetime,
        level: str,
        message: str,
        *,
        source: str | None = None,
        exception: str | None = None,
    ) -> dict[str, Any]:
        """A ``LOG#{iso}`` item; ``level`` is one of receipt_trainer's log levels."""
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"log level {level!r} is not accepted: use one of {', '.join(LOG_LEVELS)}")
        job_id, stamp, item = self._history_keys(job, at, "LOG")
        item |= {
            "GSI1PK": "LOG",
            "GSI1SK": f"JOB#{job_id}#{stamp}",
            "log_level": level.upper(),
            "message": message,
        }
        return item | {k: v for k, v in {"source": source, "exception": exception}.items() if v is not None}

    def decode_message_body(self, body: str | bytes) -> LegacyRecord:
        """Read a ``Job.to_json()`` SQS body: both 'type' and 'job_type', epoch-float timestamps."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise self._error("<SQS message>", "Body", f"is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise self._error("<SQS message>", "Body", "is not a JSON object")
        record_id = str(data.get("job_id") or "<SQS message without job_id>")
        try:
            fields, extra = self._message_fields(data)
        except BadField as exc:
            raise self._error(record_id, exc.field_name, exc.problem) from None
        return LegacyRecord(job=self._build(record_id, record_id, fields), legacy_id=record_id, extra=extra)

    def _message_fields(self, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        legacy_type = _message_type(data)
        _text(data, "job_id")
        fields, extra = self._common(data, "config", _MESSAGE_FIELDS)
        extra["job_type"] = legacy_type
        fields |= {
            "type": canonical_type(legacy_type),
            "started_at": self._time(data, "started_at"),
            "finished_at": self._time(data, "completed_at"),
            "attempts": _number(data.get("attempt_count") or 0, "attempt_count"),
            "error": data.get("error_message") or None,
        }
        return fields, extra


def _record_id(record: Mapping[str, Any]) -> str:
    """The record's key for error messages: ``PK`` (and ``SK`` for history items)."""
    pk, sk = _key(record, "PK"), _key(record, "SK")
    if not pk:
        return "<item without PK>"
    return str(pk) if sk in (None, "JOB") else f"{pk} {sk}"


def _key(record: Mapping[str, Any], name: str) -> Any:
    value = record.get(name)
    return value.get("S") if isinstance(value, Mapping) else value


def _job_id(item: Mapping[str, Any], sort_key: str) -> str:
    """The job id of ``PK=JOB#{id}``, checking the sort key is the expected kind of item."""
    pk, sk = str(item.get("PK") or ""), str(item.get("SK") or "")
    if not pk.startswith("JOB#") or len(pk) == 4:
        raise BadField("PK", f"is {pk!r}: expected 'JOB#{{job_id}}'")
    if not (sk == sort_key if sort_key == "JOB" else sk.startswith(sort_key)):
        raise BadField("SK", f"is {sk!r}: expected {sort_key!r} for this kind of item")
    return pk[4:]


def _text(item: Mapping[str, Any], name: str) -> str:
    """receipt_trainer's validator accepted whitespace-only strings, so they read as given."""
    return text_field(item, name, blank_ok=True)


def _number(value: Any, name: str) -> int | float:
    """A number that may arrive as Decimal, int, float or a string such as '5e-05'."""
    if isinstance(value, bool):
        raise BadField(name, f"is the boolean {value!r}, not a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise BadField(name, f"is {value!r}, not a number")
    return plain_number(number)


def _priority(text: str) -> int:
    if text not in LEGACY_PRIORITIES:
        raise BadField("priority", f"is {text!r}: use one of {', '.join(LEGACY_PRIORITIES)}")
    return PRIORITY_NAMES[text]


def _priority_name(priority: int, original: Any) -> str:
    """The legacy priority name: the record's own ('critical') while it still means this priority."""
    legacy = original in LEGACY_PRIORITIES and PRIORITY_NAMES[original] == priority
    return str(original) if legacy else _PRIORITY_FOR[priority]


def _tags_for(tags: Sequence[str], original: Any) -> dict[str, str] | None:
    """The tags map to write: the record's own map while it still reads as these tags."""
    if isinstance(original, Mapping) and _tag_list(original) == list(tags):
        return dict(original)
    pairs = (tag.partition("=") for tag in tags)  # a tag without '=' becomes a key with no value
    return {key: value for key, _, value in pairs} if tags else None


def _message_type(data: Mapping[str, Any]) -> str:
    """``Job.to_json`` writes the type twice; both must agree."""
    given = {key: data[key] for key in ("type", "job_type") if data.get(key) is not None}
    if not given:
        raise BadField("type", "is missing (neither 'type' nor 'job_type' is set)")
    if len(set(given.values())) > 1:
        raise BadField("job_type", f"is {given['job_type']!r} but 'type' is {given['type']!r}")
    value = next(iter(given.values()))
    if not isinstance(value, str):
        raise BadField("type", f"is {value!r}, not a job type name")
    return value
