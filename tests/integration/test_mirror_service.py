"""The mirror service end to end: real Prefect server and worker, moto_server and nx-27017, real faults.

The session stack runs ``jobbridge mirror run`` as a process, as ``jobbridge stack up`` does for users;
these tests submit jobs through the work pool and read what arrives in the stores. The tests that break a
store or the worker restore it (``Stack.up`` restarts what is gone) before they finish.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from pymongo import MongoClient

from jobbridge.control import get_job, submit
from jobbridge.jobs import Job, JobStatus, utcnow
from jobbridge.mirror.dynamodb import DynamoDBJobStore
from jobbridge.mirror.mongodb import MongoJobStore
from jobbridge.mirror.outbox import Outbox
from jobbridge.mirror.service import MirrorService, mirror_status
from jobbridge.mirror.stream import catch_up
from jobbridge.settings import Settings, reload_settings
from jobbridge.stack import Stack
from tests.support.helpers import pid_alive, wait_for

LIFECYCLE = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]
OUTAGE_SECONDS = 30.0


def _dynamo_client(settings: Settings) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=settings.dynamodb_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )


class Stores:
    """Readers of what the stack's mirror wrote, in jobbridge's layout."""

    def __init__(self, settings: Settings) -> None:
        self.dynamodb = DynamoDBJobStore(_dynamo_client(settings))
        self.mongo_client: MongoClient[Any] = MongoClient(settings.mongodb_uri, serverSelectionTimeoutMS=2000)
        self.mongodb = MongoJobStore(self.mongo_client[settings.mirror_database])

    def statuses(self, job: Job) -> tuple[list[JobStatus], list[JobStatus]]:
        """(DynamoDB history, MongoDB history) of a job, oldest first."""
        return (
            [entry.status for entry in self.dynamodb.history(job.type, job.id)],
            [entry.status for entry in self.mongodb.history(job.id)],
        )

    def current(self, job: Job) -> tuple[JobStatus | None, JobStatus | None]:
        """The job's status in each store (None while it has not arrived)."""
        in_dynamo = self.dynamodb.get(job.type, job.id)
        in_mongo = self.mongodb.get(job.id)
        return (in_dynamo and in_dynamo.status, in_mongo and in_mongo.status)


@pytest.fixture(scope="module")
def settings(stack: Stack) -> Settings:
    return reload_settings()


@pytest.fixture(scope="module")
def stores(settings: Settings) -> Iterator[Stores]:
    chosen = Stores(settings)
    yield chosen
    chosen.mongo_client.close()


def _submit(job_type: str, **parameters: Any) -> Job:
    return submit(Job(type=job_type, name=f"mirror-{uuid.uuid4().hex[:6]}", parameters=parameters))


def _wait_final(job: Job, timeout: float = 120.0) -> Job:
    return wait_for(
        f"job {job.id} to finish",
        lambda: ((current := get_job(job.id)).is_final and current) or None,
        timeout,
        interval=0.2,
    )


def _wait_mirrored(stores: Stores, job: Job, expected: list[JobStatus], timeout: float = 60.0) -> None:
    """Both stores hold exactly ``expected`` as the job's history, and its last status as current."""

    def arrived() -> bool:
        histories = stores.statuses(job)
        return histories == (expected, expected) and stores.current(job) == (expected[-1], expected[-1])

    wait_for(f"job {job.id} history {[s.value for s in expected]} in both stores", arrived, timeout, 0.2)


