"""Submission and control through the real stack: Prefect server, local pool, real worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from jobbridge import control
from jobbridge.deployments import ensure_work_pool
from jobbridge.errors import IdempotencyConflictError, JobbridgeError, JobNotFoundError, JobValidationError
from jobbridge.jobs import Job, JobStatus
from jobbridge.settings import ProcessingMode, Settings, reload_settings
from tests.support.helpers import pid_alive, wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def pool_settings() -> Settings:
    """Settings that send every job through the work pool (a worker must run it)."""
    return reload_settings().model_copy(update={"execution": "pool"})


@pytest.fixture
def local_settings() -> Settings:
    """Settings that run every job in this process."""
    return reload_settings().model_copy(update={"execution": "inprocess"})


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(50_000))


def test_submit_through_the_pool_completes(tmp_path: Path, pool_settings: Settings) -> None:
    make_tree(tmp_path / "data")
    manifest = tmp_path / "data.sha256"
    job = control.submit(
        Job(
            name="fingerprint",
            type="validate",
            parameters={"path": str(tmp_path / "data"), "manifest": str(manifest), "create": True},
            org="acme",
            priority="high",
        ),
        settings=pool_settings,
    )
    assert job.status in (JobStatus.QUEUED, JobStatus.PENDING, JobStatus.RUNNING)
    final = control.wait_for(job.id, timeout=120, settings=pool_settings)
    assert final.status is JobStatus.COMPLETED, final.error
    assert final.id == job.id and final.org == "acme" and final.priority == 1
    assert final.progress == 100.0 and final.attempts == 1
    assert final.started_at is not None and final.finished_at is not None
    assert final.result["files"] == 2
    assert manifest.read_text().count("\n") == 2
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(final.id)
    assert run.deployment_id is not None and run.work_queue_name == "priority-1"


def test_submit_in_process_completes(tmp_path: Path, local_settings: Settings) -> None:
    make_tree(tmp_path / "data")
    final = control.submit(
        Job(
            name="local fingerprint",
            type="validate",
            parameters={"path": str(tmp_path / "data"), "manifest": str(tmp_path / "m"), "create": True},
        ),
        wait=True,
        settings=local_settings,
    )
    assert final.status is JobStatus.COMPLETED, final.error
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(final.id).deployment_id is None


def count_runs(settings: Settings) -> int:
    return len(control.list_jobs(limit=200, settings=settings).jobs)


def test_bad_parameters_fail_before_any_run_exists(tmp_path: Path, pool_settings: Settings) -> None:
    before = count_runs(pool_settings)
    with pytest.raises(JobValidationError) as info:
        control.submit(Job(name="x", type="extract", parameters={"source": 5}), settings=pool_settings)
    message = str(info.value)
    assert "'destination' is required" in message and "'source'" in message
    with pytest.raises(JobValidationError, match=r"known job types: .*extract"):
        control.submit(Job(name="x", type="nope"), settings=pool_settings)
    assert count_runs(pool_settings) == before


def test_idempotent_resubmission_returns_the_same_job(tmp_path: Path, local_settings: Settings) -> None:
    job = Job(name="once", type="test-noop", parameters={"value": 1})
    first = control.submit(job, idempotency_key=f"key-{tmp_path.name}", wait=True, settings=local_settings)
    again = control.submit(job, idempotency_key=f"key-{tmp_path.name}", settings=local_settings)
    assert again.id == first.id
    assert control.get_job(first.id).attempts == 1  # not run a second time
    with pytest.raises(IdempotencyConflictError, match="other parameters"):
        control.submit(
            job.model_copy(update={"parameters": {"value": 2}}),
            idempotency_key=f"key-{tmp_path.name}",
            settings=local_settings,
        )


def test_idempotency_through_the_pool(tmp_path: Path, pool_settings: Settings) -> None:
    job = Job(name="once", type="test-noop", parameters={"value": 7})
    key = f"pool-{tmp_path.name}"
    first = control.submit(job, idempotency_key=key, settings=pool_settings)
    assert control.submit(job, idempotency_key=key, settings=pool_settings).id == first.id
    with pytest.raises(IdempotencyConflictError):
        control.submit(
            job.model_copy(update={"parameters": {"value": 8}}), idempotency_key=key, settings=pool_settings
        )
    assert control.wait_for(first.id, timeout=120).status is JobStatus.COMPLETED


def test_cancel_a_running_job_stops_its_process(tmp_path: Path, pool_settings: Settings) -> None:
    pid_file = tmp_path / "pid"
    job = control.submit(
        Job(name="long", type="test-sleep", parameters={"seconds": 300, "pid_file": str(pid_file)}),
        settings=pool_settings,
    )
    wait_for("the job to run", lambda: control.get_job(job.id).status is JobStatus.RUNNING, 120)
    pid = int(wait_for("the pid file", lambda: pid_file.exists() and pid_file.read_text(), 30))
    assert pid_alive(pid)
    started = time.monotonic()
    final = control.cancel(job.id, wait=True, timeout=30)
    assert final.status is JobStatus.CANCELLED, final
    assert time.monotonic() - started < 30
    wait_for(f"process {pid} to be gone", lambda: not pid_alive(pid), 10)
    assert control.cancel(job.id).status is JobStatus.CANCELLED  # cancelling twice is harmless


def test_cancel_a_queued_job_and_a_finished_one(tmp_path: Path, pool_settings: Settings) -> None:
    parked = pool_settings.model_copy(update={"work_pool": f"parked-{tmp_path.name[-12:]}"})
    ensure_work_pool(parked)  # a pool no worker polls: its jobs stay QUEUED
    queued = control.submit(Job(name="parked", type="test-noop"), settings=parked)
    assert queued.status is JobStatus.QUEUED
    assert control.cancel(queued.id, settings=parked).status is JobStatus.CANCELLED
    done = control.submit(Job(name="n", type="test-noop"), wait=True, timeout=120, settings=pool_settings)
    assert done.status is JobStatus.COMPLETED
    with pytest.raises(JobbridgeError, match="already COMPLETED"):
        control.cancel(done.id)


def test_retry_runs_the_same_job_again(tmp_path: Path, pool_settings: Settings) -> None:
    marker = tmp_path / "marker"
    job = control.submit(
        Job(name="flaky", type="test-flaky", parameters={"marker": str(marker)}),
        wait=True,
        timeout=120,
        settings=pool_settings,
    )
    assert job.status is JobStatus.FAILED and "marker" in (job.error or "")
    marker.touch()
    again = control.retry(job.id)
    assert again.id == job.id
    final = control.wait_for(job.id, timeout=120)
    assert final.status is JobStatus.COMPLETED and final.attempts == 2
    with pytest.raises(JobbridgeError, match="only FAILED, CRASHED or CANCELLED"):
        control.retry(job.id)


def test_unknown_ids_are_clear_errors() -> None:
    with pytest.raises(JobNotFoundError, match="not a job id"):
        control.get_job("job-42")
    with pytest.raises(JobNotFoundError, match="no job with id"):
        control.get_job("00000000-0000-4000-8000-000000000000")


def test_list_filters_by_org_type_and_status_and_pages(tmp_path: Path, local_settings: Settings) -> None:
    org = f"org-{tmp_path.name}"
    ids = [
        control.submit(
            Job(name=f"n{i}", type="test-noop", parameters={"value": i}, org=org),
            wait=True,
            settings=local_settings,
        ).id
        for i in range(3)
    ]
    other = control.submit(
        Job(name="f", type="test-flaky", parameters={"marker": str(tmp_path / "no")}, org=org),
        wait=True,
        settings=local_settings,
    )
    assert {j.id for j in control.list_jobs(org=org)} == {*ids, other.id}
    assert {j.id for j in control.list_jobs(org=org, type="test-noop")} == set(ids)
    assert [j.id for j in control.list_jobs(org=org, status="failed")] == [other.id]
    first = control.list_jobs(org=org, limit=2)
    assert len(first) == 2 and first.next_cursor
    rest = control.list_jobs(org=org, limit=2, cursor=first.next_cursor)
    assert {j.id for j in [*first, *rest]} == {*ids, other.id} and rest.next_cursor is None
    with pytest.raises(JobValidationError, match="status 'DONE'"):
        control.list_jobs(status="DONE")


def test_logs_are_read_back_in_order(local_settings: Settings, tmp_path: Path) -> None:
    job = control.submit(
        Job(name="logs", type="test-flaky", parameters={"marker": str(tmp_path)}),
        wait=True,
        settings=local_settings,
    )
    lines = wait_for(
        "the log line", lambda: [line for line in control.logs(job.id) if "marker found" in line.message], 20
    )
    assert lines[0].level == "INFO"
    stamps = [line.timestamp for line in control.logs(job.id)]
    assert stamps == sorted(stamps)


def test_test_mode_jobs_never_mix_with_production(tmp_path: Path) -> None:
    normal = reload_settings().model_copy(update={"execution": "pool"})
    test = normal.model_copy(update={"mode": ProcessingMode.TEST})
    job = control.submit(Job(name="isolated", type="test-noop"), wait=True, timeout=120, settings=test)
    assert job.status is JobStatus.COMPLETED
    assert job.name == "test_isolated"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(job.id)
        deployment = client.read_deployment(run.deployment_id)
    assert deployment.name == "test_jobbridge"
    assert all(tag.startswith("test_") for tag in run.tags)
    assert job.id in {j.id for j in control.list_jobs(settings=test, limit=200)}
    assert job.id not in {j.id for j in control.list_jobs(settings=normal, limit=200)}
    with pytest.raises(JobNotFoundError):
        control.get_job(job.id, settings=normal)


def test_debug_mode_writes_the_debug_log_from_the_worker(tmp_path: Path) -> None:
    log_file = tmp_path / "job_processor_debug.log"
    debug = reload_settings().model_copy(
        update={"execution": "pool", "mode": ProcessingMode.DEBUG, "debug_log_file": log_file}
    )
    make_tree(tmp_path / "data")
    job = control.submit(
        Job(
            name="debugged",
            type="validate",
            parameters={"path": str(tmp_path / "data"), "manifest": str(tmp_path / "m"), "create": True},
        ),
        wait=True,
        timeout=120,
        settings=debug,
    )
    assert job.status is JobStatus.COMPLETED
    lines = log_file.read_text().splitlines()
    assert any("DEBUG" in line and "submitting validate job" in line for line in lines)  # this process
    worker_lines = [line for line in lines if "validating parameters" in line]
    assert worker_lines and all(f"pid={os.getpid()} " not in line for line in worker_lines)  # the job's
