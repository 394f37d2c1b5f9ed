"""The argoitny codec against the legacy samples: META jobs, GSI keys and PROG# history."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from jobbridge.errors import JobValidationError
from jobbridge.jobs import Job, JobStatus
from jobbridge.legacy.argoitny import ArgoitnyJobCodec
from jobbridge.legacy.codec import LegacyDecodeError, LegacyRecord, decode_all, job_id_for

SAMPLES = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "legacy-samples"
    / "codeforces_jobhelper"
    / "dynamo_algoitny_main_job_items.json"
)
CODEC = ArgoitnyJobCodec()
GSI_SK = re.compile(r"^(\d{20})#(.+)$")


def load() -> list[tuple[str, dict[str, Any]]]:
    """(case_id, item as boto3's resource API returns it) for every sample record."""
    deserializer = TypeDeserializer()
    records = json.loads(SAMPLES.read_text())["records"]
    assert all(record.get("storable", True) for record in records)
    return [
        (record["case_id"], {key: deserializer.deserialize(v) for key, v in record["item"].items()})
        for record in records
    ]


RECORDS = load()
META_ITEMS = [(case, item) for case, item in RECORDS if item["SK"] == "META"]
PROGRESS_ITEMS = [(case, item) for case, item in RECORDS if item["SK"].startswith("PROG#")]
BY_CASE = dict(RECORDS)


def new_job(**fields: Any) -> Job:
    """A script generation job as jobbridge would create it."""
    defaults: dict[str, Any] = {
        "name": "codeforces 1359C Mixing Water",
        "type": "script_generation",
        "parameters": {"platform": "codeforces", "problem_id": "1359C", "language": "cpp"},
    }
    return Job(**(defaults | fields))


def check_gsi_keys(item: dict[str, Any]) -> None:
    """GSI1 (and GSI2 for SGJOB) as argoitny's list-by-status and by-problem queries expect them."""
    prefix, legacy_id = item["PK"].split("#", 1)
    assert item["GSI1PK"] == f"{prefix}#STATUS#{item['dat']['sts']}"
    match = GSI_SK.match(item["GSI1SK"])
    assert match is not None and match.group(2) == legacy_id
    assert int(match.group(1)) == item["crt"]
    if prefix == "SGJOB" and item["dat"]["plt"] and item["dat"]["pid"]:
        assert item["GSI2PK"] == f"SGJOB#{item['dat']['plt']}#{item['dat']['pid']}"
        assert item["GSI2SK"] == item["GSI1SK"]


def test_samples_hold_meta_and_progress_items() -> None:
    assert (len(META_ITEMS), len(PROGRESS_ITEMS)) == (7, 2)


@pytest.mark.parametrize(("case", "item"), META_ITEMS, ids=[case for case, _ in META_ITEMS])
def test_every_meta_sample_decodes(case: str, item: dict[str, Any]) -> None:
    record = CODEC.decode(item)
    legacy_id = item["PK"].split("#", 1)[1]
    assert record.legacy_id == legacy_id and record.job.id == job_id_for(legacy_id)
    assert record.job.type == {"sgjob": "script_generation", "pejob": "problem_extraction"}[item["tp"]]
    assert record.job.created_at == datetime.fromtimestamp(int(item["crt"]), UTC)
    assert record.job.status is CODEC.to_canonical[item["dat"]["sts"]]
    assert type(record.extra["upd"]) is int


@pytest.mark.parametrize(("case", "item"), META_ITEMS, ids=[case for case, _ in META_ITEMS])
def test_decode_encode_decode_keeps_the_job_and_legacy_id(case: str, item: dict[str, Any]) -> None:
    first = CODEC.decode(item)
    (encoded,) = CODEC.encode(first)
    second = CODEC.decode(encoded)
    assert second.job == first.job and second.legacy_id == first.legacy_id
    assert second.extra == first.extra


@pytest.mark.parametrize(("case", "item"), META_ITEMS, ids=[case for case, _ in META_ITEMS])
def test_re_encoding_a_sample_gives_the_same_item(case: str, item: dict[str, Any]) -> None:
    """Byte-for-byte what argoitny wrote, except that an item without GSI1 gains it."""
    (encoded,) = CODEC.encode(CODEC.decode(item))
    added = set(encoded) - set(item)
    assert {key: encoded[key] for key in item} == item
    assert added <= {"GSI1PK", "GSI1SK"}
    check_gsi_keys(encoded)


def test_base64_generator_code_is_decoded_and_re_encoded() -> None:
    item = BY_CASE["cf-sg-03-completed-b64"]
    record = CODEC.decode(item)
    code = record.job.result["generator_code"]
    assert code.startswith("import random\n\ndef generate(n):")
    assert CODEC.encode(record)[0]["dat"]["gen"] == item["dat"]["gen"]


def test_generator_code_that_is_not_base64_is_read_as_it_is() -> None:
    item = json.loads(json.dumps(BY_CASE["cf-sg-01-pending"], default=int))
    item["dat"]["gen"] = "print('hi')  # written before base64"
    assert CODEC.decode(item).job.result == {"generator_code": "print('hi')  # written before base64"}


def test_orphaned_job_keeps_its_task_id_and_error() -> None:
    record = CODEC.decode(BY_CASE["cf-sg-05-orphaned"])
    assert record.job.status is JobStatus.FAILED
    assert record.job.error == "Job orphaned - no updates for > 10 minutes"
    assert record.extra["tid"] == "353f66d8-282e-483d-a60b-16b5567bda1d"
    assert record.job.finished_at == datetime.fromtimestamp(1760004900, UTC)


def test_empty_strings_and_lists_are_unset_and_unicode_survives() -> None:
    baekjoon = CODEC.decode(BY_CASE["cf-sg-07-baekjoon-no-url-tags"]).job
    assert "problem_url" not in baekjoon.parameters and "tags" not in baekjoon.parameters
    assert baekjoon.parameters["constraints"].startswith("두 정수")
    pending = CODEC.decode(BY_CASE["cf-pe-01-pending-empty-ids"]).job
    assert pending.parameters == {"problem_url": "https://codeforces.com/contest/1520/problem/E"}
    assert pending.name == "https://codeforces.com/contest/1520/problem/E"


def test_migrated_integer_id_without_gsi1_decodes_and_gains_gsi1() -> None:
    record = CODEC.decode(BY_CASE["cf-pe-05-legacy-int-id"])
    assert record.legacy_id == "42" and record.job.id == job_id_for("42")
    (encoded,) = CODEC.encode(record)
    assert encoded["PK"] == "PEJOB#42"
    assert (encoded["GSI1PK"], encoded["GSI1SK"]) == ("PEJOB#STATUS#COMPLETED", "00000000001759990100#42")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dat": {"sts": "EXPLODED"}}, "status"),
        ({"crt": None}, "crt"),
        ({"crt": "last tuesday"}, "crt"),
        ({"dat": None}, "dat"),
        ({"SK": "PROG#1"}, "SK"),
        ({"PK": "XJOB#1"}, "PK"),
    ],
)
def test_unreadable_records_are_named_and_never_stop_a_batch(change: dict[str, Any], field: str) -> None:
    good = BY_CASE["cf-sg-01-pending"]
    bad = dict(good, **change)
    if isinstance(change.get("dat"), dict):
        bad["dat"] = dict(good["dat"], **change["dat"])
    with pytest.raises(LegacyDecodeError) as caught:
        CODEC.decode(bad)
    assert (caught.value.record_id, caught.value.field_name) == (bad["PK"], field)
    result = decode_all(CODEC, [good, bad, BY_CASE["cf-pe-03-completed"]])
    assert len(result.decoded) == 2 and [e.field_name for e in result.errors] == [field]


