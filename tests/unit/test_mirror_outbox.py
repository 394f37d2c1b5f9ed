"""The mirror's pure logic: the outbox's verdicts and order, event parsing, layout routing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobbridge.jobs import Job, JobStatus
from jobbridge.mirror.events import StateChange
from jobbridge.mirror.outbox import Outbox, Verdict, percentile
from jobbridge.mirror.target import layouts_for
from jobbridge.mirror.transition import Transition
from jobbridge.processes import infrastructure_id, local_pid_of

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TARGETS = [("dynamodb:jobbridge", 0), ("mongodb:jobbridge", 0)]


def _transition(job: Job, status: JobStatus, seconds: float) -> Transition:
    return Transition.of(job.model_copy(update={"status": status}), T0 + timedelta(seconds=seconds))


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox.sqlite3")


@pytest.fixture
def job() -> Job:
    return Job(type="compress", name="n", created_at=T0)


def test_in_order_transitions_are_queued_once_per_target_in_order(outbox: Outbox, job: Job) -> None:
    for index, status in enumerate([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]):
        assert outbox.offer(_transition(job, status, index), TARGETS) == Verdict.CURRENT
    pending = outbox.pending("dynamodb:jobbridge", 0)
    assert [d.transition.job.status for d in pending] == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.COMPLETED,
    ]
    assert not any(d.transition.history_only for d in pending)
    assert len(outbox.pending("mongodb:jobbridge", 0)) == 3


def test_duplicates_and_same_status_changes_queue_nothing(outbox: Outbox, job: Job) -> None:
    scheduled = _transition(job, JobStatus.QUEUED, 0)
    assert outbox.offer(scheduled, TARGETS) == Verdict.CURRENT
    assert outbox.offer(scheduled, TARGETS) == Verdict.DUPLICATE
    assert outbox.offer(_transition(job, JobStatus.QUEUED, 1), TARGETS) == Verdict.UNCHANGED  # Pending
    assert len(outbox.pending("dynamodb:jobbridge", 0)) == 1


def test_a_late_transition_is_history_only_and_never_current(outbox: Outbox, job: Job) -> None:
    outbox.offer(_transition(job, JobStatus.QUEUED, 0), TARGETS)
    outbox.offer(_transition(job, JobStatus.COMPLETED, 2), TARGETS)
    assert outbox.offer(_transition(job, JobStatus.RUNNING, 1), TARGETS) == Verdict.HISTORY
    late = outbox.pending("dynamodb:jobbridge", 0)[-1]
    assert late.transition.job.status is JobStatus.RUNNING and late.transition.history_only
    assert outbox.known_status(job.id) == (_transition(job, JobStatus.COMPLETED, 2).seq, JobStatus.COMPLETED)
    assert outbox.open_jobs() == []


def test_a_late_arrival_repeating_the_next_status_is_not_written(outbox: Outbox, job: Job) -> None:
    outbox.offer(_transition(job, JobStatus.QUEUED, 1), TARGETS)  # Pending arrives first
    assert outbox.offer(_transition(job, JobStatus.QUEUED, 0), TARGETS) == Verdict.UNCHANGED  # Scheduled


def test_delivery_records_lag_and_errors_for_status(outbox: Outbox, job: Job) -> None:
    outbox.offer(_transition(job, JobStatus.QUEUED, 0), TARGETS)
    outbox.offer(_transition(job, JobStatus.RUNNING, 1), TARGETS)
    first, second = outbox.pending("dynamodb:jobbridge", 0)
    outbox.failed(first, "EndpointConnectionError: down")
    assert outbox.pending("dynamodb:jobbridge", 0)[0].attempts == 1  # still first in line
    outbox.delivered(first, written=True, lag=0.25)
    outbox.delivered(second, written=False, lag=9.0)  # the store had it: not a lag sample
    status = {t.target: t for t in outbox.status().targets}
    dynamo = status["dynamodb:jobbridge"]
    assert (dynamo.depth, dynamo.delivered, dynamo.skipped) == (0, 1, 1)
    assert dynamo.lag_p50 == dynamo.lag_p99 == 0.25
    assert dynamo.last_error == "EndpointConnectionError: down"
    assert status["mongodb:jobbridge"].depth == 2 and status["mongodb:jobbridge"].oldest_age is not None


def test_rejected_rows_are_dropped_and_counted(outbox: Outbox, job: Job) -> None:
    outbox.offer(_transition(job, JobStatus.QUEUED, 0), [("dynamodb:argoitny", 1)])
    (row,) = outbox.pending("dynamodb:argoitny", 1)
    outbox.rejected(row, "field 'type' cannot be stored")
    (status,) = outbox.status().targets
    assert (status.depth, status.rejected) == (0, 1)


def test_the_outbox_survives_a_restart(tmp_path: Path, job: Job) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path).offer(_transition(job, JobStatus.QUEUED, 0), TARGETS)
    Outbox(path).set_cursor("2026-01-01T00:00:00+00:00")
    reopened = Outbox(path)
    assert len(reopened.pending("mongodb:jobbridge", 0)) == 1
    assert reopened.cursor() == "2026-01-01T00:00:00+00:00"
    assert reopened.offer(_transition(job, JobStatus.QUEUED, 0), TARGETS) == Verdict.DUPLICATE


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(v) for v in range(101)], 0.99) == 99.0


EVENT = {
    "occurred": "2026-11-25T22:07:13.100719Z",
    "event": "prefect.flow-run.Running",
    "resource": {
        "prefect.resource.id": "prefect.flow-run.c0cd5b5c-496f-4fa6-833f-515820a3b4cf",
        "prefect.run-count": "1",
        "prefect.state-message": "",
        "prefect.state-name": "Running",
        "prefect.state-timestamp": "2026-11-25T22:07:13.100719+00:00",
        "prefect.state-type": "RUNNING",
    },
    "related": [
        {"prefect.resource.id": "prefect.flow.c123", "prefect.resource.role": "flow"},
        {"prefect.resource.id": "prefect.tag.jobbridge", "prefect.resource.role": "tag"},
        {"prefect.resource.id": "prefect.tag.jobbridge:type:compress", "prefect.resource.role": "tag"},
    ],
    "id": "01a214bf-a2cc-7b27-ad70-a85ffd111c5d",
}


def test_a_state_event_reads_as_a_state_change() -> None:
    change = StateChange.from_event(json.loads(json.dumps(EVENT)))
    assert change is not None
    assert change.run_id == "c0cd5b5c-496f-4fa6-833f-515820a3b4cf"
    assert (change.state_type, change.state_name, change.run_count) == ("RUNNING", "Running", 1)
    assert change.timestamp == datetime(2026, 11, 25, 22, 7, 13, 100719, tzinfo=UTC)
    assert change.tags == ("jobbridge", "jobbridge:type:compress")
    assert not change.is_final


def test_heartbeats_and_other_resources_are_not_state_changes() -> None:
    heartbeat = {
        **EVENT,
        "event": "prefect.flow-run.heartbeat",
        "resource": {"prefect.resource.id": "prefect.flow-run.x"},
    }
    assert StateChange.from_event(heartbeat) is None
    task_run = {**EVENT, "resource": {**EVENT["resource"], "prefect.resource.id": "prefect.task-run.x"}}
    assert StateChange.from_event(task_run) is None


def test_layouts_follow_job_type_and_tags() -> None:
    by_type = {"scientistcloud": ["upload", "convert"], "delphi": ["*"]}
    assert layouts_for(Job(name="u", type="upload"), by_type) == {"jobbridge", "scientistcloud", "delphi"}
    assert layouts_for(Job(name="t", type="train"), {"scientistcloud": ["upload"]}) == {"jobbridge"}
    tagged = Job(name="t", type="train", tags=["mirror:receipt_trainer"])
    assert layouts_for(tagged, {}) == {"jobbridge", "receipt_trainer"}


def test_only_this_hosts_infrastructure_ids_name_a_local_pid() -> None:
    assert local_pid_of(infrastructure_id(4242)) == 4242
    assert local_pid_of("4242") is None  # a stock worker's bare pid: host unknown
    assert local_pid_of("some-other-host:4242") is None
    assert local_pid_of(None) is None
