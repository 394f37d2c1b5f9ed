"""The Delphi codec against the legacy samples: every record decodes, round trips keep meaning."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from jobbridge.jobs import Job, JobItem, JobStatus
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, decode_all, job_id_for
from jobbridge.legacy.delphi import DelphiJobCodec

SAMPLES = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "legacy-samples"
    / "delphi"
    / "dynamo_delphi_jobqueue_items.json"
)
CODEC = DelphiJobCodec()
JSON_STRINGS = ("job_config", "job_results", "logs", "environment")
#: Attributes encode adds to an item that lacked them: the placeholders the API writes.
PLACEHOLDERS = {"worker_id": "none", "started_at": "", "completed_at": "", "job_config": "{}"}


def load() -> list[tuple[str, dict[str, Any], bool]]:
    """(case_id, item as boto3's resource API returns it, storable) for every sample record."""
    deserializer = TypeDeserializer()
    records = json.loads(SAMPLES.read_text())["records"]
    return [
        (
            record["case_id"],
            {key: deserializer.deserialize(value) for key, value in record["item"].items()},
            record.get("storable", True),
        )
        for record in records
    ]


RECORDS = load()
STORABLE = [(case, item) for case, item, storable in RECORDS if storable]
UNSTORABLE = [(case, item) for case, item, storable in RECORDS if not storable]
BY_CASE = {case: item for case, item, _ in RECORDS}


def meaning(item: dict[str, Any]) -> dict[str, Any]:
    """An item with its JSON-string fields parsed, to compare what it says rather than its spelling."""
    parsed = dict(item)
    for key in JSON_STRINGS:
        if isinstance(parsed.get(key), str) and parsed[key]:
            parsed[key] = json.loads(parsed[key])
    return parsed


def test_samples_hold_both_kinds_of_record() -> None:
    assert len(STORABLE) == 7
    assert [case for case, _ in UNSTORABLE] == ["dl-15-doc-shape-cancelled"]


@pytest.mark.parametrize(("case", "item"), STORABLE, ids=[case for case, _ in STORABLE])
def test_every_storable_sample_decodes(case: str, item: dict[str, Any]) -> None:
    record = CODEC.decode(item)
    assert record.legacy_id == item["job_id"]
    assert record.job.id == job_id_for(item["job_id"])
    assert record.job.type == item["job_type"].lower()
    assert record.extra["job_type"] == item["job_type"]
    assert record.job.created_at.tzinfo is not None
    assert record.job.created_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("case", "item"), STORABLE, ids=[case for case, _ in STORABLE])
def test_decode_encode_decode_keeps_the_job_and_legacy_id(case: str, item: dict[str, Any]) -> None:
    first = CODEC.decode(item)
    (encoded,) = CODEC.encode(first)
    second = CODEC.decode(encoded)
    assert second.job == first.job
    assert second.legacy_id == first.legacy_id


@pytest.mark.parametrize(("case", "item"), STORABLE, ids=[case for case, _ in STORABLE])
def test_re_encoding_a_sample_keeps_every_attribute(case: str, item: dict[str, Any]) -> None:
    """What the poller and server read is unchanged; only missing placeholders and retry_count 0 appear."""
    (encoded,) = CODEC.encode(CODEC.decode(item))
    original, written = meaning(item), meaning(encoded)
    for key, value in original.items():
        assert written[key] == value, key
    added = {key: encoded[key] for key in set(encoded) - set(item)}
    assert set(added) <= {*PLACEHOLDERS, "job_results", "retry_count"}
    for key, value in added.items():
        assert value == PLACEHOLDERS.get(key, value)
    assert added.get("retry_count", Decimal(0)) == Decimal(0)
    assert json.loads(added.get("job_results", "{}")) == {}


def test_the_three_timestamp_flavours_read_as_utc() -> None:
    pending = CODEC.decode(BY_CASE["dl-01-pending-api"]).job
    assert pending.created_at == datetime(2025, 6, 3, 17, 21, 9, 412000, tzinfo=UTC)  # JS 'Z'
    completed = CODEC.decode(BY_CASE["dl-05-completed"]).job
    assert completed.started_at == datetime(2025, 6, 7, 10, 0, 4, 551203, tzinfo=UTC)  # '+00:00'
    assert completed.finished_at == datetime(2025, 6, 7, 10, 9, 58, 4410, tzinfo=UTC)  # naive -> UTC


