"""The legacy-layout mirror writers against the session's real moto_server and nx-27017 (no in-process fakes).

Each test gets its own table or collections. Write requests are counted through thin adapters handed to the
targets, never by patching boto3 or pymongo. Every legacy query below is run the way the legacy system ran
it (argoitny's list-by-status on GSI1, ScientistCloud's pending poll, Delphi's StatusCreatedIndex,
receipt_trainer's latest STATUS# item), and what it returns is decoded with the legacy codec.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer
from bson import json_util
from pymongo import ASCENDING, MongoClient

from jobbridge.jobs import Job, JobStatus
from jobbridge.legacy.argoitny import ArgoitnyJobCodec
from jobbridge.legacy.delphi import DelphiJobCodec
from jobbridge.legacy.receipt_trainer import ReceiptTrainerJobCodec
from jobbridge.legacy.scientistcloud import ScientistCloudJobCodec
from jobbridge.mirror.legacy_dynamodb import DEFAULT_TABLES, LegacyDynamoDBTarget, default_table_name
from jobbridge.mirror.legacy_mongodb import ScientistCloudTarget
from jobbridge.mirror.target import MirrorEncodeError, MirrorTarget
from jobbridge.mirror.transition import Transition
from jobbridge.settings import ProcessingMode, Settings
from tests.support.stores import CountingDatabase, CountingDynamo

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "legacy-samples"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LIFECYCLE = [JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]
SC_LAYOUT = "scientistcloud"
LAYOUTS = ["receipt_trainer", "delphi", "argoitny", SC_LAYOUT]
RT, DELPHI, ARGO, SC = (
    ReceiptTrainerJobCodec(),
    DelphiJobCodec(),
    ArgoitnyJobCodec(),
    ScientistCloudJobCodec(),
)
CODECS: dict[str, Any] = {"receipt_trainer": RT, "delphi": DELPHI, "argoitny": ARGO, "scientistcloud": SC}
_deserializer = TypeDeserializer()


class Harness:
    """One target of one layout in its own table/collections, the raw client to read it, a write counter."""

    def __init__(self, layout: str, dynamodb_client: Any, mongo_client: MongoClient[dict[str, Any]]) -> None:
        self.layout = layout
        suffix = uuid.uuid4().hex[:12]
        self.target: MirrorTarget
        if layout == "scientistcloud":
            self.db = mongo_client["scientistcloud_mirror_tests"]
            self.counting_db = CountingDatabase(self.db)
            self.target = ScientistCloudTarget(self.counting_db, f"jobs_{suffix}", f"visstoredatas_{suffix}")
            self.jobs, self.datasets = self.db[f"jobs_{suffix}"], self.db[f"visstoredatas_{suffix}"]
        else:
            self.client = dynamodb_client
            self.counting = CountingDynamo(dynamodb_client)
            self.target = LegacyDynamoDBTarget(layout, self.counting, f"{layout}_{suffix}")
            self.table = f"{layout}_{suffix}"
        self.target.ensure()

    @property
    def writes(self) -> int:
        return self.counting_db.writes if self.layout == "scientistcloud" else self.counting.writes

    # -- reading what the target wrote, as the legacy readers do -------------------------------------

    def get(self, key: dict[str, str]) -> dict[str, Any] | None:
        wire = {name: {"S": value} for name, value in key.items()}
        item = self.client.get_item(TableName=self.table, Key=wire, ConsistentRead=True).get("Item")
        return None if item is None else plain(item)

    def query(self, **kwargs: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        request = {"TableName": self.table, **kwargs}
        while True:
            response = self.client.query(**request)
            items += [plain(item) for item in response.get("Items", [])]
            if "LastEvaluatedKey" not in response or "Limit" in kwargs:
                return items
            request["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def current(self, job: Job) -> dict[str, Any] | None:
        """The record that holds the job's current state in this layout."""
        if self.layout == "scientistcloud":
            document: dict[str, Any] | None = self.jobs.find_one({"job_id": job.id})
            return document
        key = {
            "receipt_trainer": {"PK": f"JOB#{job.id}", "SK": "JOB"},
            "delphi": {"job_id": job.id},
            "argoitny": {"PK": f"SGJOB#{job.id}", "SK": "META"},
        }[self.layout]
        return self.get(key)

    def legacy_status(self, record: dict[str, Any]) -> str:
        return str(record["dat"]["sts"] if self.layout == "argoitny" else record["status"])

    def history(self, job: Job) -> list[dict[str, Any]]:
        """History items in key order (receipt_trainer STATUS#, argoitny PROG#), queried as the readers do."""
        if self.layout == "receipt_trainer":
            key, prefix = f"JOB#{job.id}", "STATUS#"
        elif self.layout == "argoitny":
            key, prefix = f"JOB#generation#{job.id}", "PROG#"
        else:
            return []
        return self.query(
            KeyConditionExpression="PK = :pk AND begins_with(SK, :prefix)",
            ExpressionAttributeValues={":pk": {"S": key}, ":prefix": {"S": prefix}},
            ScanIndexForward=True,
        )

    def snapshot(self, job: Job) -> Any:
        """Everything the target wrote for a job (to show that a stale transition changed nothing)."""
        state: list[Any] = [self.current(job), self.history(job)]
        if self.layout == "scientistcloud":
            state.append(list(self.datasets.find({}, {"_id": 0})))
        elif self.layout == "receipt_trainer":
            state.append(self.query(KeyConditionExpression="PK = :pk",
                                    ExpressionAttributeValues={":pk": {"S": f"JOB#{job.id}"}}))  # fmt: skip
        return state


