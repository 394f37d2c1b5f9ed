"""Mirror writers for the legacy DynamoDB layouts: receipt_trainer, Delphi and argoitny.

Old readers (dashboards, the Delphi server, argoitny's API, receipt_trainer's tools) keep reading their own
tables while jobbridge runs the jobs, so each transition is written in the legacy system's own layout. The
items come from the legacy codecs (:mod:`jobbridge.legacy`); this module only decides how to write them:

* **receipt_trainer** (table ``receipt-processing``): the ``JOB`` item kept current, plus a ``STATUS#``
  history item (and a ``LOG#`` item when the job carries an error) in one ``TransactWriteItems``;
* **delphi** (``Delphi_JobQueue``): one ``UpdateItem`` that sets what the codec encodes and increments
  ``version`` (the poller's optimistic lock), so a legacy poller holding an older version fails its own
  conditional write instead of overwriting ours; ``worker_id`` and ``logs`` belong to the poller and are
  only set when absent;
* **argoitny** (``algoitny_main``): the ``SGJOB#``/``PEJOB#`` META item plus a ``PROG#`` history item in one
  ``TransactWriteItems``. argoitny keys progress by whole seconds (``PROG#{epoch}``), so two changes in one
  second would collide; the codec's ``PROG#{epoch}#{n:06d}`` form with n = the microsecond keeps them apart
  and sorts after the plain key, and argoitny's reader (``begins_with(SK, 'PROG#')``) still finds them.

Monotonic rule: the current item carries ``jb_seq`` (the transition's sequence), ``jb_final`` and
``jb_event_id`` beside the legacy attributes (legacy readers ignore them); the write is conditional on
``attribute_not_exists(jb_seq) OR (jb_seq < :seq [AND jb_final = false])``, the rule of
:func:`~jobbridge.mirror.transition.supersedes`, so a stale or duplicated transition writes nothing (an item
a legacy writer created, without ``jb_seq``, is taken over). History items are written without a condition
inside the same transaction: it only commits for a newer transition, and one that lands on the same
microsecond key as an earlier one is newer by construction. A transition the mirror service marks
``history_only`` (it arrived after a newer one) writes only the history items, each conditional on not
existing; Delphi keeps no history, so there it writes nothing.

The legacy id of a mirrored job is its jobbridge id: a UUID, which every one of these layouts accepts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError

from jobbridge.errors import JobValidationError
from jobbridge.jobs import Job, JobStatus
from jobbridge.legacy import argoitny, delphi
from jobbridge.legacy.argoitny import ArgoitnyJobCodec
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord
from jobbridge.legacy.delphi import DelphiJobCodec
from jobbridge.legacy.receipt_trainer import ReceiptTrainerJobCodec
from jobbridge.mirror.dynamodb import _is_condition_failure
from jobbridge.mirror.target import MirrorEncodeError
from jobbridge.mirror.transition import Transition
from jobbridge.settings import Settings, get_settings

__all__ = ["DEFAULT_TABLES", "LegacyDynamoDBTarget", "default_table_name", "table_spec"]

#: Each legacy system's own table name (receipt_trainer's is its ``DYNAMODB_TABLE`` default).
DEFAULT_TABLES: dict[str, str] = {
    "receipt_trainer": "receipt-processing",
    "delphi": delphi.TABLE_NAME,
    "argoitny": argoitny.TABLE_NAME,
}
#: Attributes jobbridge keeps on the current item for the monotonic condition (legacy readers ignore them).
SEQ, FINAL, EVENT = "jb_seq", "jb_final", "jb_event_id"
#: Delphi attributes the legacy poller owns: jobbridge fills them in only when they are absent.
_POLLER_OWNED = ("worker_id", "logs")

_serializer = TypeSerializer()
Item = dict[str, Any]


def default_table_name(layout: str, settings: Settings | None = None) -> str:
    """The legacy table's name under this mode's namespace (TEST mode gets its own tables)."""
    return (settings or get_settings()).namespaced(DEFAULT_TABLES[_known(layout)])


def _known(layout: str) -> str:
    if layout not in DEFAULT_TABLES:
        raise ValueError(
            f"layout {layout!r} is not a legacy DynamoDB layout: use one of {', '.join(DEFAULT_TABLES)}"
        )
    return layout


def _key_schema(hash_key: str, range_key: str | None = None) -> list[dict[str, str]]:
    schema = [{"AttributeName": hash_key, "KeyType": "HASH"}]
    if range_key is not None:
        schema.append({"AttributeName": range_key, "KeyType": "RANGE"})
    return schema


def _index(name: str, hash_key: str, range_key: str | None = None, projection: str = "ALL") -> Item:
    return {"IndexName": name, "KeySchema": _key_schema(hash_key, range_key),
            "Projection": {"ProjectionType": projection}}  # fmt: skip


def table_spec(layout: str, table_name: str) -> Item:
    """``create_table`` arguments: the legacy key schema and the GSIs the legacy readers query.

    receipt_trainer: ``PK``/``SK``, GSI1 (``STATUS#``/``CREATED#``) and GSITYPE on ``TYPE``; Delphi: hash
    ``job_id`` and the four GSIs of its ``create_dynamodb_tables.py``; argoitny: ``PK``/``SK``, GSI1
    (list by status), GSI2 (by problem, keys only) and GSI3 (problems, a Number sort key).
    """
    attributes: dict[str, str]
    if _known(layout) == "receipt_trainer":
        attributes = {"PK": "S", "SK": "S", "GSI1PK": "S", "GSI1SK": "S", "TYPE": "S"}
        keys, indexes = (
            _key_schema("PK", "SK"),
            [_index("GSI1", "GSI1PK", "GSI1SK"), _index("GSITYPE", "TYPE")],
        )
    elif layout == "delphi":
        attributes = {"job_id": "S", "status": "S", "created_at": "S", "conversation_id": "S",
                      "job_type": "S", "priority": "N", "worker_id": "S"}  # fmt: skip
        keys = _key_schema("job_id")
        indexes = [
            _index("StatusCreatedIndex", "status", "created_at"),
            _index("ConversationIndex", "conversation_id", "created_at"),
            _index("JobTypeIndex", "job_type", "priority"),
            _index("WorkerStatusIndex", "worker_id", "status"),
        ]
    else:
        attributes = {"PK": "S", "SK": "S", "GSI1PK": "S", "GSI1SK": "S", "GSI2PK": "S", "GSI2SK": "S",
                      "GSI3PK": "S", "GSI3SK": "N"}  # fmt: skip
        keys = _key_schema("PK", "SK")
        indexes = [
            _index("GSI1", "GSI1PK", "GSI1SK"),
            _index("GSI2", "GSI2PK", "GSI2SK", projection="KEYS_ONLY"),
            _index("GSI3", "GSI3PK", "GSI3SK"),
        ]
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": n, "AttributeType": t} for n, t in attributes.items()],
        "KeySchema": keys,
        "GlobalSecondaryIndexes": indexes,
    }


def _wire(item: Mapping[str, Any], what: str) -> Item:
    """Plain values (Decimal numbers) -> DynamoDB attribute values, naming the attribute that cannot be."""
    wire: Item = {}
    for name, value in item.items():
        try:
            wire[name] = _serializer.serialize(value)
        except (TypeError, ValueError) as exc:
            raise MirrorEncodeError(
                f"{what}: attribute {name!r} cannot be stored in DynamoDB ({exc})"
            ) from None
    return wire


def _permanent_problem(error: ClientError) -> str | None:
    """The message of a rejection no retry can fix (item over 400 KB, key of the wrong type), else None."""
    response = error.response
    code = response.get("Error", {}).get("Code", "")
    if code == "ValidationException":
        return str(response.get("Error", {}).get("Message", error))
    if code == "TransactionCanceledException":
        reasons = response.get("CancellationReasons") or []
        invalid = [str(r.get("Message", "")) for r in reasons if r.get("Code") == "ValidationError"]
        if invalid:
            return "; ".join(invalid)
    return None


class LegacyDynamoDBTarget:
    """A mirror target writing one legacy DynamoDB layout; see the module docstring for each layout."""

    layout: str
    name: str

    def __init__(self, layout: str, client: Any, table_name: str | None = None) -> None:
        self.layout = _known(layout)
        self.name = f"dynamodb:{layout}"
        # A boto3 resource carries its client in ``meta.client``; a client (or an adapter) is used as is.
        low_level = getattr(getattr(client, "meta", None), "client", None)
        self.client: Any = low_level if low_level is not None else client
        self.table_name = table_name or default_table_name(layout)
        self._writers: dict[str, Callable[[Transition], bool]] = {
            "receipt_trainer": self._apply_receipt_trainer,
            "delphi": self._apply_delphi,
            "argoitny": self._apply_argoitny,
        }

    # -- schema ---------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the table with the legacy key schema and GSIs unless it exists; wait until ACTIVE."""
        try:
            self.client.create_table(**table_spec(self.layout, self.table_name))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
        for _ in range(100):  # moto is instant; real DynamoDB takes seconds
            if self.client.describe_table(TableName=self.table_name)["Table"]["TableStatus"] == "ACTIVE":
                return
            time.sleep(0.2)
        raise TimeoutError(f"DynamoDB table {self.table_name} did not become ACTIVE")

    # -- writes ---------------------------------------------------------------------------------------

    def apply(self, transition: Transition) -> bool:
        """Write one transition in one request; False when it was stale or a duplicate (nothing written)."""
        try:
            return self._writers[self.layout](transition)
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            problem = _permanent_problem(error)
            if problem is not None:
                raise MirrorEncodeError(
                    f"{self._what(transition.job)}: DynamoDB rejected it: {problem}"
                ) from None
            raise

    def _what(self, job: Job) -> str:
        return f"job {job.id} in the {self.layout} layout (table {self.table_name})"

    def _encode(self, encode: Callable[[], list[Item]], job: Job) -> Item:
        """The codec's item, or MirrorEncodeError naming the field the layout cannot hold."""
        try:
            return encode()[0]
        except JobValidationError as exc:
            raise MirrorEncodeError(f"{self._what(job)}: field 'type' cannot be stored: {exc}") from None
        except LegacyDecodeError as exc:
            raise MirrorEncodeError(
                f"{self._what(job)}: field {exc.field_name!r} cannot be stored: {exc}"
            ) from None

    @staticmethod
    def _monotonic(transition: Transition, values: dict[str, Any]) -> str:
        """The condition of :func:`~jobbridge.mirror.transition.supersedes` (fills ``values``)."""
        values[":seq"] = transition.seq
        if transition.is_final:
            return "attribute_not_exists(#jb_seq) OR #jb_seq < :seq"
        values[":false"] = False
        return "attribute_not_exists(#jb_seq) OR (#jb_seq < :seq AND #jb_final = :false)"

    def _tracking(self, transition: Transition) -> Item:
        return {SEQ: transition.seq, FINAL: transition.is_final, EVENT: transition.event_id}

    def _transact(self, transition: Transition, current: Item, history: list[Item]) -> bool:
        """One TransactWriteItems: the conditional current item and its history items (see module doc)."""
        what = self._what(transition.job)
        if transition.history_only:
            puts = [
                {"Put": {"TableName": self.table_name, "Item": _wire(item, what),
                         "ConditionExpression": "attribute_not_exists(SK)"}}
                for item in history
            ]  # fmt: skip
        else:
            values: dict[str, Any] = {}
            condition = self._monotonic(transition, values)
            names = {"#jb_seq": SEQ, **({"#jb_final": FINAL} if ":false" in values else {})}
            current_put = {
                "TableName": self.table_name,
                "Item": _wire(current | self._tracking(transition), what),
                "ConditionExpression": condition,
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": _wire(values, what),
            }
            history_puts = [{"Put": {"TableName": self.table_name, "Item": _wire(i, what)}} for i in history]
            puts = [{"Put": current_put}, *history_puts]
        if len(puts) == 1:  # a lone history item: a conditional put, cheaper than a transaction
            self.client.put_item(**puts[0]["Put"])
        else:
            self.client.transact_write_items(TransactItems=puts)
        return True

    # -- receipt_trainer ------------------------------------------------------------------------------

    def _apply_receipt_trainer(self, transition: Transition) -> bool:
        codec, job, at = ReceiptTrainerJobCodec(), transition.job, transition.occurred
        record = LegacyRecord(job=job, legacy_id=job.id)
        item = self._encode(lambda: codec.encode(record), job)
        legacy_status = codec.from_canonical[job.status]
        failed = job.status in (JobStatus.FAILED, JobStatus.CRASHED)
        # The processor's own message format; a failure's message is its error text (sample rt-st-05).
        message = job.error if failed and job.error else f"Job status updated to {legacy_status}"
        history = [codec.status_item(record, at, message, progress=job.progress)]
        if job.error and (failed or job.status is JobStatus.RETRYING):
            level = "ERROR" if failed else "WARNING"
            history.append(codec.log_item(record, at, level, f"Job {legacy_status}", source="jobbridge",
                                          exception=job.error))  # fmt: skip
        return self._transact(transition, item, history)

    # -- argoitny -------------------------------------------------------------------------------------

    def _apply_argoitny(self, transition: Transition) -> bool:
        codec, job, at = ArgoitnyJobCodec(), transition.job, transition.occurred
        # ``upd`` is the write time: argoitny's orphan recovery fails PROCESSING jobs idle for 10 minutes.
        record = LegacyRecord(job=job, legacy_id=job.id, extra={"upd": argoitny.epoch(at)})
        item = self._encode(lambda: codec.encode(record), job)
        status = job.status.value.lower()
        step = f"Job {status}"
        message = job.error if job.error else f"Job status changed to {job.status.value} ({job.progress:g}%)"
        progress = codec.progress_item(record, at, at.microsecond, step, message)
        return self._transact(transition, item, [progress])

    # -- delphi ---------------------------------------------------------------------------------------

    def _apply_delphi(self, transition: Transition) -> bool:
        if transition.history_only:
            return False  # Delphi keeps no history: an older state has nowhere to go
        job = transition.job
        extra = {"updated_at": delphi.format_time(transition.occurred)}
        item = self._encode(lambda: DelphiJobCodec().encode(LegacyRecord(job, job.id, extra)), job)
        request = self._delphi_update(transition, item)
        self.client.update_item(**request)
        return True

    def _delphi_update(self, transition: Transition, item: Item) -> Item:
        """One UpdateItem: SET the encoded attributes, version + 1, poller-owned ones only when absent."""
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        assignments: list[str] = []

        def name_of(attribute: str) -> str:
            placeholder = f"#a{len(names)}"
            names[placeholder] = attribute
            return placeholder

        def value_of(value: Any) -> str:
            placeholder = f":v{len(values)}"
            values[placeholder] = value
            return placeholder

        for attribute, value in (item | self._tracking(transition)).items():
            if attribute in ("job_id", "version"):
                continue
            if attribute in _POLLER_OWNED:
                ref = name_of(attribute)
                assignments.append(f"{ref} = if_not_exists({ref}, {value_of(value)})")
            else:
                assignments.append(f"{name_of(attribute)} = {value_of(value)}")
        version = name_of("version")
        assignments.append(f"{version} = if_not_exists({version}, {value_of(0)}) + {value_of(1)}")
        expression = "SET " + ", ".join(assignments)
        if delphi.SIDECAR not in item:
            expression += f" REMOVE {name_of(delphi.SIDECAR)}"  # a finer status an earlier write kept
        names |= {"#jb_seq": SEQ, "#jb_final": FINAL}
        condition = self._monotonic(transition, values)
        if ":false" not in values:
            del names["#jb_final"]
        what = self._what(transition.job)
        return {
            "TableName": self.table_name,
            "Key": _wire({"job_id": item["job_id"]}, what),
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": _wire(values, what),
        }
