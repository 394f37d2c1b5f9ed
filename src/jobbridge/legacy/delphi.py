"""Delphi (polis analytics) job records: ``Delphi_JobQueue`` items <-> canonical Jobs.

The legacy poller (``delphi/scripts/job_poller.py``) and the server (``routes/delphi/jobs.ts``) keep reading
and writing this table while jobbridge mirrors into it, so :meth:`DelphiJobCodec.encode` writes exactly what
they read:

* ``job_config``, ``job_results`` and ``logs`` as JSON *strings* (the poller calls ``json.loads`` on them);
* the GSI key placeholders the API writes: ``worker_id='none'`` while unclaimed (WorkerStatusIndex keys cannot
  be empty) and ``started_at``/``completed_at`` as ``''`` until set;
* ``version`` (the poller's optimistic lock; kept from ``extra``, 1 for a new item), ``priority`` 0-100 and
  timestamps as ISO strings with ``+00:00`` (the poller compares ``lock_expires_at`` as strings).

Mapping decisions:

* **status**: one table both ways (see the class); a stored status is written back while it still means the
  job's status, so ``LOCKED_FOR_CHECKING`` or ``AWAITING_RECHECK`` survive a round trip.
* **type**: ``job_type`` in lower case (``FULL_PIPELINE`` -> ``full_pipeline``, ``CREATE_NARRATIVE_BATCH`` ->
  ``create_narrative_batch``); the original spelling stays in ``extra['job_type']`` and is written back. A
  missing ``job_type`` reads as ``full_pipeline``, which is what the poller runs for it.
* **priority**: Delphi's 0-100 (100 highest) in bands: >= 67 -> 1, >= 34 -> 2, else 3. The stored number is
  written back while it is still in the job's band, else the band's number (80, 50, 20).
* **parameters** = ``job_config``; **result** = ``job_results`` without its ``error`` key (``{}`` -> None);
  **error** = ``job_results['error']`` (where ``complete_job`` puts it).
* **attempts** = ``retry_count`` plus one once ``started_at`` is set; **finished_at** = ``completed_at``.
* **timestamps**: the three flavours (JS ``...Z``, naive, ``+00:00``) all read; a naive one is UTC (the
  samples' notes give no other zone). A stored string is written back unchanged while it denotes the same
  instant, so round trips keep each item's own flavour.
* every other attribute (``conversation_id``, ``report_id``, ``worker_id``, ``lock_expires_at``, ``version``,
  ``logs``, ``environment``, ``batch_id`` ...) is legacy-only: it goes to ``extra`` as stored (Decimal numbers
  as int/float) and encode restores it. For a job built from scratch, ``conversation_id``/``report_id`` are
  taken from its parameters so the poller's ``--zid``/``--rid`` and ConversationIndex keep working.
* canonical fields this layout cannot hold (name, progress, org, owner, tags, items, a status finer than
  Delphi's) go to the ``jobbridge`` attribute, a JSON string the legacy code ignores. Each entry keeps the
  value the layout implied when it was written and applies only while the layout still implies it, so a
  legacy writer's later change (the poller claiming or finishing the job) always wins.

Odd records: an item holding NULL or ``''`` in a GSI key attribute (the docs-only shape ``dl-15`` with
``worker_id: null``) can never be stored; decode rejects it with a LegacyDecodeError naming that attribute
instead of repairing it, because a repair would hide a writer that still produces it. The rest of the docs
shape (native maps for ``job_config``/``logs``, nulls for ``started_at``/``job_results``) decodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, ClassVar

from jobbridge.jobs import Job, JobStatus
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, build_job, job_id_for
from jobbridge.legacy.extension import EXTENSION, apply_sidecar, sidecar_for
from jobbridge.legacy.values import dynamo, json_value, parse_timestamp, plain

SYSTEM = "delphi"
TABLE_NAME = "Delphi_JobQueue"
#: Attribute holding the canonical fields the Delphi layout has no place for (a JSON string).
SIDECAR = EXTENSION
UNCLAIMED_WORKER = "none"

#: GSI key attributes: DynamoDB rejects an item with NULL or '' in any of them.
INDEX_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "status": "StatusCreatedIndex",
        "created_at": "StatusCreatedIndex",
        "conversation_id": "ConversationIndex",
        "job_type": "JobTypeIndex",
        "priority": "JobTypeIndex",
        "worker_id": "WorkerStatusIndex",
    }
)
#: Attributes decoded into Job fields and always rewritten from the Job (not copied to ``extra``).
_MAPPED = frozenset({"job_id", "job_config", "job_results", "retry_count", SIDECAR})
_BAND_PRIORITY: Mapping[int, int] = MappingProxyType({1: 80, 2: 50, 3: 20})
#: Job field -> the Delphi attribute it comes from, to name the field in errors.
_SOURCE_FIELD: Mapping[str, str] = MappingProxyType(
    {"type": "job_type", "parameters": "job_config", "name": "job_type", "result": "job_results"}
)


# ---- values -------------------------------------------------------------------------------------------


def parse_time(value: Any, record_id: str, field: str) -> datetime | None:
    """Read any of Delphi's timestamp flavours; '' and None mean "not set"; naive means UTC."""
    try:
        return parse_timestamp(value)
    except (TypeError, ValueError, OverflowError):
        raise LegacyDecodeError(SYSTEM, record_id, field, f"{value!r} is not an ISO 8601 timestamp") from None


