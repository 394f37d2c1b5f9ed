"""DynamoDB writer and reader of the mirror, in jobbridge's own single-table layout.

Layout (one table, string keys ``PK``/``SK``):

* job item: ``PK=JOB#{type}#{id}``, ``SK=META``; the whole Job as JSON in ``job`` plus the attributes
  readers filter on (``status``, ``progress`` as an exact Number, ``created_at`` ISO 8601 UTC and
  ``created_epoch`` seconds as an exact Number, ``seq`` and ``final`` for the monotonic condition);
* history items: ``SK=PROG#{occurred ISO}#{seq:020d}``; the sequence holds the microseconds and a tiebreak,
  so two changes within one second (or one microsecond) still get distinct items;
* ``GSI1`` (``GSI1PK=ORG#{org}#STATUS#{status}``, ``GSI1SK={created µs:017d}#{id}``) and ``GSI2``
  (``GSI2PK=TYPE#{type}``, same sort key) make "by org+status" and "by type" listings a Query in created
  order; nothing in this module ever Scans.

Numbers go through Decimal made from strings or ints, never from binary floats, so 33.3 stays 33.3.
A transition is one ``TransactWriteItems`` request: the conditional META put and the history put succeed
or fail together, so a stale or duplicated transition writes nothing and one transition costs one request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from jobbridge.jobs import Job, JobStatus
from jobbridge.mirror.transition import HistoryEntry, Transition, epoch_micros, exact_decimal, iso_utc
from jobbridge.settings import Settings, get_settings

__all__ = ["DEFAULT_TABLE", "DynamoDBJobStore", "default_table_name"]

DEFAULT_TABLE = "jobbridge_jobs"
META = "META"
PROG = "PROG#"
GSI_ORG_STATUS = "GSI1"
GSI_TYPE = "GSI2"
_NO_ORG = "-"

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

Item = dict[str, Any]


class DynamoDBClient(Protocol):
    """The few low-level client calls this store makes (a boto3 client, or a thin adapter around one)."""

    def create_table(self, **kwargs: Any) -> Any: ...
    def describe_table(self, **kwargs: Any) -> Any: ...
    def transact_write_items(self, **kwargs: Any) -> Any: ...
    def put_item(self, **kwargs: Any) -> Any: ...
    def get_item(self, **kwargs: Any) -> Any: ...
    def query(self, **kwargs: Any) -> Any: ...


def default_table_name(settings: Settings | None = None) -> str:
    """The mirror table's name under this mode's namespace (TEST mode gets its own table)."""
    return (settings or get_settings()).namespaced(DEFAULT_TABLE)


def job_key(job_type: str, job_id: str) -> str:
    """Partition key of a job: its type first, so a job's items live together and read by type cheaply."""
    return f"JOB#{job_type}#{job_id}"


def history_key(transition: Transition) -> str:
    """Sort key of a history item: occurred time, then the sequence that keeps same-second items apart."""
    return f"{PROG}{iso_utc(transition.occurred)}#{transition.seq:020d}"


def _created_sort_key(job: Job) -> str:
    """Zero-padded created time in µs (then the id), so string order is creation order."""
    return f"{epoch_micros(job.created_at):017d}#{job.id}"


def _org_status_key(org: str | None, status: JobStatus | str) -> str:
    return f"ORG#{org or _NO_ORG}#STATUS#{JobStatus(status).value}"


def _epoch_seconds(moment: datetime) -> Decimal:
    """Epoch seconds as an exact Decimal (µs precision), for numeric sorting by non-jobbridge readers."""
    return Decimal(epoch_micros(moment)) / Decimal(1_000_000)