def test_every_transition_reaches_both_stores_in_order(stack: Stack, stores: Stores, tmp_path: Path) -> None:
    completed = _submit("test-noop", value=7)
    failed = _submit("test-flaky", marker=str(tmp_path / "never-created"))
    assert _wait_final(completed).status is JobStatus.COMPLETED
    assert _wait_final(failed).status is JobStatus.FAILED
    _wait_mirrored(stores, completed, LIFECYCLE)
    _wait_mirrored(stores, failed, [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
    mirrored = stores.mongodb.get(failed.id)
    assert mirrored is not None and mirrored.error and "never-created" in mirrored.error
    in_dynamo = stores.dynamodb.get(completed.type, completed.id)
    assert in_dynamo is not None
    in_prefect = get_job(completed.id)
    assert in_dynamo.parameters == {"value": 7} and in_dynamo.result == in_prefect.result
    assert (in_dynamo.started_at, in_dynamo.finished_at) == (in_prefect.started_at, in_prefect.finished_at)


def test_mirror_status_reports_every_target(stack: Stack, settings: Settings) -> None:
    shown = mirror_status(settings)
    assert shown["running"] is True, shown["problem"]
    names = {target["target"] for target in shown["targets"]}
    assert {"dynamodb:jobbridge", "mongodb:jobbridge"} <= names


class CountingDynamo:
    """Counts write requests of a boto3 client (no patching: the store is handed this object)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.writes = 0

    def transact_write_items(self, **kwargs: Any) -> Any:
        self.writes += 1
        return self._client.transact_write_items(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _drain(service: MirrorService) -> None:
    for name in service.targets:
        for lane in range(service.lanes):
            while service.deliver_once(name, lane):
                pass


def test_duplicated_and_reordered_events_change_nothing(
    stack: Stack, settings: Settings, stores: Stores, tmp_path: Path
) -> None:
    job = _submit("test-noop", value=1)
    _wait_final(job)
    _wait_mirrored(stores, job, LIFECYCLE)  # all its events exist on the server now
    api = os.environ["PREFECT_API_URL"]

    def persisted() -> list[dict[str, Any]] | None:  # the server writes events to its database in batches
        found = [
            event
            for event in catch_up(api, job.created_at - timedelta(seconds=5), utcnow() + timedelta(seconds=5))
            if event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{job.id}"
        ]
        return found if any(event["event"].endswith(".Completed") for event in found) else None

    events = wait_for("the job's events in the server's database", persisted, 30, 0.5)
    assert len(events) >= 4, [event["event"] for event in events]
    counting = CountingDynamo(_dynamo_client(settings))
    suffix = uuid.uuid4().hex[:8]
    dynamodb = DynamoDBJobStore(counting, table_name=f"dup_{suffix}")
    mongodb = MongoJobStore(stores.mongo_client["dup_tests"], f"jobs_{suffix}", f"events_{suffix}")

    def service(outbox_name: str) -> MirrorService:
        built = MirrorService([dynamodb, mongodb], settings=settings, outbox=Outbox(tmp_path / outbox_name))
        built.ensure_targets()
        return built

    first = service("first.sqlite3")
    shuffled = events * 3
    random.Random(7).shuffle(shuffled)
    for event in shuffled:
        first._accept_event(event)
    _drain(first)
    expected = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED]
    assert [entry.status for entry in dynamodb.history(job.type, job.id)] == expected
    assert [entry.status for entry in mongodb.history(job.id)] == expected
    assert dynamodb.get(job.type, job.id).status is JobStatus.COMPLETED  # type: ignore[union-attr]
    assert counting.writes == len(expected), "one write per transition, duplicates dropped before the store"

    # The same events again, newest first, through a service that has lost its outbox (no dedup
    # memory): the stores' conditional writes alone must keep everything as it is.
    writes_before = counting.writes
    second = service("second.sqlite3")
    for event in reversed(events):
        second._accept_event(event)
    _drain(second)
    assert [entry.status for entry in dynamodb.history(job.type, job.id)] == expected
    assert [entry.status for entry in mongodb.history(job.id)] == expected
    assert mongodb.get(job.id).status is JobStatus.COMPLETED  # type: ignore[union-attr]
    assert counting.writes - writes_before <= len(expected)


def _service_pid(stack: Stack, name: str) -> int:
    status = next(s for s in stack.status() if s.name == name)
    assert status.pid is not None, f"{name} is not running: {status.detail}"
    return status.pid


def test_worker_killed_with_its_job_ends_crashed_in_both_stores(
    stack: Stack, stores: Stores, tmp_path: Path
) -> None:
    """The worker's machine dies: worker and flow-run process SIGKILLed; no Prefect component reports it."""
    pid_file = tmp_path / "job.pid"
    job = _submit("test-sleep", seconds=300, pid_file=str(pid_file))
    flow_pid = wait_for("the job's process", lambda: pid_file.exists() and int(pid_file.read_text()), 60)
    wait_for("RUNNING in both stores", lambda: stores.current(job) == (JobStatus.RUNNING,) * 2, 30, 0.2)
    worker_pid = _service_pid(stack, "worker")
    try:
        os.killpg(worker_pid, signal.SIGKILL)
        os.kill(flow_pid, signal.SIGKILL)
        wait_for(
            "worker and job process gone", lambda: not pid_alive(worker_pid) and not pid_alive(flow_pid), 10
        )
        wait_for("CRASHED in both stores", lambda: stores.current(job) == (JobStatus.CRASHED,) * 2, 60, 0.5)
    finally:
        stack.up()  # a new worker for the tests that follow
    assert get_job(job.id).status is JobStatus.CRASHED
    dynamo_history, mongo_history = stores.statuses(job)
    assert dynamo_history == mongo_history == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CRASHED]
    mirrored = stores.mongodb.get(job.id)
    assert mirrored is not None and mirrored.error and "is gone" in mirrored.error


def _outage_scenario(
    stack: Stack, stores: Stores, settings: Settings, target: str, pause: Any, resume: Any
) -> None:
    """Break one store, run 20 jobs, keep it broken for OUTAGE_SECONDS, bring it back, check everything."""
    import time

    started = time.monotonic()
    pause()
    try:
        jobs = [_submit("test-noop", value=index) for index in range(20)]
        for job in jobs:
            _wait_final(job)
        waiting = wait_for(
            f"changes waiting for {target}",
            lambda: next(
                (t for t in mirror_status(settings)["targets"] if t["target"] == target and t["depth"] > 0),
                None,
            ),
            30,
            0.2,
        )
        assert waiting["depth"] > 0
        remaining = OUTAGE_SECONDS - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)  # the outage itself (the scenario), not synchronisation
        status = next(t for t in mirror_status(settings)["targets"] if t["target"] == target)
        assert status["last_error"], "the outage shows in mirror status"
    finally:
        resume()
    # Generous: moto copies the whole table for each item of a transaction, and by now the stack's mirror
    # table holds every job of the test session, so the backlog drains at a few transitions a second.
    for job in jobs:
        _wait_mirrored(stores, job, LIFECYCLE, timeout=240)


def test_dynamodb_down_for_30_seconds_loses_nothing(stack: Stack, stores: Stores, settings: Settings) -> None:
    moto_pid = _service_pid(stack, "moto")
    _outage_scenario(
        stack,
        stores,
        settings,
        "dynamodb:jobbridge",
        lambda: os.kill(moto_pid, signal.SIGSTOP),
        lambda: os.kill(moto_pid, signal.SIGCONT),
    )


def test_mongodb_down_for_30_seconds_loses_nothing(stack: Stack, stores: Stores, settings: Settings) -> None:
    mongo_pid = _service_pid(stack, "mongo")

    def kill() -> None:
        os.kill(mongo_pid, signal.SIGKILL)
        wait_for("nx-27017 gone", lambda: not pid_alive(mongo_pid), 10)

    _outage_scenario(stack, stores, settings, "mongodb:jobbridge", kill, stack.up)