def format_time(value: datetime) -> str:
    """The poller's own flavour: UTC with '+00:00' and microseconds (fixed width for string comparison)."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def time_text(original: Any, value: datetime | None) -> str:
    """The stored string while it still denotes ``value``; else ``value`` formatted ('' when unset)."""
    if value is None:
        return ""
    if isinstance(original, str) and original:
        try:
            if parse_time(original, "", "") == value:
                return original
        except LegacyDecodeError:
            pass
    return format_time(value)


def priority_band(value: Any, record_id: str) -> int:
    """Delphi's 0-100 priority (100 highest) as jobbridge's 1 (high) .. 3 (low)."""
    if value is None:
        return 2
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LegacyDecodeError(SYSTEM, record_id, "priority", f"{value!r} is not a number") from None
    return 1 if number >= 67 else 2 if number >= 34 else 3


def json_field(item: Mapping[str, Any], field: str, record_id: str) -> Any:
    """A field the legacy code stores as a JSON string; the docs shape stores a native map, read both."""
    try:
        return json_value(item.get(field))
    except ValueError as exc:
        raise LegacyDecodeError(SYSTEM, record_id, field, f"is not valid JSON ({exc})") from None


# ---- the codec ----------------------------------------------------------------------------------------


class DelphiJobCodec:
    """``Delphi_JobQueue`` items (as boto3's resource API returns them) <-> canonical Jobs."""

    system: ClassVar[str] = SYSTEM
    #: Every status Delphi's code or docs write. PENDING is claimable at once, hence QUEUED;
    #: AWAITING_RECHECK (a narrative batch still running at the provider, re-checked by the poller) and
    #: LOCKED_FOR_CHECKING (803_check_batch_status holds the parent while it checks) are work in progress.
    to_canonical: ClassVar[Mapping[str, JobStatus]] = MappingProxyType(
        {
            "PENDING": JobStatus.QUEUED,
            "PROCESSING": JobStatus.RUNNING,
            "AWAITING_RECHECK": JobStatus.RUNNING,
            "LOCKED_FOR_CHECKING": JobStatus.RUNNING,
            "COMPLETED": JobStatus.COMPLETED,
            "FAILED": JobStatus.FAILED,
            "CANCELLED": JobStatus.CANCELLED,
        }
    )
    #: What the poller should see. Waiting states are PENDING (the poller claims them, a retry included);
    #: PAUSED and CANCELLING are PROCESSING, which the poller leaves alone while no expired lock is set;
    #: CRASHED is FAILED. The sidecar keeps the finer canonical status while the item still says this.
    from_canonical: ClassVar[Mapping[JobStatus, str]] = MappingProxyType(
        {
            JobStatus.PENDING: "PENDING",
            JobStatus.QUEUED: "PENDING",
            JobStatus.RETRYING: "PENDING",
            JobStatus.RUNNING: "PROCESSING",
            JobStatus.PAUSED: "PROCESSING",
            JobStatus.CANCELLING: "PROCESSING",
            JobStatus.COMPLETED: "COMPLETED",
            JobStatus.FAILED: "FAILED",
            JobStatus.CRASHED: "FAILED",
            JobStatus.CANCELLED: "CANCELLED",
        }
    )

    def decode(self, record: Mapping[str, Any]) -> LegacyRecord:
        """Read one item; raises LegacyDecodeError naming the item and the attribute it cannot read."""
        record_id = self._record_id(record)
        self._check_index_keys(record, record_id)
        job = apply_sidecar(self._layout_job(record, record_id), record.get(SIDECAR), SYSTEM, record_id)
        extra = {key: plain(value) for key, value in record.items() if key not in _MAPPED}
        return LegacyRecord(job=job, legacy_id=record_id, extra=extra)

    def encode(self, record: LegacyRecord) -> list[dict[str, Any]]:
        """The one ``Delphi_JobQueue`` item for this job (Decimal numbers, JSON-string fields)."""
        item = self._layout_item(record)
        side = sidecar_for(record.job, self._layout_job(item, record.legacy_id))
        if side is not None:
            item[SIDECAR] = side
        return [item]

    # ---- decoding ----

    @staticmethod
    def _record_id(record: Mapping[str, Any]) -> str:
        """The item's ``job_id``, required: it is the table's hash key and names the record in errors."""
        value = record.get("job_id")
        if not isinstance(value, str) or not value.strip():
            raise LegacyDecodeError(SYSTEM, str(value), "job_id", "is missing or not a non-empty string")
        return value

    @staticmethod
    def _check_index_keys(record: Mapping[str, Any], record_id: str) -> None:
        """Reject NULL/'' in GSI key attributes: such an item cannot exist in the table (see module doc)."""
        for field, index in INDEX_KEYS.items():
            if field in record and (record[field] is None or record[field] == ""):
                raise LegacyDecodeError(
                    SYSTEM,
                    record_id,
                    field,
                    f"is null or empty, but it is a key of {index}, so DynamoDB rejects the item "
                    f"(an unclaimed job has worker_id {UNCLAIMED_WORKER!r}; leave other keys out)",
                )

    def _status(self, record: Mapping[str, Any], record_id: str) -> JobStatus:
        """The canonical status; an unknown one is an error, never a guess."""
        value = record.get("status")
        if not isinstance(value, str):
            raise LegacyDecodeError(SYSTEM, record_id, "status", "is missing or not a string")
        status = self.to_canonical.get(value) or self.to_canonical.get(value.strip().upper())
        if status is None:
            known = ", ".join(self.to_canonical)
            raise LegacyDecodeError(
                SYSTEM, record_id, "status", f"{value!r} is not a Delphi status ({known})"
            )
        return status

    def _layout_job(self, record: Mapping[str, Any], record_id: str) -> Job:
        """The Job the Delphi attributes alone describe (before the sidecar is applied)."""
        status = self._status(record, record_id)
        job_type = str(record.get("job_type") or "FULL_PIPELINE")
        created = parse_time(record.get("created_at"), record_id, "created_at")
        created = created or parse_time(record.get("updated_at"), record_id, "updated_at")
        if created is None:
            raise LegacyDecodeError(SYSTEM, record_id, "created_at", "is missing (and so is updated_at)")
        started = parse_time(record.get("started_at"), record_id, "started_at")
        error, result = self._results(record, record_id)
        fields = {
            "id": job_id_for(record_id),
            "name": self._name(job_type, record, record_id),
            "type": job_type.lower(),
            "parameters": self._parameters(record, record_id),
            "priority": priority_band(record.get("priority"), record_id),
            "status": status,
            "progress": 100.0 if status is JobStatus.COMPLETED else 0.0,
            "created_at": created,
            "started_at": started,
            "finished_at": parse_time(record.get("completed_at"), record_id, "completed_at"),
            "attempts": self._retries(record, record_id) + (1 if started else 0),
            "error": error,
            "result": result,
        }
        return build_job(
            fields,
            system=SYSTEM,
            record_id=record_id,
            legacy_names=_SOURCE_FIELD,
            fallback="job",
            problem="cannot be read",
        )

    @staticmethod
    def _name(job_type: str, record: Mapping[str, Any], record_id: str) -> str:
        """A readable name: the job type and its conversation (Delphi jobs have no name of their own)."""
        conversation = record.get("conversation_id")
        subject = f"conversation {plain(conversation)}" if conversation not in (None, "") else record_id
        return f"{job_type} {subject}"[:200]

    @staticmethod
    def _parameters(record: Mapping[str, Any], record_id: str) -> dict[str, Any]:
        """``job_config`` as a dict (absent -> {}, which is what the poller assumes)."""
        config = json_field(record, "job_config", record_id)
        if config is None:
            return {}
        if not isinstance(config, dict):
            raise LegacyDecodeError(SYSTEM, record_id, "job_config", "is not a JSON object")
        return config

    @staticmethod
    def _results(record: Mapping[str, Any], record_id: str) -> tuple[str | None, Any]:
        """(error, result) from ``job_results``; ``complete_job`` stores the error text under 'error'."""
        results = json_field(record, "job_results", record_id)
        if not isinstance(results, dict):
            return None, results
        results = dict(results)
        error = results.pop("error") if isinstance(results.get("error"), str) else None
        return error, results or None

    @staticmethod
    def _retries(record: Mapping[str, Any], record_id: str) -> int:
        """``retry_count`` as an int (absent -> 0, as for batch-report jobs)."""
        value = plain(record.get("retry_count", 0)) or 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LegacyDecodeError(SYSTEM, record_id, "retry_count", f"{value!r} is not a count")
        return value

    # ---- encoding ----

    def _layout_item(self, record: LegacyRecord) -> dict[str, Any]:
        """The item without the sidecar: legacy-only attributes from ``extra``, the rest from the Job."""
        job, extra = record.job, record.extra
        item: dict[str, Any] = {key: dynamo(value) for key, value in extra.items() if key not in _MAPPED}
        started = job.started_at is not None
        item.update(
            {
                "job_id": record.legacy_id,
                "status": self._status_text(job, extra),
                "job_type": self._job_type(job, extra),
                "priority": Decimal(self._priority(job, extra)),
                "created_at": time_text(extra.get("created_at"), job.created_at),
                "started_at": time_text(extra.get("started_at"), job.started_at),
                "completed_at": time_text(extra.get("completed_at"), job.finished_at),
                "updated_at": self._updated_at(job, extra),
                "worker_id": extra.get("worker_id") or UNCLAIMED_WORKER,
                "version": Decimal(int(extra.get("version") or 1)),
                "retry_count": Decimal(max(job.attempts - 1, 0) if started else job.attempts),
                "job_config": json.dumps(job.parameters),
                "job_results": json.dumps(self._job_results(job)),
                "logs": self._logs(extra.get("logs")),
            }
        )
        self._fill_conversation(item, job)
        return {key: value for key, value in item.items() if not self._empty_key(key, value)}

    def _status_text(self, job: Job, extra: Mapping[str, Any]) -> str:
        """The stored status while it still means the job's status (LOCKED_FOR_CHECKING stays), else ours."""
        original = extra.get("status")
        if isinstance(original, str) and self.to_canonical.get(original) is job.status:
            return original
        return self.from_canonical[job.status]

    @staticmethod
    def _job_type(job: Job, extra: Mapping[str, Any]) -> str:
        """The stored spelling while it still names the job's type, else the type in upper case."""
        original = extra.get("job_type")
        if isinstance(original, str) and original.lower() == job.type:
            return original
        return job.type.upper()

    @staticmethod
    def _priority(job: Job, extra: Mapping[str, Any]) -> int:
        """The stored 0-100 priority while it is in the job's band, else the band's number."""
        original = extra.get("priority")
        if isinstance(original, int | float) and priority_band(original, "") == job.priority:
            return round(original)
        return _BAND_PRIORITY[job.priority]

    @staticmethod
    def _updated_at(job: Job, extra: Mapping[str, Any]) -> str:
        """The stored ``updated_at``, or the job's latest timestamp for an item jobbridge creates."""
        original = extra.get("updated_at")
        if isinstance(original, str) and original:
            return original
        latest = max(t for t in (job.created_at, job.started_at, job.finished_at) if t is not None)
        return format_time(latest)

    @staticmethod
    def _job_results(job: Job) -> dict[str, Any]:
        """``job_results`` as ``complete_job`` writes it: the result dict plus 'error' when failed."""
        result = job.result
        results: dict[str, Any] = {} if result is None else dict(result) if isinstance(result, dict) else {}
        if result is not None and not isinstance(result, dict):
            results["result"] = result
        if job.error is not None:
            results["error"] = job.error
        return results

    @staticmethod
    def _logs(logs: Any) -> str:
        """Logs as the JSON string the poller appends to (a native map from the docs shape is dumped)."""
        if isinstance(logs, str) and logs:
            return logs
        return json.dumps(logs if isinstance(logs, dict) else {"entries": []})

    @staticmethod
    def _fill_conversation(item: dict[str, Any], job: Job) -> None:
        """For a job jobbridge created, take ``conversation_id``/``report_id`` from its parameters."""
        for key in ("conversation_id", "report_id"):
            value = job.parameters.get(key)
            if item.get(key) in (None, "") and isinstance(value, str | int) and not isinstance(value, bool):
                item[key] = str(value)

    @staticmethod
    def _empty_key(key: str, value: Any) -> bool:
        """True for a GSI key left NULL/'' (only conversation_id can be): such attributes are left out."""
        return key in INDEX_KEYS and (value is None or value == "")
