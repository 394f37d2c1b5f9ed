"""MongoDB writer and reader of the mirror, in jobbridge's own layout.

Layout: a ``jobs`` collection (``_id`` = job id) indexed on ``(org, status, created_at)`` and
``(type, created_at)``, and a ``job_events`` history collection with a unique index on ``(job_id, seq)``.
Both names take the mode's namespace prefix so TEST mode stays apart.

A transition is one client-level ``bulkWrite`` request (ordered): first a conditional upsert of the job on
``_id`` whose filter only matches a stored job with a smaller ``seq`` (and, for a non-final status, a job
that is not final), then the insert of the history event. When the stored job is newer, the filter matches
nothing, the upsert collides with the existing ``_id`` (duplicate key) and the ordered batch stops: a
stale or duplicated transition writes nothing. The history insert is itself idempotent through its unique
index. Timestamps are BSON dates (indexable, millisecond precision) with the exact ISO 8601 UTC string kept
beside them so that a job reads back unchanged.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pymongo import ASCENDING, InsertOne, UpdateOne
from pymongo.errors import ClientBulkWriteException

from jobbridge.jobs import Job, JobStatus
from jobbridge.mirror.transition import HistoryEntry, Transition, epoch_micros, iso_utc
from jobbridge.settings import Settings, get_settings

__all__ = ["DEFAULT_EVENTS", "DEFAULT_JOBS", "MongoJobStore", "default_collection_names"]

DEFAULT_JOBS = "jobs"
DEFAULT_EVENTS = "job_events"
DUPLICATE_KEY = 11000
_TIMESTAMPS = ("created_at", "started_at", "finished_at")

Document = dict[str, Any]


def default_collection_names(settings: Settings | None = None) -> tuple[str, str]:
    """The (jobs, job_events) collection names under this mode's namespace."""
    chosen = settings or get_settings()
    return chosen.namespaced(DEFAULT_JOBS), chosen.namespaced(DEFAULT_EVENTS)


def job_document(transition: Transition) -> Document:
    """The job document a transition leaves behind (without ``_id``, which the filter supplies)."""
    job = transition.job
    document: Document = job.model_dump(mode="json", exclude={"id"})
    for name in _TIMESTAMPS:
        moment: datetime | None = getattr(job, name)
        document[name] = moment
        document[f"{name}_iso"] = None if moment is None else iso_utc(moment)
    document.update(
        created_epoch_us=epoch_micros(job.created_at),
        final=job.is_final,
        seq=transition.seq,
        event_id=transition.event_id,
        updated_at=transition.occurred,
    )
    return document


def event_document(transition: Transition) -> Document:
    """The history event of a transition; ``_id`` is job id + seq, so a replay is a duplicate key."""
    job = transition.job
    return {
        "_id": f"{job.id}:{transition.seq}",
        "job_id": job.id,
        "seq": transition.seq,
        "event_id": transition.event_id,
        "status": job.status.value,
        "progress": job.progress,
        "occurred": transition.occurred,
        "occurred_iso": iso_utc(transition.occurred),
    }


def job_filter(transition: Transition) -> Document:
    """Match the job only where :func:`~jobbridge.mirror.transition.supersedes` allows this transition.

    A job the mirror has never seen matches nothing and is inserted by the upsert, so the filter needs no
    "seq missing" branch (every document this store writes has ``seq`` and ``final``). Plain equality and
    ``$lt`` only: nx-27017 0.8.1 matched an existing final job in an upsert whose filter combined
    ``$or``/``$exists: false`` with ``$ne``, which would have moved a COMPLETED job back to RUNNING.
    """
    condition: Document = {"_id": transition.job.id, "seq": {"$lt": transition.seq}}
    if not transition.is_final:
        condition["final"] = False
    return condition


def _only_duplicates(error: ClientBulkWriteException) -> bool:
    """True when every write error is a duplicate key (the stale/duplicate outcome, not a failure)."""
    errors: list[Any] = list(error.write_errors or [])
    return bool(errors) and all(_error_code(e) == DUPLICATE_KEY for e in errors)