def test_pending_api_job_reads_its_placeholders_as_unset() -> None:
    record = CODEC.decode(BY_CASE["dl-01-pending-api"])
    assert record.job.status is JobStatus.QUEUED
    assert record.job.started_at is None and record.job.finished_at is None
    assert record.job.parameters["stages"][0]["stage"] == "PCA"
    assert record.job.result is None and record.job.attempts == 0
    assert record.extra["worker_id"] == "none"
    assert record.extra["version"] == 1 and type(record.extra["version"]) is int


def test_completed_job_keeps_its_results_and_lock() -> None:
    record = CODEC.decode(BY_CASE["dl-05-completed"])
    assert record.job.status is JobStatus.COMPLETED
    assert record.job.result == {"result_type": "SUCCESS", "completed_at": "2025-06-07T10:09:58.004410"}
    assert record.job.progress == 100.0 and record.job.attempts == 1
    assert record.extra["lock_expires_at"] == "2025-06-07T10:15:04.551203+00:00"


def test_non_uuid_job_ids_map_to_stable_uuids() -> None:
    item = BY_CASE["dl-07-narrative-batch-pending"]
    record = CODEC.decode(item)
    assert record.legacy_id == item["job_id"]
    assert record.job.id == job_id_for(item["job_id"]) == CODEC.decode(item).job.id
    assert record.job.type == "create_narrative_batch"
    assert record.extra["environment"] == item["environment"]
    assert CODEC.encode(record)[0]["job_id"] == item["job_id"]


def test_missing_optional_fields_read_as_defaults() -> None:
    record = CODEC.decode(BY_CASE["dl-09-awaiting-batch-pending"])
    assert record.job.parameters == {} and record.job.result is None
    assert record.job.started_at is None and record.job.attempts == 0
    assert record.extra["batch_job_id"].startswith("batch_report_")


def test_locked_for_checking_is_running_and_survives_re_encoding() -> None:
    record = CODEC.decode(BY_CASE["dl-11-locked-for-checking"])
    assert record.job.status is JobStatus.RUNNING
    assert CODEC.encode(record)[0]["status"] == "LOCKED_FOR_CHECKING"
    record.job.status = JobStatus.COMPLETED
    assert CODEC.encode(record)[0]["status"] == "COMPLETED"


def test_long_logs_stay_a_json_string() -> None:
    item = BY_CASE["dl-13-long-logs"]
    (encoded,) = CODEC.encode(CODEC.decode(item))
    assert isinstance(encoded["logs"], str)
    assert json.loads(encoded["logs"]) == json.loads(item["logs"])


def test_unstorable_doc_shape_is_rejected_naming_record_and_field() -> None:
    _case, item = UNSTORABLE[0]
    with pytest.raises(LegacyDecodeError) as caught:
        CODEC.decode(item)
    assert caught.value.record_id == item["job_id"]
    assert caught.value.field_name == "worker_id"
    assert "WorkerStatusIndex" in str(caught.value)


def test_decode_all_reports_the_unstorable_record_and_carries_on() -> None:
    result = decode_all(CODEC, [item for _, item, _ in RECORDS])
    assert len(result.decoded) == len(STORABLE)
    assert [(e.record_id, e.field_name) for e in result.errors] == [(UNSTORABLE[0][1]["job_id"], "worker_id")]


def test_doc_shape_with_native_maps_and_nulls_decodes_once_its_key_is_valid() -> None:
    item = dict(UNSTORABLE[0][1], worker_id="none")
    record = CODEC.decode(item)
    assert record.job.status is JobStatus.CANCELLED
    assert record.job.parameters == {"max_votes": 500000, "batch_size": 50000, "n_components": 2}
    assert all(type(v) is int for v in record.job.parameters.values())
    assert record.job.priority == 1  # 80 of 100
    assert record.job.started_at is None and record.job.result is None
    (encoded,) = CODEC.encode(record)
    assert isinstance(encoded["job_config"], str) and isinstance(encoded["logs"], str)
    assert encoded["started_at"] == "" and encoded["priority"] == Decimal(80)
    assert CODEC.decode(encoded).job == record.job


@pytest.mark.parametrize(
    ("field", "value"),
    [("status", "EXPLODED"), ("status", None), ("job_config", "{not json"), ("created_at", "yesterday")],
)
def test_unreadable_fields_are_named(field: str, value: Any) -> None:
    item = dict(BY_CASE["dl-01-pending-api"], **{field: value})
    with pytest.raises(LegacyDecodeError) as caught:
        CODEC.decode(item)
    assert (caught.value.record_id, caught.value.field_name) == (item["job_id"], field)