def test_status_tables_round_trip() -> None:
    for to_canonical, from_canonical in (
        (CODEC.to_canonical, CODEC.from_canonical),
        (CODEC.progress_to_canonical, CODEC.progress_from_canonical),
    ):
        for canonical in to_canonical.values():
            assert to_canonical[from_canonical[canonical]] is canonical
        for canonical in JobStatus:
            assert from_canonical[canonical] in to_canonical


@pytest.mark.parametrize("status", list(JobStatus))
def test_every_status_of_a_job_built_from_scratch_round_trips(status: JobStatus) -> None:
    job = new_job(status=status)
    (encoded,) = CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))
    assert encoded["dat"]["sts"] == CODEC.from_canonical[status]
    check_gsi_keys(encoded)
    assert CODEC.decode(encoded).job == job


def test_a_full_job_built_from_scratch_encodes_and_decodes_equal() -> None:
    created = datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    job = new_job(
        type="problem_extraction",
        parameters={"problem_url": "https://codeforces.com/contest/1/problem/A", "platform": "codeforces"},
        priority=1,
        org="algo",
        owner="kim",
        tags=["batch"],
        status=JobStatus.COMPLETED,
        progress=100.0,
        created_at=created,
        started_at=created + timedelta(seconds=2),
        finished_at=created + timedelta(seconds=90),
        attempts=1,
        result={"title": "Theatre Square"},
    )
    (encoded,) = CODEC.encode(LegacyRecord(job=job, legacy_id="7", extra={"tid": "celery-1"}))
    decoded = CODEC.decode(encoded)
    assert decoded.job == job and decoded.legacy_id == "7"
    assert encoded["dat"]["tid"] == "celery-1"
    assert encoded["upd"] == Decimal(int((created + timedelta(seconds=90)).timestamp()))


