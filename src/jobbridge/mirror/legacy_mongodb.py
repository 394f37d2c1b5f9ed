"""Mirror writer for ScientistCloud's MongoDB layout: the ``jobs`` document and the dataset's status string.

ScientistCloud's workers poll ``jobs.find({'status': 'pending'}).sort([('priority', 1), ('created_at', 1)])``
and its portal shows each dataset's ``visstoredatas.status`` (``sync queued``, ``syncing``, ``done``, ...).
The documents come from :class:`~jobbridge.legacy.scientistcloud.ScientistCloudJobCodec`; this module
decides how to write them. One transition is one client-level ``bulkWrite`` (ordered) of up to four
operations:

1. *adopt* a ``jobs`` document a ScientistCloud writer created (no ``jb_seq``): give it ``jb_seq = -1``, so
   the next operation may take it over (the DynamoDB writers' ``attribute_not_exists(jb_seq)``);
2. the conditional upsert of the ``jobs`` document on ``job_id``: its filter only matches a document whose
   ``jb_seq`` is smaller (and, for a non-final status, whose ``jb_final`` is 0). A newer or final document
   matches nothing, the upsert then collides with it on the unique ``job_id`` index (duplicate key) and the
   ordered batch stops: a stale or duplicated transition writes nothing and :meth:`apply` returns False;
3. and 4. only when the job names a dataset (``parameters['dataset_uuid']``): the same adopt-then-compare on
   the ``visstoredatas`` document whose ``uuid`` it is, setting its ``status`` (and ``updated_at``, which
   ScientistCloud's stale-conversion cleanup reads) only if no newer transition of any job set it already;
   several jobs (sync, then convert) share one dataset, and their events can arrive out of order.

The dataset document is updated, never created (``upsert=False``): ScientistCloud's portal creates datasets
with their name, owner, sensor and files, and a document holding only a uuid and a status would show up as
a broken dataset. A job whose dataset does not exist (yet) simply leaves ``visstoredatas`` alone.

Why these filters: they use only equality, ``$lt`` and ``$exists`` on one field at a time, because
nx-27017 0.8.1 (the embedded MongoDB) mishandles ``$or`` next to other fields in a bulk upsert (it matched
another job's document), does not implement ``$not``, and evaluates ``$nor`` over a missing field as false.
``jb_final`` is an integer (0/1) because nx-27017 turns a top-level boolean set by an update of an existing
document into 0/1; an integer reads the same in nx-27017 and in MongoDB. (nx-27017 likewise stores a
top-level datetime set by such an update as a string: ``started_at``/``completed_at``/``updated_at`` of a
job mirrored more than once read back as ISO-like strings there, which the codec reads; MongoDB keeps dates.)
The fields a ScientistCloud worker owns (``worker_id``, ``pid``, ``lock_file``, ``logs``) and ``created_at``
are written only when the document is created (``$setOnInsert``).

Give this target ScientistCloud's own database (``DB_NAME``, default ``scientistcloud``): its default
collection ``jobs`` has the same name as jobbridge's own Mongo mirror collection. The unique ``job_id`` index
is sparse, so it tolerates documents without ``job_id`` should the two ever share a collection.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bson.errors import InvalidDocument
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import ClientBulkWriteException

from jobbridge.jobs import Job
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord
from jobbridge.legacy.scientistcloud import (
    DATASET_KEY,
    OVERRIDES,
    WORKER_FIELDS,
    ScientistCloudJobCodec,
    dataset_status,
    dataset_uuid,
    to_mongo_time,
)
from jobbridge.legacy.values import BadField
from jobbridge.mirror.mongodb import _only_duplicates
from jobbridge.mirror.target import MirrorEncodeError
from jobbridge.mirror.transition import Transition
from jobbridge.settings import Settings, get_settings

__all__ = ["DEFAULT_DATASETS", "DEFAULT_JOBS", "ScientistCloudTarget", "default_collection_names"]

DEFAULT_JOBS = "jobs"
DEFAULT_DATASETS = "visstoredatas"
#: Fields jobbridge keeps on the documents for the monotonic condition (ScientistCloud ignores them).
SEQ, FINAL, EVENT = "jb_seq", "jb_final", "jb_event_id"
#: ``jb_seq`` of an adopted document: below every real sequence (which is >= 0).
ADOPTED = -1
#: Written only when the upsert creates the document: what a ScientistCloud worker owns, and ``created_at``,
#: which never changes (and so stays a BSON date under nx-27017, see the module docstring).
INSERT_ONLY = (*WORKER_FIELDS, "created_at")

Document = dict[str, Any]


def default_collection_names(settings: Settings | None = None) -> tuple[str, str]:
    """The (jobs, visstoredatas) collection names under this mode's namespace."""
    chosen = settings or get_settings()
    return chosen.namespaced(DEFAULT_JOBS), chosen.namespaced(DEFAULT_DATASETS)