def samples(path: str) -> dict[str, dict[str, Any]]:
    """Sample records by case id: DynamoDB JSON as stored, Mongo Extended JSON as pymongo returns it."""
    data = json_util.loads((SAMPLES / path).read_text())
    return {record["case_id"]: record["item"] for record in data["records"]}


def plain(item: dict[str, Any]) -> dict[str, Any]:
    """A low-level client item as boto3's resource API returns it (what the legacy code and codecs read)."""
    return {name: _deserializer.deserialize(value) for name, value in item.items()}


@pytest.fixture
def harness(
    request: pytest.FixtureRequest, dynamodb_client: Any, mongo_client: MongoClient[dict[str, Any]]
) -> Harness:
    return Harness(request.param, dynamodb_client, mongo_client)


def make_job(layout: str, **fields: Any) -> Job:
    """A job of a type the layout's system had, with the parameters its legacy readers use."""
    values: dict[str, Any] = {
        "receipt_trainer": {"name": "layoutlm-v2", "type": "train", "parameters": {"epochs": 3, "lr": 5e-05}},
        "delphi": {
            "name": "pipeline 31337",
            "type": "full_pipeline",
            "parameters": {"conversation_id": "31337"},
        },
        "argoitny": {
            "name": "codeforces 1359C Mixing Water",
            "type": "script_generation",
            "parameters": {"platform": "codeforces", "problem_id": "1359C", "language": "cpp"},
        },
        "scientistcloud": {
            "name": "convert survey",
            "type": "convert",
            "parameters": {"dataset_uuid": "ds-1"},
        },
    }[layout]
    return Job(**{"created_at": T0, "org": "acme", **values, **fields})


def transitions(job: Job, statuses: list[JobStatus], error: str | None = None) -> list[Transition]:
    """One transition per status, 1.000007 s apart (so the sub-second part of each key is exercised)."""
    result = []
    for step, status in enumerate(statuses):
        at = T0 + timedelta(seconds=step, microseconds=7 * step)
        changes: dict[str, Any] = {
            "status": status,
            "progress": 100.0 if status is JobStatus.COMPLETED else 0.0,
        }
        if status is not JobStatus.PENDING and status is not JobStatus.QUEUED:
            changes["started_at"] = T0 + timedelta(seconds=2)
        if status.is_final:
            changes |= {"finished_at": at, "error": error}
        result.append(Transition.of(job.model_copy(update=changes), at))
    return result


def decoded(layout: str, record: dict[str, Any]) -> Job:
    return CODECS[layout].decode(record).job  # type: ignore[no-any-return]


