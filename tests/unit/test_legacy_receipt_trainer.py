"""receipt_trainer codec: every sample decodes, round trips keep meaning, the status table goes both ways."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from jobbridge.jobs import Job, JobItem, JobStatus
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, decode_all
from jobbridge.legacy.receipt_trainer import ReceiptTrainerJobCodec

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "legacy-samples" / "receipt_trainer"
codec = ReceiptTrainerJobCodec()
_deserializer, _serializer = TypeDeserializer(), TypeSerializer()


def _file(name: str) -> list[dict[str, Any]]:
    return list(json.loads((SAMPLES / name).read_text())["records"])


def _resource(item: dict[str, Any]) -> dict[str, Any]:
    """A wire-format item as boto3's resource API returns it (Decimal numbers)."""
    return {name: _deserializer.deserialize(value) for name, value in item.items()}


def _storable(item: dict[str, Any]) -> None:
    """Fails unless boto3's resource API can write the item (no floats, no bad numbers)."""
    for value in item.values():
        _serializer.serialize(value)


JOB_RECORDS = _file("dynamo_job_items.json")
STORABLE = {r["case_id"]: _resource(r["item"]) for r in JOB_RECORDS if r.get("storable", True)}
UNSTORABLE = {r["case_id"]: r["item"] for r in JOB_RECORDS if not r.get("storable", True)}
STATUS_ITEMS = {r["case_id"]: _resource(r["item"]) for r in _file("dynamo_job_status_items.json")}
LOG_ITEMS = {r["case_id"]: _resource(r["item"]) for r in _file("dynamo_job_log_items.json")}
MESSAGES = {r["case_id"]: r["item"]["Body"] for r in _file("sqs_messages.json")}


def test_the_sample_file_has_the_unstorable_record_the_readme_describes() -> None:
    assert list(UNSTORABLE) == ["rt-job-07-bool-as-number-bug"]
    assert len(STORABLE) == 5


@pytest.mark.parametrize("case_id", sorted(STORABLE))
def test_every_job_item_decodes_in_both_formats(case_id: str) -> None:
    wire = next(r["item"] for r in JOB_RECORDS if r["case_id"] == case_id)
    record = codec.decode(STORABLE[case_id])
    assert record.legacy_id == STORABLE[case_id]["PK"].removeprefix("JOB#")
    assert codec.decode(wire) == record


def test_full_item_reads_decimals_exactly_and_tags_as_strings() -> None:
    job = codec.decode(STORABLE["rt-job-01-pending-full"]).job
    training = job.parameters["training"]
    assert (training["learning_rate"], training["epochs"], training["weight_decay"]) == (5e-05, 10, 0.01)
    assert isinstance(training["epochs"], int)
    assert (job.status, job.priority, job.owner, job.type) == (JobStatus.PENDING, 2, "tnorlund", "train")
    assert job.tags == ["project=receipt", "model=layoutlm", "env=production"]
    assert job.created_at == datetime(2025, 4, 10, 14, 22, 31, 512034, tzinfo=UTC)


@pytest.mark.parametrize(
    ("case_id", "status", "priority", "job_type"),
    [
        ("rt-job-03-succeeded", JobStatus.COMPLETED, 3, "evaluation"),
        ("rt-job-05-cancelled-critical", JobStatus.CANCELLED, 1, "train"),
        ("rt-job-09-unknown-status", JobStatus.PENDING, 2, "train"),
        ("rt-job-11-non-v4-uuid", JobStatus.COMPLETED, 2, "train"),
    ],
)
def test_odd_items_read_as_documented(case_id: str, status: JobStatus, priority: int, job_type: str) -> None:
    job = codec.decode(STORABLE[case_id]).job
    assert (job.status, job.priority, job.type) == (status, priority, job_type)


def test_boolean_stored_as_number_is_rejected_naming_the_field() -> None:
    case_id = "rt-job-07-bool-as-number-bug"
    as_read_by_boto3 = _resource(UNSTORABLE[case_id])  # boto3 reads {"N": "True"} as Decimal('NaN')
    for item in (UNSTORABLE[case_id], as_read_by_boto3):
        with pytest.raises(LegacyDecodeError) as caught:
            codec.decode(item)
        assert caught.value.record_id == "JOB#293ba8b9-317b-4b86-8157-89161202d125"
        assert caught.value.field_name == "job_config.training.mixed_precision"
        assert "BOOL" in str(caught.value)


def test_decode_all_of_the_whole_file_reports_the_unstorable_record_without_stopping() -> None:
    result = decode_all(codec, [r["item"] for r in JOB_RECORDS])
    assert len(result.decoded) == 5
    assert [(e.record_id, e.field_name) for e in result.errors] == [
        ("JOB#293ba8b9-317b-4b86-8157-89161202d125", "job_config.training.mixed_precision")
    ]


@pytest.mark.parametrize("case_id", sorted(STORABLE))
def test_decode_encode_decode_keeps_the_meaning(case_id: str) -> None:
    first = codec.decode(STORABLE[case_id])
    item = codec.encode(first)[0]
    _storable(item)
    second = codec.decode(item)
    assert (second.job, second.legacy_id) == (first.job, first.legacy_id)