def test_status_table_round_trips() -> None:
    for legacy, canonical in CODEC.to_canonical.items():
        assert CODEC.to_canonical[CODEC.from_canonical[canonical]] is canonical, legacy
    for canonical in JobStatus:
        assert CODEC.from_canonical[canonical] in CODEC.to_canonical


@pytest.mark.parametrize("status", list(JobStatus))
def test_every_status_of_a_job_built_from_scratch_round_trips(status: JobStatus) -> None:
    job = Job(name="scratch", type="full_pipeline", status=status, parameters={"conversation_id": "42"})
    (encoded,) = CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))
    assert encoded["status"] == CODEC.from_canonical[status]
    assert CODEC.decode(encoded).job == job


def test_a_full_job_built_from_scratch_encodes_and_decodes_equal() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    job = Job(
        name="nightly report",
        type="create_narrative_batch",
        parameters={"conversation_id": 31337, "stages": [{"stage": "PCA"}], "ratio": 0.25},
        priority=3,
        org="polis",
        owner="ana",
        tags=["nightly"],
        status=JobStatus.FAILED,
        progress=42.5,
        created_at=created,
        started_at=created + timedelta(seconds=3),
        finished_at=created + timedelta(minutes=5),
        attempts=2,
        error="Process exited with code 1",
        result={"rows": 7},
        items=[JobItem(id="a", status=JobStatus.FAILED, error="x")],
    )
    record = LegacyRecord(job=job, legacy_id=job.id)
    (encoded,) = CODEC.encode(record)
    decoded = CODEC.decode(encoded)
    assert decoded.job == job and decoded.legacy_id == job.id
    assert encoded["conversation_id"] == "31337"
    assert encoded["retry_count"] == Decimal(1)
    assert json.loads(encoded["job_results"]) == {"rows": 7, "error": "Process exited with code 1"}


def test_a_legacy_writer_change_wins_over_the_sidecar() -> None:
    """A PAUSED job is PROCESSING to the poller; once the poller completes it, COMPLETED reads back."""
    job = Job(name="paused", type="full_pipeline", status=JobStatus.PAUSED)
    (encoded,) = CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))
    assert encoded["status"] == "PROCESSING"
    assert CODEC.decode(encoded).job.status is JobStatus.PAUSED
    encoded.update(status="COMPLETED", completed_at="2026-01-01T00:00:00", version=Decimal(2))
    assert CODEC.decode(encoded).job.status is JobStatus.COMPLETED


def test_encoded_items_carry_well_formed_index_keys_and_dynamodb_types() -> None:
    job = Job(name="fresh", type="full_pipeline", parameters={"conversation_id": "7"}, priority=1)
    items = [CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))[0]]
    items += [CODEC.encode(CODEC.decode(item))[0] for _, item in STORABLE]
    serializer = TypeSerializer()
    for item in items:
        assert item["status"] in CODEC.to_canonical
        assert isinstance(item["created_at"], str) and datetime.fromisoformat(item["created_at"])
        assert isinstance(item["worker_id"], str) and item["worker_id"]
        assert isinstance(item["job_type"], str) and item["job_type"]
        assert isinstance(item["priority"], Decimal) and isinstance(item["version"], Decimal)
        assert item.get("conversation_id", "x") != ""
        for key in ("job_config", "job_results", "logs"):
            json.loads(item[key])
        for value in item.values():
            serializer.serialize(value)  # raises on floats and other types DynamoDB cannot store
    fresh = items[0]
    assert (fresh["worker_id"], fresh["started_at"], fresh["completed_at"]) == ("none", "", "")
    assert (fresh["priority"], fresh["version"], fresh["job_type"]) == (
        Decimal(80),
        Decimal(1),
        "FULL_PIPELINE",
    )


def test_status_created_index_lists_pending_jobs_oldest_first() -> None:
    """The poller queries StatusCreatedIndex for PENDING and sorts by the created_at string."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    jobs = [
        Job(name=f"j{i}", type="full_pipeline", created_at=start + timedelta(seconds=i)) for i in range(5)
    ]
    items = [CODEC.encode(LegacyRecord(job=j, legacy_id=j.id))[0] for j in reversed(jobs)]
    items.append(CODEC.encode(CODEC.decode(BY_CASE["dl-01-pending-api"]))[0])
    pending = sorted((i for i in items if i["status"] == "PENDING"), key=lambda i: i["created_at"])
    assert [i["job_id"] for i in pending] == [BY_CASE["dl-01-pending-api"]["job_id"]] + [j.id for j in jobs]
