"""ScientistCloud codec: every sample decodes, round trips keep meaning, the status tables go both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import json_util

from jobbridge.jobs import Job, JobStatus, JobType
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, decode_all, job_id_for
from jobbridge.legacy.scientistcloud import (
    DATASET_COARSER,
    ScientistCloudJobCodec,
    dataset_status,
    status_from_dataset,
)

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "legacy-samples" / "scientistcloud"
codec = ScientistCloudJobCodec()


def _records(name: str) -> dict[str, dict[str, Any]]:
    """Sample documents by case id, as pymongo returns them (json_util: ObjectId, naive UTC datetimes)."""
    data = json_util.loads((SAMPLES / name).read_text())
    return {record["case_id"]: record["item"] for record in data["records"]}


JOBS = _records("mongo_jobs_collection.json")
DATASETS = _records("mongo_visstoredatas_collection.json")


@pytest.mark.parametrize("case_id", sorted(JOBS))
def test_every_jobs_document_decodes_and_keeps_its_id(case_id: str) -> None:
    record = codec.decode(JOBS[case_id])
    assert record.legacy_id == JOBS[case_id]["job_id"]
    assert record.job.id == job_id_for(JOBS[case_id]["job_id"])
    assert record.job.created_at.tzinfo is UTC


def test_pending_google_sync_reads_as_canonical_sync() -> None:
    job = codec.decode(JOBS["sc-job-01-pending-google-sync"]).job
    assert (job.type, job.status, job.priority, job.owner) == (
        "sync",
        JobStatus.PENDING,
        2,
        "amy@example.edu",
    )
    assert job.created_at == datetime(2025, 11, 5, 10, 14, 3, 120000, tzinfo=UTC)
    assert job.parameters["data_url"].startswith("https://drive.google.com/")


def test_failed_job_finishes_at_its_last_update_since_completed_at_is_only_set_on_success() -> None:
    job = codec.decode(JOBS["sc-job-05-failed-exhausted"]).job
    assert (job.status, job.attempts, job.finished_at) == (
        JobStatus.FAILED,
        2,
        datetime(2025, 11, 6, 12, 11, 31, tzinfo=UTC),
    )
    assert job.error is not None and job.error.startswith("Dataset conversion failed")


def test_unknown_job_type_is_kept_as_its_own_type() -> None:
    record = codec.decode(JOBS["sc-job-09-unknown-type"])
    assert (record.job.type, record.job.status) == ("idx_rebuild", JobStatus.RETRYING)
    assert codec.encode(record)[0]["job_type"] == "idx_rebuild"


def test_upload_processor_document_keeps_its_layout_and_vocabulary() -> None:
    doc = JOBS["sc-job-11-upload-queued"]
    record = codec.decode(doc)
    assert (record.job.type, record.job.status, record.job.priority) == ("upload", JobStatus.QUEUED, 2)
    assert record.job.name == "Drone survey 2025-11"
    encoded = codec.encode(record)[0]
    assert encoded["status"] == "queued" and "parameters" not in encoded and "priority" not in encoded


@pytest.mark.parametrize("case_id", sorted(JOBS))
def test_decode_encode_decode_keeps_the_meaning(case_id: str) -> None:
    first = codec.decode(JOBS[case_id])
    second = codec.decode(codec.encode(first)[0])
    assert (second.job, second.legacy_id) == (first.job, first.legacy_id)


@pytest.mark.parametrize("case_id", sorted(JOBS))
def test_encoding_a_legacy_document_writes_it_back_unchanged(case_id: str) -> None:
    assert codec.encode(codec.decode(JOBS[case_id]))[0] == JOBS[case_id]


def test_unknown_status_names_the_record_and_the_field() -> None:
    doc = {**JOBS["sc-job-01-pending-google-sync"], "status": "exploded"}
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode(doc)
    assert (caught.value.record_id, caught.value.field_name) == (doc["job_id"], "status")
    assert "exploded" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"job_id": None}, "job_id"),
        ({"created_at": "not a date"}, "created_at"),
        ({"priority": 7}, "priority"),
        ({"parameters": "a string"}, "parameters"),
        ({"attempts": 1.5}, "attempts"),
        ({"job_type": "Has Spaces"}, "job_type"),
    ],
)
def test_an_unreadable_field_is_named(change: dict[str, Any], field_name: str) -> None:
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode({**JOBS["sc-job-07-low-priority-compression"], **change})
    assert caught.value.field_name == field_name
    assert caught.value.record_id != ""


def test_a_bad_document_never_stops_a_batch() -> None:
    broken = {**JOBS["sc-job-01-pending-google-sync"], "job_id": "broken-1", "status": "??"}
    documents = [*JOBS.values(), broken]
    result = decode_all(codec, documents)
    assert len(result.decoded) == len(JOBS)
    assert [(e.record_id, e.field_name) for e in result.errors] == [("broken-1", "status")]


def test_extended_json_dates_and_iso_strings_are_read() -> None:
    doc = {
        **JOBS["sc-job-07-low-priority-compression"],
        "created_at": {"$date": "2025-11-07T02:00:00.000Z"},
        "updated_at": "2025-11-07T02:00:00+00:00",
    }
    assert codec.decode(doc).job.created_at == datetime(2025, 11, 7, 2, tzinfo=UTC)


@pytest.mark.parametrize("status", list(JobStatus))
def test_status_table_round_trips_or_becomes_the_documented_coarser_status(status: JobStatus) -> None:
    legacy = codec.from_canonical[status]
    assert codec.to_canonical[legacy] in {status, codec.coarser.get(status)}
    assert (codec.to_canonical[legacy] == status) is (status not in codec.coarser)


def _full_job(**changes: Any) -> Job:
    start = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    values: dict[str, Any] = {
        "name": "convert survey",
        "type": "convert",
        "parameters": {"input_path": "/mnt/in", "dataset_uuid": "d-1", "ratio": 0.25},
        "priority": 1,
        "org": "lab",
        "owner": "bob@example.edu",
        "tags": ["drone", "rgb"],
        "status": JobStatus.RUNNING,
        "progress": 42.5,
        "created_at": start,
        "started_at": start + timedelta(seconds=5),
        "attempts": 1,
        "result": {"tiles": 12},
    }
    return Job(**{**values, **changes})


@pytest.mark.parametrize("status", list(JobStatus))
def test_a_job_built_from_scratch_encodes_and_decodes_equal(status: JobStatus) -> None:
    job = _full_job(
        status=status, finished_at=datetime(2026, 1, 2, 5, tzinfo=UTC) if status.is_final else None
    )
    doc = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert doc["job_type"] == "dataset_conversion" and doc["dataset_uuid"] == "d-1"
    assert doc["status"] == codec.from_canonical[status]
    decoded = codec.decode(doc)
    assert (decoded.job, decoded.legacy_id) == (job, job.id)


def test_a_plain_new_job_needs_no_jobbridge_sub_document() -> None:
    job = Job(
        name="google_sync d-2",
        type="sync",
        parameters={"dataset_uuid": "d-2"},
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    doc = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert "jobbridge" not in doc
    assert codec.decode(doc).job == job


def test_times_are_written_to_the_millisecond_mongo_keeps() -> None:
    created = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    job = _full_job(created_at=created, started_at=None)
    doc = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert doc["created_at"] == datetime(2026, 1, 1, 0, 0, 0, 123000)
    assert codec.decode(doc).job.created_at == created.replace(microsecond=123000)


def test_legacy_worker_query_pending_by_priority_then_age_finds_mirrored_jobs() -> None:
    """``find({'status': 'pending'}).sort([('priority', 1), ('created_at', 1)])`` on what encode writes."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    jobs = [
        Job(name="low", type="compress", priority=3, created_at=base),
        Job(name="high-late", type="convert", priority=1, created_at=base + timedelta(minutes=2)),
        Job(name="high-early", type="sync", priority=1, created_at=base + timedelta(minutes=1)),
        Job(name="queued", type="sync", priority=2, status=JobStatus.QUEUED, created_at=base),
        Job(name="running", type="sync", priority=1, status=JobStatus.RUNNING, created_at=base),
    ]
    docs = [codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0] for job in jobs]
    docs += [codec.encode(codec.decode(doc))[0] for doc in JOBS.values()]
    pending = sorted(
        (d for d in docs if d["status"] == "pending"), key=lambda d: (d["priority"], d["created_at"])
    )
    names = [codec.decode(d).job.name for d in pending]
    assert names[:2] == ["high-early", "high-late"]
    assert names.index("queued") < names.index("low")
    assert "running" not in names