def _error_code(write_error: Any) -> Any:
    """A write error's code; pymongo hands these over as plain dicts despite its WriteError annotation."""
    return write_error.get("code") if isinstance(write_error, dict) else getattr(write_error, "code", None)


class MongoJobStore:
    """Jobs and their history in MongoDB (jobbridge layout); see the module docstring."""

    def __init__(
        self, database: Any, jobs_collection: str | None = None, events_collection: str | None = None
    ) -> None:
        default_jobs, default_events = default_collection_names()
        self.database = database
        self.jobs_name = jobs_collection or default_jobs
        self.events_name = events_collection or default_events
        self.jobs = database[self.jobs_name]
        self.events = database[self.events_name]

    name = "mongodb:jobbridge"
    layout = "jobbridge"

    def ensure(self) -> None:
        """The mirror-target hook: the indexes."""
        self.ensure_indexes()

    def ensure_indexes(self) -> None:
        """Create the listing indexes and the unique history index (idempotent)."""
        self.jobs.create_index([("org", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING)])
        self.jobs.create_index([("type", ASCENDING), ("created_at", ASCENDING)])
        self.events.create_index([("job_id", ASCENDING), ("seq", ASCENDING)], unique=True)

    def apply(self, transition: Transition) -> bool:
        """Write a transition in one request; False when it was stale or a duplicate (nothing written)."""
        namespace = f"{self.database.name}."
        event = InsertOne(event_document(transition), namespace=namespace + self.events_name)
        if transition.history_only:
            try:
                self.database.client.bulk_write([event], ordered=True)
            except ClientBulkWriteException as error:
                if _only_duplicates(error):
                    return False
                raise
            return True
        models = [
            UpdateOne(
                job_filter(transition),
                {"$set": job_document(transition)},
                upsert=True,
                namespace=namespace + self.jobs_name,
            ),
            event,
        ]
        try:
            result = self.database.client.bulk_write(models, ordered=True)
        except ClientBulkWriteException as error:
            if _only_duplicates(error):
                return False
            raise
        return bool(result.upserted_count or result.modified_count or result.matched_count)

    def get(self, job_id: str) -> Job | None:
        """The mirrored job, or None when the mirror has never seen it."""
        document = self.jobs.find_one({"_id": job_id})
        return None if document is None else _job(document)

    def raw_document(self, job_id: str) -> Document | None:
        """The job document as stored, for callers that need the stored types."""
        document: Document | None = self.jobs.find_one({"_id": job_id})
        return document

    def history(self, job_id: str) -> list[HistoryEntry]:
        """The job's recorded changes in sequence (occurred) order."""
        cursor = self.events.find({"job_id": job_id}).sort("seq", ASCENDING)
        return [_history_entry(document) for document in cursor]

    def find_by_org_status(self, org: str | None, status: JobStatus | str, limit: int = 100) -> list[Job]:
        """Jobs of one org in one status, oldest first (served by the (org, status, created_at) index)."""
        query = {"org": org, "status": JobStatus(status).value}
        return self._find(query, limit)

    def find_by_type(self, job_type: str, limit: int = 100) -> list[Job]:
        """Jobs of one type, oldest first (served by the (type, created_at) index)."""
        return self._find({"type": job_type}, limit)

    def _find(self, query: Document, limit: int) -> list[Job]:
        order = [("created_at", ASCENDING), ("created_epoch_us", ASCENDING), ("_id", ASCENDING)]
        return [_job(document) for document in self.jobs.find(query).sort(order).limit(limit)]


def _job(document: Document) -> Job:
    """Rebuild a Job from its document, taking timestamps from the exact ISO strings."""
    fields = {name: value for name, value in document.items() if name in Job.model_fields}
    fields["id"] = document["_id"]
    for name in _TIMESTAMPS:
        fields[name] = document.get(f"{name}_iso")
    return Job.model_validate(fields)


def _history_entry(document: Document) -> HistoryEntry:
    return HistoryEntry(
        job_id=document["job_id"],
        seq=int(document["seq"]),
        event_id=document["event_id"],
        status=JobStatus(document["status"]),
        progress=Decimal(str(document["progress"])),
        occurred=datetime.fromisoformat(document["occurred_iso"].replace("Z", "+00:00")),
    )
