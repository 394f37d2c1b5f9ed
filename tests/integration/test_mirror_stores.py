"""The mirror's store writers against the session's real moto_server and nx-27017 (no in-process fakes).

Each test gets its own DynamoDB table and Mongo collections. Write requests are counted through thin
adapters handed to the stores (the stores take any client/database-shaped object), not by patching boto3
or pymongo.
"""

from __future__ import annotations

import inspect
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pymongo import MongoClient

from jobbridge.jobs import Job, JobStatus
from jobbridge.mirror import dynamodb as dynamodb_module
from jobbridge.mirror.dynamodb import DynamoDBJobStore, default_table_name
from jobbridge.mirror.mongodb import MongoJobStore, default_collection_names
from jobbridge.mirror.transition import Transition, sequence_for, supersedes
from jobbridge.settings import ProcessingMode, Settings
from tests.support.stores import CountingDatabase, CountingDynamo

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LIFECYCLE = [JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]


@pytest.fixture
def name() -> str:
    """A table/collection name of this test only."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dynamo(dynamodb_client: Any, name: str) -> DynamoDBJobStore:
    store = DynamoDBJobStore(dynamodb_client, f"{name}_jobs")
    store.ensure_table()
    return store


@pytest.fixture
def mongo(mongo_client: MongoClient[dict[str, Any]], name: str) -> MongoJobStore:
    store = MongoJobStore(mongo_client["jobbridge_mirror_tests"], f"{name}_jobs", f"{name}_job_events")
    store.ensure_indexes()
    return store


def make_job(**fields: Any) -> Job:
    values: dict[str, Any] = {"name": "mirror test", "type": "sync", "org": "acme", "created_at": T0}
    values.update(fields)
    return Job(**values)


def lifecycle(job: Job) -> list[Transition]:
    """PENDING -> QUEUED -> RUNNING -> COMPLETED, one second apart, progress rising."""
    transitions = []
    for step, status in enumerate(LIFECYCLE):
        snapshot = job.model_copy(update={"status": status, "progress": 100.0 if status.is_final else 0.0})
        transitions.append(Transition.of(snapshot, T0 + timedelta(seconds=step)))
    return transitions


def apply_both(dynamo: DynamoDBJobStore, mongo: MongoJobStore, transition: Transition) -> tuple[bool, bool]:
    return dynamo.apply(transition), mongo.apply(transition)


def test_every_transition_in_order_lands_in_both_stores(
    dynamo: DynamoDBJobStore, mongo: MongoJobStore
) -> None:
    job = make_job()
    for transition in lifecycle(job):
        assert apply_both(dynamo, mongo, transition) == (True, True)
        assert dynamo.get(job.type, job.id) == transition.job
        assert mongo.get(job.id) == transition.job

    for history in (dynamo.history(job.type, job.id), mongo.history(job.id)):
        assert [entry.status for entry in history] == LIFECYCLE
        assert [entry.seq for entry in history] == sorted(entry.seq for entry in history)
        assert history[-1].progress == Decimal("100")
    assert dynamo.get("sync", str(uuid.uuid4())) is None
    assert mongo.get(str(uuid.uuid4())) is None


def test_duplicated_and_reordered_transitions_change_nothing(
    dynamo: DynamoDBJobStore, mongo: MongoJobStore
) -> None:
    job = make_job()
    pending, queued, running, completed = lifecycle(job)
    assert apply_both(dynamo, mongo, running) == (True, True)
    assert apply_both(dynamo, mongo, queued) == (False, False)  # late: older than RUNNING
    assert apply_both(dynamo, mongo, running) == (False, False)  # duplicate
    assert apply_both(dynamo, mongo, completed) == (True, True)
    later_running = Transition.of(running.job, T0 + timedelta(seconds=10))  # newer, but not final
    for stale in (pending, running, completed, later_running):
        assert apply_both(dynamo, mongo, stale) == (False, False)

    assert dynamo.get(job.type, job.id) == completed.job
    assert mongo.get(job.id) == completed.job
    for history in (dynamo.history(job.type, job.id), mongo.history(job.id)):
        assert [entry.status for entry in history] == [JobStatus.RUNNING, JobStatus.COMPLETED]
        assert [entry.event_id for entry in history] == [running.event_id, completed.event_id]


def test_a_final_status_may_follow_a_final_status_only_when_newer() -> None:
    assert supersedes(2, JobStatus.CRASHED, 1, stored_final=True)
    assert not supersedes(2, JobStatus.RUNNING, 1, stored_final=True)
    assert not supersedes(1, JobStatus.COMPLETED, 1, stored_final=False)
    assert supersedes(5, JobStatus.QUEUED, None, stored_final=False)
    assert sequence_for(T0, 1) == sequence_for(T0) + 1
    with pytest.raises(ValueError):
        sequence_for(T0, 1000)


def test_two_transitions_in_the_same_second_get_distinct_history_items(
    dynamo: DynamoDBJobStore, mongo: MongoJobStore, dynamodb_client: Any
) -> None:
    job = make_job(status=JobStatus.RUNNING)
    first = Transition.of(job.model_copy(update={"progress": 10.0}), T0)
    same_instant = Transition.of(job.model_copy(update={"progress": 20.0}), T0, tiebreak=1)
    later_in_second = Transition.of(job.model_copy(update={"progress": 30.0}), T0 + timedelta(microseconds=5))
    for transition in (first, same_instant, later_in_second):
        assert apply_both(dynamo, mongo, transition) == (True, True)

    expected = [Decimal("10"), Decimal("20"), Decimal("30")]
    assert [entry.progress for entry in dynamo.history(job.type, job.id)] == expected
    assert [entry.progress for entry in mongo.history(job.id)] == expected
    keys = dynamodb_client.query(
        TableName=dynamo.table_name,
        KeyConditionExpression="PK = :pk AND begins_with(SK, :p)",
        ExpressionAttributeValues={":pk": {"S": f"JOB#sync#{job.id}"}, ":p": {"S": "PROG#"}},
    )["Items"]
    sort_keys = [item["SK"]["S"] for item in keys]
    assert len(set(sort_keys)) == 3
    assert all(key.startswith("PROG#2025-03-01T12:00:00.") for key in sort_keys)


def test_list_queries_return_the_right_jobs_in_created_order(
    dynamo: DynamoDBJobStore, mongo: MongoJobStore, dynamodb_client: Any
) -> None:
    def put(**fields: Any) -> Job:
        job = make_job(**fields)
        apply_both(dynamo, mongo, Transition.of(job, job.created_at))
        return job

    # Written out of created order, so that order in the result can only come from the index.
    third = put(created_at=T0 + timedelta(minutes=3), status=JobStatus.RUNNING)
    first = put(created_at=T0 + timedelta(minutes=1), status=JobStatus.RUNNING)
    second = put(created_at=T0 + timedelta(minutes=2, microseconds=1), status=JobStatus.RUNNING)
    put(created_at=T0, status=JobStatus.QUEUED)  # other status
    put(created_at=T0, status=JobStatus.RUNNING, org="other")  # other org
    upload = put(created_at=T0 + timedelta(minutes=9), status=JobStatus.RUNNING, type="upload", org="o2")

    running = [first, second, third]
    assert [j.id for j in dynamo.list_by_org_status("acme", JobStatus.RUNNING, 10)] == [j.id for j in running]
    assert [j.id for j in mongo.find_by_org_status("acme", "RUNNING", 10)] == [j.id for j in running]
    assert [j.id for j in dynamo.list_by_org_status("acme", "RUNNING", 2)] == [first.id, second.id]
    assert len(dynamo.list_by_type("sync", 10)) == 5
    assert [j.id for j in dynamo.list_by_type("upload", 10)] == [upload.id]
    sync_ids = [j.id for j in mongo.find_by_type("sync", 10)]
    assert len(sync_ids) == 5 and sync_ids[-3:] == [first.id, second.id, third.id]

    described = dynamodb_client.describe_table(TableName=dynamo.table_name)["Table"]
    assert {index["IndexName"] for index in described["GlobalSecondaryIndexes"]} == {"GSI1", "GSI2"}
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    source = inspect.getsource(dynamodb_module)
    assert ".scan(" not in source and "self.client.query(" in source
    index_keys = {tuple(index["key"]) for index in mongo.jobs.list_indexes()}
    assert ("org", "status", "created_at") in index_keys and ("type", "created_at") in index_keys
    unique = [index for index in mongo.events.list_indexes() if index.get("unique")]
    assert [tuple(index["key"]) for index in unique] == [("job_id", "seq")]


def test_decimal_progress_stays_exact(dynamo: DynamoDBJobStore, mongo: MongoJobStore) -> None:
    job = make_job(status=JobStatus.RUNNING, progress=33.3)
    apply_both(dynamo, mongo, Transition.of(job, T0))

    raw = dynamo.raw_item(job.type, job.id)
    assert raw is not None
    assert raw["progress"] == Decimal("33.3") and str(raw["progress"]) == "33.3"
    assert raw["created_at"] == "2025-03-01T12:00:00.000000Z"
    assert raw["created_epoch"] == Decimal("1740830400")
    assert dynamo.history(job.type, job.id)[0].progress == Decimal("33.3")
    assert mongo.history(job.id)[0].progress == Decimal("33.3")
    for stored in (dynamo.get(job.type, job.id), mongo.get(job.id)):
        assert stored is not None and stored.progress == 33.3


def test_one_write_request_per_transition_per_store(
    dynamodb_client: Any, mongo_client: MongoClient[dict[str, Any]], name: str
) -> None:
    counting_dynamo = CountingDynamo(dynamodb_client)
    dynamo = DynamoDBJobStore(counting_dynamo, f"{name}_jobs")
    dynamo.ensure_table()
    counting_mongo = CountingDatabase(mongo_client["jobbridge_mirror_tests"])
    mongo = MongoJobStore(counting_mongo, f"{name}_jobs", f"{name}_job_events")
    mongo.ensure_indexes()
    job = make_job()
    transitions = lifecycle(job)

    for transition in [*transitions, transitions[1]]:  # the last one is a late duplicate
        before = (counting_dynamo.writes, counting_mongo.writes)
        apply_both(dynamo, mongo, transition)
        assert (counting_dynamo.writes - before[0], counting_mongo.writes - before[1]) == (1, 1)
    assert dynamo.get(job.type, job.id) == transitions[-1].job
    assert mongo.get(job.id) == transitions[-1].job


def test_names_take_the_test_namespace() -> None:
    test_mode = Settings(mode=ProcessingMode.TEST, test_prefix="ci_")
    assert default_table_name(test_mode) == "ci_jobbridge_jobs"
    assert default_collection_names(test_mode) == ("ci_jobs", "ci_job_events")
    assert default_table_name(Settings(mode=ProcessingMode.NORMAL)) == "jobbridge_jobs"