@pytest.mark.parametrize(
    "case_id",
    [
        "rt-job-01-pending-full",
        "rt-job-03-succeeded",
        "rt-job-05-cancelled-critical",
        "rt-job-11-non-v4-uuid",
    ],
)
def test_encoding_a_legacy_item_writes_it_back_unchanged(case_id: str) -> None:
    assert codec.encode(codec.decode(STORABLE[case_id]))[0] == STORABLE[case_id]


def test_encoding_repairs_the_unknown_queued_status_to_one_legacy_readers_accept() -> None:
    item = codec.encode(codec.decode(STORABLE["rt-job-09-unknown-status"]))[0]
    assert (item["status"], item["GSI1PK"]) == ("pending", "STATUS#pending")
    assert item["created_at"] == "2025-04-16T10:00:00.000000"


def test_truly_unknown_status_names_the_record_and_the_field() -> None:
    item = {**STORABLE["rt-job-03-succeeded"], "status": "exploded"}
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode(item)
    assert (caught.value.record_id, caught.value.field_name) == (item["PK"], "status")


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"PK": "QUEUE#x"}, "PK"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"priority": "urgent"}, "priority"),
        ({"job_config": "x"}, "job_config"),
        ({"name": ""}, "name"),
    ],
)
def test_an_unreadable_field_is_named(change: dict[str, Any], field_name: str) -> None:
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode({**STORABLE["rt-job-05-cancelled-critical"], **change})
    assert caught.value.field_name == field_name


@pytest.mark.parametrize("status", list(JobStatus))
def test_status_table_round_trips_or_becomes_the_documented_coarser_status(status: JobStatus) -> None:
    legacy = codec.from_canonical[status]
    assert codec.to_canonical[legacy] in {status, codec.coarser.get(status)}
    assert (codec.to_canonical[legacy] == status) is (status not in codec.coarser)


def test_every_legacy_status_but_the_repaired_one_is_written_back_as_it_was() -> None:
    for legacy, status in codec.to_canonical.items():
        assert codec.from_canonical[status] == legacy or legacy == "queued"
    assert codec.to_canonical["interrupted"] is JobStatus.RETRYING
    assert codec.to_canonical["succeeded"] is JobStatus.COMPLETED


def _full_job(**changes: Any) -> Job:
    start = datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
    values: dict[str, Any] = {
        "name": "eval-run",
        "type": "evaluation",
        "parameters": {"lr": 5e-05, "epochs": 3, "amp": True, "splits": ["a", "b"], "none": None},
        "priority": 1,
        "org": "ml",
        "tags": ["sweep=lr", "plain"],
        "status": JobStatus.RUNNING,
        "progress": 12.5,
        "created_at": start,
        "started_at": start + timedelta(seconds=3),
        "attempts": 2,
        "error": "spot interruption",
        "result": {"f1": 0.91, "n": 7},
        "items": [JobItem(id="shard-1", status=JobStatus.COMPLETED)],
    }
    return Job(**{**values, **changes})


@pytest.mark.parametrize("status", list(JobStatus))
def test_a_job_built_from_scratch_encodes_and_decodes_equal(status: JobStatus) -> None:
    job = _full_job(status=status, finished_at=datetime(2026, 2, 4, tzinfo=UTC) if status.is_final else None)
    item = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    _storable(item)
    assert item["status"] == codec.from_canonical[status] and item["created_by"] == "jobbridge"
    assert item["job_config"]["lr"] == Decimal("5e-05") and item["job_config"]["amp"] is True
    decoded = codec.decode(item)
    assert (decoded.job, decoded.legacy_id) == (job, job.id)


def test_a_plain_training_job_needs_no_jobbridge_attribute() -> None:
    job = Job(name="train-1", type="train", owner="tnorlund", parameters={"epochs": 1})
    item = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert "jobbridge" not in item and item["description"] == "Job train-1 of type training"
    assert codec.decode(item).job == job


def test_naive_local_times_follow_the_configured_zone() -> None:
    pacific = ReceiptTrainerJobCodec(local_tz=timezone(timedelta(hours=-7)))
    record = pacific.decode(STORABLE["rt-job-01-pending-full"])
    assert record.job.created_at == datetime(2025, 4, 10, 21, 22, 31, 512034, tzinfo=UTC)
    assert pacific.encode(record)[0]["created_at"] == "2025-04-10T14:22:31.512034"


@pytest.mark.parametrize("case_id", sorted(MESSAGES))
def test_every_sqs_body_decodes_and_round_trips_through_the_job_item(case_id: str) -> None:
    record = codec.decode_message_body(MESSAGES[case_id])
    body = json.loads(MESSAGES[case_id])
    assert (record.legacy_id, record.job.type, record.job.status) == (
        body["job_id"],
        "train",
        JobStatus.PENDING,
    )
    assert record.job.created_at == datetime.fromtimestamp(body["created_at"], UTC)
    assert record.job.attempts == body["attempt_count"]
    item = codec.encode(record)[0]
    _storable(item)
    assert item["description"] == f"Job {body['name']} of type training"
    assert codec.decode(item).job == record.job