EXPECTED_DATASET = {
    "sc-ds-01-submitted-legacy": JobStatus.PENDING,
    "sc-ds-03-syncing": JobStatus.RUNNING,
    "sc-ds-05-converting-stale": JobStatus.RUNNING,
    "sc-ds-07-sync-error": JobStatus.FAILED,
    "sc-ds-09-conversion-failed": JobStatus.FAILED,
    "sc-ds-11-uploading-with-jobid": JobStatus.RUNNING,
    "sc-ds-13-unmapped-statuses": JobStatus.PAUSED,
}


def test_every_dataset_status_sample_decodes() -> None:
    assert set(EXPECTED_DATASET) == set(DATASETS)
    for case_id, doc in DATASETS.items():
        assert status_from_dataset(doc["status"], doc["uuid"]) == EXPECTED_DATASET[case_id], case_id


def test_unknown_dataset_status_names_the_dataset_and_the_field() -> None:
    with pytest.raises(LegacyDecodeError) as caught:
        status_from_dataset("unknown", "ds-1")
    assert (caught.value.record_id, caught.value.field_name) == ("ds-1", "status")


@pytest.mark.parametrize(
    ("job_type", "queued", "running", "failed"),
    [
        (JobType.SYNC, "sync queued", "syncing", "sync error"),
        (JobType.CONVERT, "conversion queued", "converting", "conversion failed"),
        (JobType.UPLOAD, "upload queued", "uploading", "upload error"),
        (JobType.COMPRESS, "submitted", "zipping", "compression error"),
        ("idx_rebuild", "submitted", "processing", "failed"),
    ],
)
def test_dataset_status_follows_the_job_type(job_type: str, queued: str, running: str, failed: str) -> None:
    def shown(status: JobStatus) -> str:
        return dataset_status(Job(name="n", type=job_type, status=status))

    assert (shown(JobStatus.QUEUED), shown(JobStatus.RUNNING), shown(JobStatus.FAILED)) == (
        queued,
        running,
        failed,
    )
    assert (shown(JobStatus.PENDING), shown(JobStatus.COMPLETED)) == ("submitted", "done")
    for status in JobStatus:
        assert status_from_dataset(shown(status)) in {status, DATASET_COARSER.get(status)}, status


