"""The command and batch job types on the real stack (Prefect server, local pool and worker).

Every process check is against the kernel (``pid_alive`` reads /proc); every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)

from jobbridge import control
from jobbridge.batch import item_handler
from jobbridge.batch.grouping import ITEMS_ARTIFACT_TYPE
from jobbridge.errors import JobValidationError
from jobbridge.flows.batch import batch
from jobbridge.jobs import Job, JobItem, JobStatus
from jobbridge.settings import Settings, reload_settings
from tests.support.helpers import pid_alive, wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_settings() -> Settings:
    """Settings that run every job in this process."""
    return reload_settings().model_copy(update={"execution": "inprocess"})


@pytest.fixture
def pool_settings() -> Settings:
    """Settings that send every job through the work pool (the stack's worker runs it)."""
    return reload_settings().model_copy(update={"execution": "pool"})


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def spawner(tmp_path: Path) -> Path:
    """A script that starts a grandchild ``sleep``, records both pids, then waits for it."""
    return script(
        tmp_path / "spawn.sh",
        'echo $$ > "$1/parent.pid"\nsleep 300 &\necho $! > "$1/child.pid"\necho started\nwait\n',
    )


def read_pids(tmp_path: Path) -> list[int]:
    def both() -> list[int] | None:
        files = [tmp_path / "parent.pid", tmp_path / "child.pid"]
        texts = [f.read_text().strip() if f.exists() else "" for f in files]
        return [int(t) for t in texts] if all(texts) else None

    return wait_for("the script to record its pids", both, timeout=60)


def artifact_data(job_id: str, kind: str) -> Any:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[job_id]), type=ArtifactFilterType(any_=[kind])
            )
        )
    return artifact.data


def state_name(job_id: str) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(job_id).state
    assert state is not None
    return state.name


# --------------------------------------------------------------------------------------------------
# command


def test_a_command_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path, local_settings: Settings
) -> None:
    job = control.submit(
        Job(
            name="too slow",
            type="command",
            parameters={"command": [str(spawner(tmp_path)), str(tmp_path)], "timeout_seconds": 2},
        ),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    assert job.status is JobStatus.FAILED
    assert job.error is not None and "timed out after 2 s and was killed with its process group" in job.error
    assert "started" in job.error  # the last lines are in the error
    assert job.result["timed_out"] is True and job.result["output"] == ["started"]
    parent, child = read_pids(tmp_path)
    assert not pid_alive(parent) and not pid_alive(child)


def test_a_transient_exit_code_is_retried_until_it_succeeds(tmp_path: Path, local_settings: Settings) -> None:
    marker = tmp_path / "tried-once"
    flaky = script(
        tmp_path / "flaky.sh",
        f'if [ ! -e "{marker}" ]; then touch "{marker}"; echo "not yet"; exit 75; fi\necho "worked"\n',
    )
    job = control.submit(
        Job(name="flaky", type="command", parameters={"command": str(flaky), "retry_exit_codes": [75]}),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.result["exit_code"] == 0 and job.result["output"] == ["worked"]
    with get_client(sync_client=True) as client:
        (step,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[job.id])))
    assert step.run_count == 2


