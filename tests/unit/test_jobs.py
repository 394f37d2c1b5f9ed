"""The Job model and the canonical status vocabulary."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect.client.schemas.objects import StateType
from prefect.states import (
    AwaitingConcurrencySlot,
    AwaitingRetry,
    Cancelled,
    Cancelling,
    Completed,
    Crashed,
    Failed,
    InfrastructurePending,
    Late,
    Paused,
    Pending,
    Retrying,
    Running,
    Scheduled,
    Submitting,
    Suspended,
)
from pydantic import ValidationError

from jobbridge.jobs import FINAL_STATUSES, Job, JobStatus, parse_priority, status_from_prefect


def test_type_and_job_type_are_the_same_field() -> None:
    assert Job(name="a", type="extract").job_type == "extract"
    assert Job(name="a", job_type="extract").type == "extract"
    assert Job(name="a", type="extract", job_type="extract").type == "extract"


def test_type_and_job_type_that_disagree_name_both_fields() -> None:
    with pytest.raises(ValidationError) as info:
        Job(name="a", type="extract", job_type="compress")
    message = str(info.value)
    assert "'type'" in message and "'job_type'" in message


def test_config_is_an_alias_of_parameters() -> None:
    job = Job(name="a", type="train", config={"epochs": 3})
    assert job.parameters == {"epochs": 3} and job.config == {"epochs": 3}
    with pytest.raises(ValidationError, match=r"'parameters'.*'config'"):
        Job(name="a", type="train", config={"a": 1}, parameters={"a": 2})


def test_legacy_type_names_become_canonical() -> None:
    assert Job(name="a", job_type="file_extraction").type == "extract"
    assert Job(name="a", type="dataset_conversion").type == "convert"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (1, 1),
        (2, 2),
        (3, 3),
        ("1", 1),
        ("low", 3),
        ("medium", 2),
        ("HIGH", 1),
        ("critical", 1),
        (2.0, 2),
    ],
)
def test_priority_accepts_numbers_and_names(given: object, expected: int) -> None:
    assert parse_priority(given) == expected
    assert Job(name="a", type="x", priority=given).priority == expected


@pytest.mark.parametrize("bad", [0, 4, -1, "urgent", "", None, True, 1.5])
def test_bad_priority_is_rejected_with_what_is_accepted(bad: object) -> None:
    with pytest.raises(ValidationError, match="low/medium/high/critical"):
        Job(name="a", type="x", priority=bad)


def test_timestamps_are_utc_and_iso() -> None:
    naive = datetime(2026, 1, 2, 3, 4, 5)
    plus_two = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    job = Job(name="a", type="x", created_at=naive, started_at=plus_two)
    assert job.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert job.started_at == job.created_at
    data = json.loads(job.to_json())
    assert data["created_at"] == "2026-01-02T03:04:05Z"


def test_unknown_fields_and_bad_ids_are_errors() -> None:
    with pytest.raises(ValidationError, match="colour"):
        Job(name="a", type="x", colour="red")
    with pytest.raises(ValidationError, match="not a UUID"):
        Job(name="a", type="x", id="job-1")
    with pytest.raises(ValidationError, match="job type name"):
        Job(name="a", type="Not A Type!")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
aware_datetimes = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(
    name=st.text(min_size=1, max_size=50),
    job_type=st.sampled_from(["extract", "compress", "validate", "train", "my-type_2"]),
    parameters=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    priority=st.integers(1, 3),
    status=st.sampled_from(list(JobStatus)),
    progress=st.floats(0, 100),
    created=aware_datetimes,
    finished=st.none() | aware_datetimes,
    tags=st.lists(st.text(max_size=10), max_size=4),
    result=json_values,
)
def test_json_round_trip_is_equal(
    name: str,
    job_type: str,
    parameters: dict[str, object],
    priority: int,
    status: JobStatus,
    progress: float,
    created: datetime,
    finished: datetime | None,
    tags: list[str],
    result: object,
) -> None:
    job = Job(
        name=name,
        type=job_type,
        parameters=parameters,
        priority=priority,
        status=status,
        progress=progress,
        created_at=created,
        finished_at=finished,
        tags=tags,
        result=result,
    )
    assert Job.from_json(job.to_json()) == job
    assert Job.model_validate(json.loads(job.to_json())) == job


# Every Prefect state constructor, and what it means for a job.
PREFECT_STATES = [
    (Scheduled(), JobStatus.QUEUED),
    (Late(), JobStatus.QUEUED),
    (AwaitingRetry(), JobStatus.RETRYING),
    (AwaitingConcurrencySlot(), JobStatus.PENDING),
    (Pending(), JobStatus.QUEUED),
    (Submitting(), JobStatus.QUEUED),
    (InfrastructurePending(), JobStatus.QUEUED),
    (Running(), JobStatus.RUNNING),
    (Retrying(), JobStatus.RUNNING),
    (Paused(), JobStatus.PAUSED),
    (Suspended(), JobStatus.PAUSED),
    (Cancelling(), JobStatus.CANCELLING),
    (Completed(), JobStatus.COMPLETED),
    (Failed(), JobStatus.FAILED),
    (Cancelled(), JobStatus.CANCELLED),
    (Crashed(), JobStatus.CRASHED),
]


@pytest.mark.parametrize(("state", "expected"), PREFECT_STATES, ids=lambda v: getattr(v, "name", ""))
def test_every_prefect_state_maps_to_a_canonical_status(state: object, expected: JobStatus) -> None:
    assert status_from_prefect(state.type.value, state.name) is expected  # type: ignore[attr-defined]


def test_every_prefect_state_type_is_covered() -> None:
    covered = {state.type for state, _ in PREFECT_STATES}  # type: ignore[attr-defined]
    assert covered == set(StateType)
    for state_type in StateType:
        assert isinstance(status_from_prefect(state_type.value, None), JobStatus)


def test_final_statuses_are_exactly_the_terminal_prefect_types() -> None:
    terminal = {
        status_from_prefect(t.value)
        for t in StateType
        if t.value in {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
    }
    assert terminal == set(FINAL_STATUSES)


def test_unknown_prefect_state_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown Prefect state type"):
        status_from_prefect("EXPLODED")
    assert status_from_prefect(None) is JobStatus.PENDING