def test_a_scientistcloud_writer_change_wins_over_the_jobbridge_sub_document() -> None:
    """The sub-document applies only while the legacy fields still say what they said when it was written."""
    job = _full_job(status=JobStatus.CANCELLING, name="exact name", progress=10.0)
    doc = codec.encode(LegacyRecord(job=job, legacy_id=job.id))[0]
    assert doc["status"] == "running" and doc["jobbridge"]["status"] == ["CANCELLING", "RUNNING"]
    assert codec.decode(doc).job.status is JobStatus.CANCELLING
    finished = datetime(2026, 1, 2, 6, tzinfo=UTC)
    doc.update(status="completed", completed_at=finished.replace(tzinfo=None))  # a legacy worker finished it
    decoded = codec.decode(doc).job
    assert (decoded.status, decoded.finished_at) == (JobStatus.COMPLETED, finished)
    assert (decoded.name, decoded.progress) == ("exact name", 10.0)  # entries whose fields did not change


def test_a_jobbridge_sub_document_that_is_not_pairs_is_named() -> None:
    doc = {**JOBS["sc-job-07-low-priority-compression"], "jobbridge": {"name": "only a value"}}
    with pytest.raises(LegacyDecodeError) as caught:
        codec.decode(doc)
    assert caught.value.field_name == "jobbridge" and "pair" in str(caught.value)


@pytest.mark.parametrize("case_id", sorted(DATASETS))
def test_every_dataset_status_sample_round_trips_through_a_job_of_each_type(case_id: str) -> None:
    status = status_from_dataset(DATASETS[case_id]["status"], DATASETS[case_id]["uuid"])
    for job_type in [*JobType, "idx_rebuild"]:
        shown = dataset_status(Job(name="n", type=job_type, status=status))
        assert status_from_dataset(shown) in {status, DATASET_COARSER.get(status)}, job_type