def test_an_unlisted_exit_code_fails_at_once(tmp_path: Path, local_settings: Settings) -> None:
    attempts = tmp_path / "attempts"
    failing = script(tmp_path / "fail.sh", f'echo attempt >> "{attempts}"\necho "disk full" >&2\nexit 3\n')
    job = control.submit(
        Job(name="broken", type="command", parameters={"command": str(failing), "retry_exit_codes": [75]}),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    assert job.status is JobStatus.FAILED
    assert job.error is not None and "exited with code 3" in job.error and "disk full" in job.error
    assert attempts.read_text().count("attempt") == 1  # not retried
    assert job.result["exit_code"] == 3  # the result is recorded on failure too


def test_output_streams_into_the_job_log_and_the_tail_into_the_result(
    tmp_path: Path, local_settings: Settings
) -> None:
    go = tmp_path / "go"
    body = (
        'echo "warning: starting" >&2\n'
        'i=1; while [ $i -le 1000 ]; do echo "line $i"; i=$((i+1)); done\n'
        "echo ready\n"
        f'while [ ! -e "{go}" ]; do sleep 0.05; done\n'
        "echo finished\n"
    )
    job = control.submit(
        Job(
            name="chatty",
            type="command",
            parameters={"command": str(script(tmp_path / "talk.sh", body)), "max_output_lines": 2},
        ),
        settings=local_settings,
    )

    def messages() -> list[str]:
        return [line.message for line in control.logs(job.id, settings=local_settings)]

    # "ready" reaches the job log while the command is still running: streamed, not collected at exit.
    def when_ready() -> list[str] | None:
        found = messages()
        return found if "[stdout] ready" in found else None

    seen = wait_for("'ready' in the job log", when_ready, timeout=60, interval=0.3)
    assert "[stderr] warning: starting" in seen
    assert control.get_job(job.id, settings=local_settings).status is JobStatus.RUNNING
    go.touch()
    final = control.wait_for(job.id, timeout=60, settings=local_settings)
    assert final.status is JobStatus.COMPLETED, final.error
    # stdout and stderr are two pipes: their lines keep their order within each stream only.
    assert final.result["output"] == ["ready", "finished"]
    assert final.result["output_lines"] == 1003 and final.result["output_truncated"]

    def all_lines() -> list[str] | None:
        found = messages()
        return found if sum(m.startswith("[stdout] line ") for m in found) == 1000 else None

    logged = wait_for("every line in the job log", all_lines, timeout=60, interval=0.3)
    assert "[stdout] finished" in logged
    assert (
        logged.index("[stdout] line 1") < logged.index("[stdout] line 1000") < logged.index("[stdout] ready")
    )


def test_a_cancelled_command_job_leaves_no_process(tmp_path: Path, pool_settings: Settings) -> None:
    job = control.submit(
        Job(
            name="cancel me", type="command", parameters={"command": [str(spawner(tmp_path)), str(tmp_path)]}
        ),
        settings=pool_settings,
    )
    pids = read_pids(tmp_path)
    assert all(pid_alive(pid) for pid in pids)
    final = control.cancel(job.id, wait=True, timeout=90, settings=pool_settings)
    assert final.status is JobStatus.CANCELLED, final.error
    wait_for("the command and its child to be gone", lambda: not any(pid_alive(p) for p in pids), timeout=30)


def test_the_watchdog_kills_the_group_when_the_runner_is_killed(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup in the process that started the command: the watchdog must act."""
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from jobbridge.tasks.command import run_command; "
            "run_command(sys.argv[1:], timeout=300, grace=1)",
            str(spawner(tmp_path)),
            str(tmp_path),
        ],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        pids = read_pids(tmp_path)
        assert all(pid_alive(pid) for pid in pids)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(10)
        wait_for(
            "the orphaned command and its child to be gone", lambda: not any(pid_alive(p) for p in pids), 30
        )
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


# --------------------------------------------------------------------------------------------------
# batch


def test_a_batch_with_failing_items_reports_each_and_ends_with_errors(
    tmp_path: Path, local_settings: Settings
) -> None:
    lines = [
        {"id": "doc-1", "text": "fine"},
        {"id": "doc-2", "fail": True, "message": "unreadable PDF"},
        {"id": "doc-3"},
        "{broken json",
        {"id": "doc-5"},
    ]
    items_file = tmp_path / "documents.jsonl"
    items_file.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    job = control.submit(
        Job(
            name="documents",
            type="batch",
            parameters={"handler": "fail-if", "items_file": str(items_file), "group_size": 2},
        ),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    # Not a plain COMPLETED with a message: a FAILED-type state named for the partial outcome.
    assert job.status is JobStatus.FAILED
    assert state_name(job.id) == "CompletedWithErrors"
    assert job.error is not None and job.error.startswith("completed with errors: 2 of 5 items failed")
    assert job.result["outcome"] == "completed_with_errors"
    assert (job.result["total"], job.result["done"], job.result["failed"]) == (5, 3, 2)
    assert job.result["groups"] == 3 and job.result["runner"] == "threads"
    assert job.result["failures"] == [
        {"id": "doc-2", "error": "ValueError: unreadable PDF"},
        {"id": "4", "error": job.result["failures"][1]["error"]},
    ]
    assert job.result["failures"][1]["error"].startswith("line 4 is not JSON")
    items = job.items  # what users read: Job.items, from the batch's items artifact
    assert items == [JobItem.model_validate(item) for item in artifact_data(job.id, ITEMS_ARTIFACT_TYPE)]
    assert [(i.id, i.status) for i in items] == [
        ("doc-1", JobStatus.COMPLETED),
        ("doc-2", JobStatus.FAILED),
        ("doc-3", JobStatus.COMPLETED),
        ("4", JobStatus.FAILED),
        ("doc-5", JobStatus.COMPLETED),
    ]
    assert (
        items[0].result == {"id": "doc-1", "text": "fine"} and items[1].error == "ValueError: unreadable PDF"
    )
    assert artifact_data(job.id, "progress") == 100


def test_a_batch_ends_completed_when_all_are_done_and_failed_when_none_are(local_settings: Settings) -> None:
    done = control.submit(
        Job(name="all fine", type="batch", parameters={"handler": "echo", "items": list(range(25))}),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    assert (
        done.status is JobStatus.COMPLETED
        and done.result["done"] == 25
        and done.result["outcome"] == "completed"
    )
    failed = control.submit(
        Job(name="all bad", type="batch", parameters={"handler": "fail-if", "items": [{"fail": True}] * 3}),
        wait=True,
        timeout=120,
        settings=local_settings,
    )
    assert failed.status is JobStatus.FAILED and state_name(failed.id) == "Failed"
    assert failed.error is not None and failed.error.startswith("all 3 items failed")
    # A handler that does not exist is refused before any run exists, and fails a run that skipped that check.
    with pytest.raises(JobValidationError, match="unknown item handler 'no-such-handler'"):
        control.submit(Job(name="x", type="batch", parameters={"handler": "no-such-handler", "items": [1]}))
    state = batch(handler="no-such-handler", items=[1], return_state=True)
    assert state.is_failed() and "unknown item handler 'no-such-handler'" in (state.message or "")


@item_handler("test-thread-name")
def thread_name(item: Any) -> str:
    """Where an item ran: the name of the thread."""
    return threading.current_thread().name


@pytest.fixture
def dask_address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A light in-process Dask LocalCluster (threads, no worker processes) as JOBBRIDGE_DASK_ADDRESS."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("JOBBRIDGE_DASK_ADDRESS", cluster.scheduler_address)
        reload_settings()
        try:
            yield cluster.scheduler_address
        finally:
            monkeypatch.undo()
            reload_settings()


def test_a_batch_runs_on_dask(tmp_path: Path, dask_address: str) -> None:
    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps({"id": f"i{n}"}) + "\n" for n in range(40)))
    settings = reload_settings().model_copy(update={"execution": "inprocess"})
    job = control.submit(
        Job(
            name="on dask",
            type="batch",
            parameters={"handler": "test-thread-name", "items_file": str(items_file)},
        ),
        wait=True,
        timeout=120,
        settings=settings,
    )
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.result["runner"] == f"dask:{dask_address}" and job.result["done"] == 40
    items = artifact_data(job.id, ITEMS_ARTIFACT_TYPE)
    assert len(items) == 40 and all("-Dask-Default-Threads-" in item["result"] for item in items), items[:3]
    with get_client(sync_client=True) as client:
        steps = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[job.id])))
    assert len(steps) == job.result["groups"] and all(step.state_name == "Completed" for step in steps)