def test_sqs_body_with_disagreeing_type_names_is_rejected() -> None:
    body = json.loads(MESSAGES["rt-sqs-01-new-style"]) | {"job_type": "inference"}
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode_message_body(json.dumps(body))
    assert (caught.value.record_id, caught.value.field_name) == (body["job_id"], "job_type")


def test_status_history_items_decode() -> None:
    entries = {case_id: codec.decode_status_item(item) for case_id, item in STATUS_ITEMS.items()}
    assert entries["rt-st-03"].progress == 42.5 and entries["rt-st-03"].status is JobStatus.RUNNING
    assert entries["rt-st-05"].status is JobStatus.FAILED and "CUDA" in (entries["rt-st-05"].message or "")


def test_latest_status_item_of_a_job_is_the_newest() -> None:
    same_job = [item for item in STATUS_ITEMS.values() if item["PK"] == STATUS_ITEMS["rt-st-01"]["PK"]]
    latest = codec.latest_status(same_job)
    assert latest is not None and (latest.legacy_status, latest.progress) == ("running", 42.5)
    assert codec.latest_status([]) is None


def test_status_items_written_sort_in_time_order_and_read_back() -> None:
    job = _full_job(status=JobStatus.RETRYING)
    at = datetime(2026, 2, 3, 5, 0, 0, tzinfo=UTC)
    items = [codec.status_item(job, at + timedelta(seconds=s), f"step {s}", progress=s) for s in (0, 1, 10)]
    for item in items:
        _storable(item)
    assert sorted(items, key=lambda i: i["SK"]) == items
    latest = codec.latest_status(items)
    assert latest is not None
    assert (latest.at, latest.status, latest.legacy_status) == (
        at + timedelta(seconds=10),
        job.status,
        "interrupted",
    )
    assert (latest.message, latest.progress, latest.job_id) == ("step 10", 10, job.id)


def test_history_items_are_written_as_the_legacy_wrote_them() -> None:
    """status_item/log_item reproduce the sample items from the same values."""
    for sample, kind in ((STATUS_ITEMS["rt-st-01"], "STATUS#"), (LOG_ITEMS["rt-log-01"], "LOG#")):
        job = Job(id=sample["PK"].removeprefix("JOB#"), name="n", type="train", status=JobStatus.PENDING)
        at = datetime.fromisoformat(sample["SK"].removeprefix(kind)).replace(tzinfo=UTC)
        if kind == "STATUS#":
            written = codec.status_item(job, at, sample["message"])
        else:
            written = codec.log_item(job, at, sample["log_level"], sample["message"], source=sample["source"])
        assert written == sample


def test_log_item_with_exception_and_bad_level() -> None:
    sample = LOG_ITEMS["rt-log-03"]
    record = LegacyRecord(job=_full_job(), legacy_id=sample["PK"].removeprefix("JOB#"))
    at = datetime.fromisoformat(sample["SK"].removeprefix("LOG#")).replace(tzinfo=UTC)
    written = codec.log_item(
        record, at, "critical", sample["message"], source="worker", exception=sample["exception"]
    )
    _storable(written)
    assert written == sample
    with pytest.raises(ValueError, match="log level"):
        codec.log_item(record, at, "loud", "x")


def test_a_receipt_trainer_writer_change_wins_over_the_jobbridge_attribute() -> None:
    """The map applies only while the legacy attributes still say what they said when it was written."""
    job = _full_job(status=JobStatus.QUEUED)
    item = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert item["status"] == "pending" and item["jobbridge"]["status"] == ["QUEUED", "PENDING"]
    assert codec.decode(item).job.status is JobStatus.QUEUED
    item.update(status="running", GSI1PK="STATUS#running")  # the legacy processor claimed it
    decoded = codec.decode(item).job
    assert decoded.status is JobStatus.RUNNING
    assert (decoded.org, decoded.progress, decoded.attempts) == ("ml", 12.5, 2)  # untouched entries hold


def test_a_jobbridge_attribute_that_is_not_pairs_is_named() -> None:
    item = {**STORABLE["rt-job-05-cancelled-critical"], "jobbridge": {"org": "only a value"}}
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode(item)
    assert caught.value.field_name == "jobbridge" and "pair" in str(caught.value)


@pytest.mark.parametrize("case_id", sorted(STATUS_ITEMS))
def test_every_status_item_decodes_and_re_encodes_to_the_same_entry(case_id: str) -> None:
    entry = codec.decode_status_item(STATUS_ITEMS[case_id])
    job = Job(id=entry.job_id, name="n", type="train", status=entry.status)
    item = codec.status_item(
        job, entry.at, entry.message, progress=entry.progress, instance_id=entry.instance_id
    )
    _storable(item)
    assert item == STATUS_ITEMS[case_id]
    assert codec.decode_status_item(item) == entry