def _to_wire(item: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values -> DynamoDB attribute values; ``None`` attributes are left out, not stored as NULL."""
    return {name: _serializer.serialize(value) for name, value in item.items() if value is not None}


def _from_wire(item: Mapping[str, Any]) -> Item:
    return {name: _deserializer.deserialize(value) for name, value in item.items()}


def meta_item(transition: Transition) -> Item:
    """The job item a transition leaves behind."""
    job = transition.job
    created = _created_sort_key(job)
    return {
        "PK": job_key(job.type, job.id),
        "SK": META,
        "job_id": job.id,
        "type": job.type,
        "org": job.org,
        "status": job.status.value,
        "final": job.is_final,
        "progress": exact_decimal(job.progress),
        "created_at": iso_utc(job.created_at),
        "created_epoch": _epoch_seconds(job.created_at),
        "updated_at": iso_utc(transition.occurred),
        "updated_epoch": _epoch_seconds(transition.occurred),
        "seq": transition.seq,
        "event_id": transition.event_id,
        "job": job.to_json(),
        "GSI1PK": _org_status_key(job.org, job.status),
        "GSI1SK": created,
        "GSI2PK": f"TYPE#{job.type}",
        "GSI2SK": created,
    }


def history_item(transition: Transition) -> Item:
    """The history item of a transition (status and progress at that moment)."""
    job = transition.job
    return {
        "PK": job_key(job.type, job.id),
        "SK": history_key(transition),
        "job_id": job.id,
        "status": job.status.value,
        "progress": exact_decimal(job.progress),
        "occurred_at": iso_utc(transition.occurred),
        "occurred_epoch": _epoch_seconds(transition.occurred),
        "seq": transition.seq,
        "event_id": transition.event_id,
    }


def meta_condition(transition: Transition) -> tuple[str, dict[str, Any]]:
    """The monotonic rule of :func:`~jobbridge.mirror.transition.supersedes` as a condition expression."""
    values: dict[str, Any] = {":seq": transition.seq}
    expression = "attribute_not_exists(PK) OR #seq < :seq"
    if not transition.is_final:
        expression = "attribute_not_exists(PK) OR (#seq < :seq AND #final = :false)"
        values[":false"] = False
    return expression, values


def _is_condition_failure(error: ClientError) -> bool:
    """True when a transaction was cancelled only because a condition did not hold (stale or duplicate)."""
    code = error.response.get("Error", {}).get("Code", "")
    if code == "ConditionalCheckFailedException":
        return True
    if code != "TransactionCanceledException":
        return False
    reasons = error.response.get("CancellationReasons") or []
    codes = {str(reason.get("Code", "None")) for reason in reasons}
    if codes:
        return codes <= {"None", "ConditionalCheckFailed"} and "ConditionalCheckFailed" in codes
    return "ConditionalCheckFailed" in str(error)


class DynamoDBJobStore:
    """Jobs and their history in one DynamoDB table (jobbridge layout); see the module docstring."""

    def __init__(self, client_or_resource: Any, table_name: str | None = None) -> None:
        # A boto3 resource carries its client in ``meta.client``; a client (or an adapter) is used as is.
        client = getattr(getattr(client_or_resource, "meta", None), "client", None)
        self.client: DynamoDBClient = client if client is not None else client_or_resource
        self.table_name = table_name or default_table_name()

    name = "dynamodb:jobbridge"
    layout = "jobbridge"

    def ensure(self) -> None:
        """The mirror-target hook: the table and its GSIs."""
        self.ensure_table()

    # -- schema ---------------------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the table and its two GSIs (on-demand billing) unless it exists; wait until ACTIVE."""
        try:
            self.client.create_table(**self._table_spec())
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
        self._wait_active()

    def _table_spec(self) -> dict[str, Any]:
        names = ["PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK"]
        return {
            "TableName": self.table_name,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [{"AttributeName": n, "AttributeType": "S"} for n in names],
            "KeySchema": _key_schema("PK", "SK"),
            "GlobalSecondaryIndexes": [
                {"IndexName": GSI_ORG_STATUS, "KeySchema": _key_schema("GSI1PK", "GSI1SK"),
                 "Projection": {"ProjectionType": "ALL"}},
                {"IndexName": GSI_TYPE, "KeySchema": _key_schema("GSI2PK", "GSI2SK"),
                 "Projection": {"ProjectionType": "ALL"}},
            ],
        }  # fmt: skip

    def _wait_active(self, attempts: int = 100) -> None:
        """Poll describe_table until ACTIVE (moto is instant; real DynamoDB takes seconds)."""
        for _ in range(attempts):
            status = self.client.describe_table(TableName=self.table_name)["Table"]["TableStatus"]
            if status == "ACTIVE":
                return
            time.sleep(0.2)
        raise TimeoutError(f"DynamoDB table {self.table_name} did not become ACTIVE")

    # -- writes ---------------------------------------------------------------------------------------

    def apply(self, transition: Transition) -> bool:
        """Write a transition in one request; False when it was stale or a duplicate (nothing written)."""
        history_put = {
            "TableName": self.table_name,
            "Item": _to_wire(history_item(transition)),
            "ConditionExpression": "attribute_not_exists(PK)",
        }
        if transition.history_only:  # one item: a conditional put, cheaper than a transaction
            try:
                self.client.put_item(**history_put)
            except ClientError as error:
                if _is_condition_failure(error):
                    return False
                raise
            return True
        condition, values = meta_condition(transition)
        meta_put = {
            "TableName": self.table_name,
            "Item": _to_wire(meta_item(transition)),
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {
                "#seq": "seq",
                **({"#final": "final"} if ":false" in values else {}),
            },
            "ExpressionAttributeValues": _to_wire(values),
        }
        try:
            self.client.transact_write_items(TransactItems=[{"Put": meta_put}, {"Put": history_put}])
        except ClientError as error:
            if _is_condition_failure(error):
                return False
            raise
        return True

    # -- reads ----------------------------------------------------------------------------------------

    def get(self, job_type: str, job_id: str) -> Job | None:
        """The mirrored job, or None when the mirror has never seen it."""
        response = self.client.get_item(
            TableName=self.table_name,
            Key=_to_wire({"PK": job_key(job_type, job_id), "SK": META}),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return None if item is None else Job.from_json(_from_wire(item)["job"])

    def raw_item(self, job_type: str, job_id: str) -> Item | None:
        """The META item as stored (Decimals and all), for callers that need the exact numbers."""
        response = self.client.get_item(
            TableName=self.table_name,
            Key=_to_wire({"PK": job_key(job_type, job_id), "SK": META}),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return None if item is None else _from_wire(item)

    def history(self, job_type: str, job_id: str) -> list[HistoryEntry]:
        """The job's recorded changes in occurred order (a Query on the job's partition)."""
        items = self._query(
            KeyConditionExpression="PK = :pk AND begins_with(SK, :prog)",
            ExpressionAttributeValues=_to_wire({":pk": job_key(job_type, job_id), ":prog": PROG}),
            ConsistentRead=True,
        )
        return [_history_entry(item) for item in items]

    def list_by_org_status(self, org: str | None, status: JobStatus | str, limit: int = 100) -> list[Job]:
        """Jobs of one org in one status, oldest first: a Query on GSI1, never a Scan."""
        items = self._query(
            IndexName=GSI_ORG_STATUS,
            KeyConditionExpression="GSI1PK = :pk",
            ExpressionAttributeValues=_to_wire({":pk": _org_status_key(org, status)}),
            limit=limit,
        )
        return [Job.from_json(item["job"]) for item in items]

    def list_by_type(self, job_type: str, limit: int = 100) -> list[Job]:
        """Jobs of one type, oldest first: a Query on GSI2, never a Scan."""
        items = self._query(
            IndexName=GSI_TYPE,
            KeyConditionExpression="GSI2PK = :pk",
            ExpressionAttributeValues=_to_wire({":pk": f"TYPE#{job_type}"}),
            limit=limit,
        )
        return [Job.from_json(item["job"]) for item in items]

    def _query(self, *, limit: int | None = None, **kwargs: Any) -> list[Item]:
        """Run a Query (following pages up to ``limit`` items), in ascending sort-key order."""
        items: list[Item] = []
        request: dict[str, Any] = {"TableName": self.table_name, "ScanIndexForward": True, **kwargs}
        while True:
            if limit is not None:
                request["Limit"] = limit - len(items)
            response = self.client.query(**request)
            items.extend(_from_wire(raw) for raw in response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last or (limit is not None and len(items) >= limit):
                return items
            request["ExclusiveStartKey"] = last


def _key_schema(hash_key: str, range_key: str) -> list[dict[str, str]]:
    return [{"AttributeName": hash_key, "KeyType": "HASH"}, {"AttributeName": range_key, "KeyType": "RANGE"}]


def _history_entry(item: Item) -> HistoryEntry:
    return HistoryEntry(
        job_id=item["job_id"],
        seq=int(item["seq"]),
        event_id=item["event_id"],
        status=JobStatus(item["status"]),
        progress=item["progress"],
        occurred=datetime.fromisoformat(item["occurred_at"].replace("Z", "+00:00")),
    )