def as_stored(layout: str, job: Job) -> Job:
    """The job as the layout can hold it: a BSON date keeps milliseconds; the DynamoDB layouts keep all."""
    if layout != SC_LAYOUT:
        return job
    times = ("created_at", "started_at", "finished_at")
    return job.model_copy(
        update={n: getattr(job, n).replace(microsecond=getattr(job, n).microsecond // 1000 * 1000)
                for n in times if getattr(job, n) is not None}
    )  # fmt: skip


# -- every transition lands, in order, one request each -------------------------------------------------


@pytest.mark.parametrize("harness", LAYOUTS, indirect=True)
def test_every_transition_lands_in_order_with_one_write_request(harness: Harness) -> None:
    job = make_job(harness.layout)
    codec = CODECS[harness.layout]
    for transition in transitions(job, LIFECYCLE):
        before = harness.writes
        assert harness.target.apply(transition) is True
        assert harness.writes - before == 1
        record = harness.current(job)
        assert record is not None
        assert harness.legacy_status(record) == codec.from_canonical[transition.job.status]
        # The exact Job (to the precision the store keeps), through the jobbridge extension.
        assert decoded(harness.layout, record) == as_stored(harness.layout, transition.job)

    history = harness.history(job)
    if harness.layout == "receipt_trainer":
        assert [item["status"] for item in history] == ["pending", "pending", "running", "succeeded"]
        assert [RT.decode_status_item(item).status for item in history] == [
            JobStatus.PENDING, JobStatus.PENDING, JobStatus.RUNNING, JobStatus.COMPLETED,
        ]  # fmt: skip
    elif harness.layout == "argoitny":
        progress = [ARGO.decode_progress(item) for item in history]
        assert [p.legacy_status for p in progress] == ["started", "started", "in_progress", "completed"]
        assert [p.at for p in progress] == [T0 + timedelta(seconds=s) for s in range(4)]
    elif harness.layout == "delphi":
        record = harness.current(job)
        assert record is not None and record["version"] == Decimal(4)  # one optimistic-lock bump per write


@pytest.mark.parametrize("harness", LAYOUTS, indirect=True)
def test_a_failed_job_lands_with_its_error(harness: Harness) -> None:
    job = make_job(harness.layout)
    error = "CUDA out of memory"
    for transition in transitions(job, [JobStatus.PENDING, JobStatus.RUNNING, JobStatus.FAILED], error):
        assert harness.target.apply(transition) is True
    record = harness.current(job)
    assert record is not None
    failed = decoded(harness.layout, record)
    assert (failed.status, failed.error) == (JobStatus.FAILED, error)
    assert harness.legacy_status(record) == CODECS[harness.layout].from_canonical[JobStatus.FAILED]
    if harness.layout == "receipt_trainer":
        latest = RT.latest_status(harness.history(job))
        assert latest is not None and (latest.legacy_status, latest.message) == ("failed", error)
        logs = harness.query(
            KeyConditionExpression="PK = :pk AND begins_with(SK, :log)",
            ExpressionAttributeValues={":pk": {"S": f"JOB#{job.id}"}, ":log": {"S": "LOG#"}},
        )
        assert [(log["log_level"], log["exception"]) for log in logs] == [("ERROR", error)]
    elif harness.layout == "argoitny":
        assert record["dat"]["err"] == error
        assert ARGO.decode_progress(harness.history(job)[-1]).message == error


# -- duplicated and reordered transitions --------------------------------------------------------------


@pytest.mark.parametrize("harness", LAYOUTS, indirect=True)
def test_duplicated_and_reordered_transitions_change_nothing(harness: Harness) -> None:
    job = make_job(harness.layout)
    pending, queued, running, completed = transitions(job, LIFECYCLE)
    assert harness.target.apply(running) is True
    assert harness.target.apply(queued) is False  # late: older than RUNNING
    assert harness.target.apply(running) is False  # duplicate
    assert harness.target.apply(completed) is True
    written = harness.snapshot(job)

    later_running = Transition.of(running.job, T0 + timedelta(seconds=10))  # newer, but not final
    for stale in (pending, queued, running, completed, later_running):
        before = harness.writes
        assert harness.target.apply(stale) is False
        assert harness.writes - before == 1  # one conditional request, which wrote nothing
    assert harness.snapshot(job) == written
    record = harness.current(job)
    assert record is not None and decoded(harness.layout, record) == as_stored(harness.layout, completed.job)


@pytest.mark.parametrize("harness", ["receipt_trainer", "argoitny"], indirect=True)
def test_a_late_transition_marked_history_only_lands_in_the_history_alone(harness: Harness) -> None:
    job = make_job(harness.layout)
    _, queued, running, _ = transitions(job, LIFECYCLE)
    assert harness.target.apply(running) is True
    current = harness.current(job)
    late = queued.model_copy(update={"history_only": True})
    assert harness.target.apply(late) is True
    assert harness.target.apply(late) is False  # a duplicate of it
    assert harness.current(job) == current
    history = harness.history(job)
    assert len(history) == 2
    if (
        harness.layout == "receipt_trainer"
    ):  # the newest STATUS# item, which the readers take, is still RUNNING
        latest = RT.latest_status(history)
        assert latest is not None and latest.status is JobStatus.RUNNING
    else:
        assert [ARGO.decode_progress(item).legacy_status for item in history] == ["started", "in_progress"]


# -- the legacy queries --------------------------------------------------------------------------------


@pytest.mark.parametrize("harness", ["argoitny"], indirect=True)
def test_argoitny_list_by_status_on_gsi1_finds_mirrored_jobs_newest_first(harness: Harness) -> None:
    jobs = [make_job("argoitny", created_at=T0 + timedelta(minutes=i)) for i in range(3)]
    for job in reversed(jobs):  # written newest first: the order below can only come from the index
        harness.target.apply(transitions(job, [JobStatus.QUEUED])[0])
    harness.target.apply(transitions(jobs[1], [JobStatus.QUEUED, JobStatus.RUNNING])[1])

    def list_jobs(status: str) -> list[dict[str, Any]]:
        """ScriptGenerationJobRepository.list_jobs(status=...): GSI1, newest first."""
        return harness.query(
            IndexName="GSI1",
            KeyConditionExpression="GSI1PK = :pk",
            ExpressionAttributeValues={":pk": {"S": f"SGJOB#STATUS#{status}"}},
            Limit=100,
            ScanIndexForward=False,
        )

    pending, processing = list_jobs("PENDING"), list_jobs("PROCESSING")
    assert [item["PK"] for item in pending] == [f"SGJOB#{jobs[2].id}", f"SGJOB#{jobs[0].id}"]
    assert [decoded("argoitny", item).status for item in pending] == [JobStatus.QUEUED] * 2
    assert [decoded("argoitny", item).id for item in processing] == [jobs[1].id]
    assert decoded("argoitny", processing[0]).status is JobStatus.RUNNING


@pytest.mark.parametrize("harness", ["argoitny"], indirect=True)
def test_argoitny_progress_keys_stay_unique_within_one_second(harness: Harness) -> None:
    job = make_job("argoitny", status=JobStatus.RUNNING)
    moments = [T0, T0 + timedelta(microseconds=250), T0 + timedelta(microseconds=999_999)]
    for progress, at in zip((10.0, 20.0, 30.0), moments, strict=True):
        harness.target.apply(Transition.of(job.model_copy(update={"progress": progress}), at))
    history = harness.history(job)  # JobProgressHistoryRepository.get_progress_history: begins_with PROG#
    assert [item["SK"] for item in history] == [
        "PROG#1740830400", "PROG#1740830400#000250", "PROG#1740830400#999999",
    ]  # fmt: skip
    assert [ARGO.decode_progress(item).message for item in history] == [
        f"Job status changed to RUNNING ({p}%)" for p in (10, 20, 30)
    ]
    latest = harness.query(  # get_latest_progress: descending, Limit 1
        KeyConditionExpression="PK = :pk AND begins_with(SK, :p)",
        ExpressionAttributeValues={":pk": {"S": f"JOB#generation#{job.id}"}, ":p": {"S": "PROG#"}},
        ScanIndexForward=False,
        Limit=1,
    )
    assert latest == history[-1:]


@pytest.mark.parametrize("harness", ["scientistcloud"], indirect=True)
def test_scientistcloud_worker_poll_finds_pending_jobs_by_priority_then_age(harness: Harness) -> None:
    sc_samples = samples("scientistcloud/mongo_jobs_collection.json")
    legacy = [sc_samples["sc-job-01-pending-google-sync"], sc_samples["sc-job-07-low-priority-compression"]]
    harness.jobs.insert_many([dict(document) for document in legacy])  # written by ScientistCloud itself
    base = datetime(2025, 11, 1, tzinfo=UTC)
    jobs = {
        "low": make_job(SC_LAYOUT, priority=3, created_at=base),
        "high-late": make_job(SC_LAYOUT, priority=1, created_at=base + timedelta(minutes=2)),
        "high-early": make_job(SC_LAYOUT, priority=1, created_at=base + timedelta(minutes=1)),
        "queued": make_job(SC_LAYOUT, priority=2, status=JobStatus.QUEUED, created_at=base),
        "running": make_job(SC_LAYOUT, priority=1, status=JobStatus.RUNNING, created_at=base),
    }
    for job in jobs.values():
        harness.target.apply(Transition.of(job, job.created_at))
    harness.target.apply(Transition.of(jobs["low"], base + timedelta(hours=1)))  # a second write of one job

    # SCLib_JobQueueManager.get_next_job: the worker's own query, run as it ran it.
    found = list(
        harness.jobs.find({"status": "pending"}).sort([("priority", ASCENDING), ("created_at", ASCENDING)])
    )
    by_id = {job.id: name for name, job in jobs.items()}
    names = [by_id.get(d["job_id"], d["job_id"]) for d in found]
    assert names == [
        "high-early", "high-late", "queued", sc_samples["sc-job-01-pending-google-sync"]["job_id"], "low",
        sc_samples["sc-job-07-low-priority-compression"]["job_id"],
    ]  # fmt: skip
    statuses = {by_id.get(d["job_id"]): decoded(SC_LAYOUT, d).status for d in found}
    assert (statuses["queued"], statuses["low"]) == (JobStatus.QUEUED, JobStatus.PENDING)


@pytest.mark.parametrize("harness", [SC_LAYOUT], indirect=True)
def test_scientistcloud_dataset_status_follows_the_job_and_only_existing_datasets(harness: Harness) -> None:
    dataset = str(uuid.uuid4())
    harness.datasets.insert_one({"uuid": dataset, "name": "Drone survey", "status": "submitted"})
    job = make_job(SC_LAYOUT, parameters={"dataset_uuid": dataset})
    seen = []
    for transition in transitions(job, LIFECYCLE):
        harness.target.apply(transition)
        seen.append(harness.datasets.find_one({"uuid": dataset})["status"])  # type: ignore[index]
    assert seen == ["submitted", "conversion queued", "converting", "done"]

    sync = make_job(SC_LAYOUT, type="sync", parameters={"dataset_uuid": dataset})
    late_sync = Transition.of(
        sync.model_copy(update={"status": JobStatus.RUNNING}), T0 + timedelta(seconds=2)
    )
    assert harness.target.apply(late_sync) is True  # the sync job's own document is new...
    assert harness.datasets.find_one({"uuid": dataset})["status"] == "done"  # type: ignore[index]
    # ... but its older event does not move the dataset back.

    orphan = make_job(SC_LAYOUT, parameters={"dataset_uuid": str(uuid.uuid4())})
    assert harness.target.apply(Transition.of(orphan, T0)) is True
    assert harness.datasets.count_documents({}) == 1  # a dataset is never created by the mirror


@pytest.mark.parametrize("harness", ["delphi"], indirect=True)
def test_delphi_status_created_index_lists_pending_jobs_oldest_first(harness: Harness) -> None:
    sample = samples("delphi/dynamo_delphi_jobqueue_items.json")["dl-01-pending-api"]
    harness.client.put_item(TableName=harness.table, Item=sample)  # written by the Delphi API
    jobs = [make_job("delphi", created_at=T0 + timedelta(seconds=i)) for i in range(3)]
    for job in reversed(jobs):
        harness.target.apply(transitions(job, [JobStatus.QUEUED])[0])
    harness.target.apply(transitions(jobs[0], [JobStatus.QUEUED, JobStatus.RUNNING])[1])

    # job_poller.py: query StatusCreatedIndex for PENDING, then take the oldest created_at first.
    pending = harness.query(
        IndexName="StatusCreatedIndex",
        KeyConditionExpression="#s = :pending",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":pending": {"S": "PENDING"}},
    )
    ordered = sorted(pending, key=lambda item: item["created_at"])
    assert [item["job_id"] for item in ordered] == [jobs[1].id, jobs[2].id, sample["job_id"]["S"]]
    assert {decoded("delphi", item).status for item in ordered} == {JobStatus.QUEUED}
    by_conversation = harness.query(
        IndexName="ConversationIndex",
        KeyConditionExpression="conversation_id = :c",
        ExpressionAttributeValues={":c": {"S": "31337"}},
    )
    assert len(by_conversation) == 4  # ours and the API's, all in conversation 31337