def job_operations(transition: Transition, document: Document) -> tuple[Document, Document, Document]:
    """(adopt filter, adopt update) and the conditional upsert's (filter, update) for a ``jobs`` document."""
    job_id = document["job_id"]
    adopt = {"job_id": job_id, SEQ: {"$exists": False}}
    condition: Document = {"job_id": job_id, SEQ: {"$lt": transition.seq}}
    if not transition.is_final:
        condition[FINAL] = 0
    on_insert = {name: document[name] for name in INSERT_ONLY if name in document}
    fields = {name: value for name, value in document.items() if name not in on_insert and name != "_id"}
    fields |= {SEQ: transition.seq, FINAL: int(transition.is_final), EVENT: transition.event_id}
    update: Document = {"$set": fields}
    if on_insert:
        update["$setOnInsert"] = on_insert
    if OVERRIDES not in document:
        update["$unset"] = {OVERRIDES: ""}  # a finer status an earlier transition kept there
    return adopt, condition, update


class ScientistCloudTarget:
    """ScientistCloud's ``jobs`` and ``visstoredatas`` collections as a mirror target; see the module doc."""

    name = "mongodb:scientistcloud"
    layout = "scientistcloud"

    def __init__(
        self, database: Any, jobs_collection: str | None = None, datasets_collection: str | None = None
    ) -> None:
        default_jobs, default_datasets = default_collection_names()
        self.database = database
        self.jobs_name = jobs_collection or default_jobs
        self.datasets_name = datasets_collection or default_datasets
        self.jobs = database[self.jobs_name]
        self.datasets = database[self.datasets_name]
        self.codec = ScientistCloudJobCodec()

    def ensure(self) -> None:
        """The unique ``job_id`` index the upsert relies on, and the indexes ScientistCloud's readers use."""
        self.jobs.create_index([("job_id", ASCENDING)], unique=True, sparse=True)
        self.jobs.create_index([("status", ASCENDING), ("priority", ASCENDING), ("created_at", ASCENDING)])
        self.jobs.create_index([("dataset_uuid", ASCENDING)])
        self.jobs.create_index([("worker_id", ASCENDING)])
        self.jobs.create_index([("status", ASCENDING), ("started_at", ASCENDING)])
        self.datasets.create_index([(DATASET_KEY, ASCENDING)])

    def document(self, transition: Transition) -> Document:
        """The ``jobs`` document of a transition, or MirrorEncodeError naming the field it cannot hold."""
        job = transition.job
        # The codec's ``updated_at`` is the latest of the job's times and this one: the transition's.
        extra = {"fields": {"updated_at": to_mongo_time(transition.occurred)}}
        try:
            return self.codec.encode(LegacyRecord(job=job, legacy_id=job.id, extra=extra))[0]
        except (LegacyDecodeError, BadField) as exc:
            raise MirrorEncodeError(f"{self._what(job)}: field {exc.field_name!r}: {exc}") from None

    def apply(self, transition: Transition) -> bool:
        """Write one transition in one request; False when it was stale or a duplicate (nothing written).

        A transition the mirror service marks ``history_only`` writes nothing: this layout keeps no history.
        """
        if transition.history_only:
            return False
        document = self.document(transition)
        jobs_ns = f"{self.database.name}.{self.jobs_name}"
        adopt, condition, update = job_operations(transition, document)
        models = [
            UpdateOne(adopt, {"$set": {SEQ: ADOPTED, FINAL: 0}}, namespace=jobs_ns),
            UpdateOne(condition, update, upsert=True, namespace=jobs_ns),
        ]
        uuid = dataset_uuid(transition.job)
        if uuid is not None:
            models += self._dataset_operations(transition, uuid)
        try:
            self.database.client.bulk_write(models, ordered=True)
        except ClientBulkWriteException as error:
            if _only_duplicates(error):
                return False
            raise
        except InvalidDocument as error:  # pymongo encodes client-side: e.g. an integer beyond 64 bits
            raise MirrorEncodeError(
                f"{self._what(transition.job)}: not storable in MongoDB: {error}"
            ) from None
        return True

    def _dataset_operations(self, transition: Transition, uuid: str) -> list[UpdateOne]:
        """Adopt-then-compare on the dataset document: its status follows the newest transition of any job."""
        namespace = f"{self.database.name}.{self.datasets_name}"
        occurred: datetime | None = to_mongo_time(transition.occurred)
        status = dataset_status(transition.job)
        return [
            UpdateOne(
                {DATASET_KEY: uuid, SEQ: {"$exists": False}}, {"$set": {SEQ: ADOPTED}}, namespace=namespace
            ),
            UpdateOne(
                {DATASET_KEY: uuid, SEQ: {"$lt": transition.seq}},
                {"$set": {"status": status, "updated_at": occurred, SEQ: transition.seq}},
                namespace=namespace,
            ),
        ]

    def _what(self, job: Job) -> str:
        return f"job {job.id} in the scientistcloud layout (collection {self.jobs_name})"