def test_an_argoitny_writer_change_wins_over_the_sidecar() -> None:
    job = new_job(status=JobStatus.CANCELLED)
    (encoded,) = CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))
    assert encoded["dat"]["sts"] == "FAILED" and CODEC.decode(encoded).job.status is JobStatus.CANCELLED
    encoded["dat"]["sts"] = "PENDING"  # re-submitted through argoitny's own API
    assert CODEC.decode(encoded).job.status is JobStatus.QUEUED


def test_other_job_types_cannot_be_stored() -> None:
    job = Job(name="x", type="sync")
    with pytest.raises(JobValidationError, match="script_generation"):
        CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))


def test_encoded_items_use_dynamodb_types() -> None:
    serializer = TypeSerializer()
    job = new_job(progress=12.5, parameters={"platform": "codeforces", "problem_id": 1, "tags": ["dp"]})
    for item in [CODEC.encode(LegacyRecord(job=job, legacy_id=job.id))[0]] + [
        CODEC.encode(CODEC.decode(item))[0] for _, item in META_ITEMS
    ]:
        assert isinstance(item["crt"], Decimal) and isinstance(item["upd"], Decimal)
        assert item["upd"] >= item["crt"]
        for value in item.values():
            serializer.serialize(value)


def test_list_by_status_on_gsi1_finds_newest_first() -> None:
    """argoitny's list_jobs(status=...) queries GSI1PK and reads GSI1SK descending."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    jobs = [new_job(created_at=start + timedelta(minutes=i)) for i in range(4)]
    jobs.append(new_job(created_at=start, status=JobStatus.RUNNING))
    items = [CODEC.encode(LegacyRecord(job=j, legacy_id=j.id))[0] for j in jobs]
    items += [CODEC.encode(CODEC.decode(item))[0] for _, item in META_ITEMS]
    pending = [i for i in items if i["GSI1PK"] == "SGJOB#STATUS#PENDING"]
    newest_first = sorted(pending, key=lambda i: i["GSI1SK"], reverse=True)
    assert [CODEC.decode(i).job.id for i in newest_first[:4]] == [j.id for j in reversed(jobs[:4])]
    assert {i["PK"] for i in pending} >= {BY_CASE["cf-sg-01-pending"]["PK"]}
    assert all(CODEC.decode(i).job.status is JobStatus.QUEUED for i in pending[4:])


@pytest.mark.parametrize(("case", "item"), PROGRESS_ITEMS, ids=[case for case, _ in PROGRESS_ITEMS])
def test_progress_samples_decode_and_re_encode_identically(case: str, item: dict[str, Any]) -> None:
    progress = CODEC.decode_progress(item)
    assert progress.job_type == "problem_extraction" and progress.seq == 0
    assert progress.at == datetime.fromtimestamp(int(item["crt"]), UTC)
    assert progress.status is CODEC.progress_to_canonical[item["dat"]["sts"]]
    job = Job(id=progress.job_id, name="x", type=progress.job_type, status=progress.status)
    record = LegacyRecord(job=job, legacy_id=progress.legacy_id)
    assert CODEC.progress_item(record, progress.at, progress.seq, progress.step, progress.message) == item


def test_progress_items_of_one_second_do_not_collide_and_sort_in_order() -> None:
    job = new_job(status=JobStatus.RUNNING)
    at = datetime(2026, 1, 1, 12, 0, 0, 900000, tzinfo=UTC)
    items = [CODEC.progress_item(job, at, seq, f"step {seq}", "m") for seq in range(3)]
    items.append(CODEC.progress_item(job, at + timedelta(seconds=1), 0, "next", "m"))
    assert len({i["SK"] for i in items}) == 4
    assert [i["SK"] for i in sorted(items, key=lambda i: i["SK"])] == [i["SK"] for i in items]
    assert items[0]["PK"] == f"JOB#generation#{job.id}" and items[0]["dat"]["sts"] == "in_progress"
    assert [CODEC.decode_progress(i).seq for i in items] == [0, 1, 2, 0]


def test_progress_step_is_truncated_like_argoitny_does() -> None:
    job = new_job(status=JobStatus.FAILED)
    item = CODEC.progress_item(job, datetime(2026, 1, 1, tzinfo=UTC), 0, "s" * 300, "long " * 1000)
    assert len(item["dat"]["stp"]) == 100 and item["dat"]["sts"] == "failed"
    assert CODEC.decode_progress(item).message == "long " * 1000


def test_unknown_progress_status_is_named() -> None:
    item = json.loads(json.dumps(BY_CASE["cf-pr-02-in-progress"], default=int))
    item["dat"]["sts"] = "paused"
    with pytest.raises(LegacyDecodeError) as caught:
        CODEC.decode_progress(item)
    assert caught.value.field_name == "status" and item["PK"] in caught.value.record_id