@pytest.mark.parametrize("harness", ["delphi"], indirect=True)
def test_delphi_item_of_the_legacy_api_is_taken_over_keeping_what_the_poller_owns(harness: Harness) -> None:
    sample = samples("delphi/dynamo_delphi_jobqueue_items.json")["dl-03-processing-locked"]
    harness.client.put_item(TableName=harness.table, Item=sample)
    job = DELPHI.decode(plain(sample)).job
    done = job.model_copy(update={"status": JobStatus.COMPLETED, "finished_at": T0, "result": {"rows": 3}})
    assert harness.target.apply(Transition.of(done, T0)) is True
    record = harness.current(job)
    assert record is not None
    assert (record["status"], record["version"]) == ("COMPLETED", Decimal(3))  # the poller's 2, plus one
    assert (record["worker_id"], record["logs"]) == (sample["worker_id"]["S"], sample["logs"]["S"])
    assert decoded("delphi", record) == done


@pytest.mark.parametrize("harness", ["receipt_trainer"], indirect=True)
def test_receipt_trainer_latest_status_query_and_status_listing(harness: Harness) -> None:
    job = make_job("receipt_trainer")
    for transition in transitions(job, LIFECYCLE[:3]):
        harness.target.apply(transition)

    # JobStatus history: the newest STATUS# item of the job (ScanIndexForward=False, Limit=1).
    newest = harness.query(
        KeyConditionExpression="PK = :pk AND begins_with(SK, :s)",
        ExpressionAttributeValues={":pk": {"S": f"JOB#{job.id}"}, ":s": {"S": "STATUS#"}},
        ScanIndexForward=False,
        Limit=1,
    )
    assert RT.decode_status_item(newest[0]).status is JobStatus.RUNNING
    assert RT.latest_status(harness.history(job)) == RT.decode_status_item(newest[0])
    listed = harness.query(  # list jobs by status: GSI1 STATUS#<status>, CREATED# sort keys
        IndexName="GSI1",
        KeyConditionExpression="GSI1PK = :pk AND begins_with(GSI1SK, :created)",
        ExpressionAttributeValues={":pk": {"S": "STATUS#running"}, ":created": {"S": "CREATED#"}},
    )
    assert [decoded("receipt_trainer", item).id for item in listed] == [job.id]
    typed = harness.query(  # every JOB item through GSITYPE
        IndexName="GSITYPE", KeyConditionExpression="#t = :job",
        ExpressionAttributeNames={"#t": "TYPE"}, ExpressionAttributeValues={":job": {"S": "JOB"}},
    )  # fmt: skip
    assert [item["PK"] for item in typed] == [f"JOB#{job.id}"]


# -- what a layout cannot hold, and configuration ------------------------------------------------------


@pytest.mark.parametrize("harness", ["argoitny"], indirect=True)
def test_a_job_type_the_layout_cannot_hold_raises_mirror_encode_error(harness: Harness) -> None:
    job = Job(name="compress it", type="compress", created_at=T0)
    before = harness.writes
    with pytest.raises(MirrorEncodeError) as caught:
        harness.target.apply(Transition.of(job, T0))
    assert "'type'" in str(caught.value) and "script_generation" in str(caught.value)
    assert harness.writes == before
    assert harness.client.scan(TableName=harness.table)["Count"] == 0


def test_layouts_tables_and_names(mongo_client: MongoClient[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="receipt_trainer, delphi, argoitny"):
        LegacyDynamoDBTarget("curatore", object())
    assert DEFAULT_TABLES == {
        "receipt_trainer": "receipt-processing", "delphi": "Delphi_JobQueue", "argoitny": "algoitny_main",
    }  # fmt: skip
    test_mode = Settings(mode=ProcessingMode.TEST, test_prefix="ci_")
    assert default_table_name("delphi", test_mode) == "ci_Delphi_JobQueue"
    assert LegacyDynamoDBTarget("argoitny", object()).table_name == "algoitny_main"
    assert LegacyDynamoDBTarget("argoitny", object(), "t").name == "dynamodb:argoitny"
    target = ScientistCloudTarget(mongo_client["scientistcloud_mirror_tests"])
    assert (target.name, target.layout) == ("mongodb:scientistcloud", "scientistcloud")
    assert (target.jobs_name, target.datasets_name) == ("jobs", "visstoredatas")
    assert isinstance(target, MirrorTarget) and isinstance(
        LegacyDynamoDBTarget("delphi", object()), MirrorTarget
    )
