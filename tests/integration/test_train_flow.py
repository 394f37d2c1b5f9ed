"""The ``train`` job through the real stack: a SIGKILLed run resumes from its checkpoint, a spot notice
hands the run back (RETRYING) and it continues to the same final model.

The spot test serves the notice from a real HTTP server on a free loopback port. The stack's worker
cannot be given a per-test environment, but every flow run can: the run is created from the ``train``
deployment with ``job_variables={"env": ...}`` carrying ``JOBBRIDGE_SPOT_NOTICE_URL`` (as control.submit
carries the mode), and the worker gives that environment to the run's process. So this test also goes
through the real worker, where the hand-back (AwaitingRetry, then another claim) actually matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from prefect.client.orchestration import get_client

from jobbridge import control
from jobbridge.deployments import ensure_deployment, queue_for_priority
from jobbridge.errors import JobbridgeError
from jobbridge.jobs import Job, JobStatus, status_from_prefect, utcnow
from jobbridge.modes import job_environment
from jobbridge.processes import local_pid_of
from jobbridge.registry import get_spec
from jobbridge.settings import Settings, reload_settings
from jobbridge.training.checkpoints import CheckpointStore
from jobbridge.training.context import TrainContext
from jobbridge.training.runner import run_entry_point
from tests.support.helpers import free_port, pid_alive, wait_for

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

ENTRY_POINT = "jobbridge.training.examples:linear_regression"


@pytest.fixture
def pool_settings() -> Settings:
    """Settings that send every job through the work pool (the stack's worker runs it)."""
    return reload_settings().model_copy(update={"execution": "pool"})


def reference_weights(config: dict[str, Any], steps: int) -> np.ndarray:
    """The weights of an uninterrupted run of the example, trained here in the test process."""
    store = CheckpointStore(tempfile.mkdtemp(prefix="jb-train-ref-"))
    ctx = TrainContext(config=config, steps=steps, checkpoint_every=steps, store=store)
    outcome = run_entry_point(ENTRY_POINT, ctx)
    assert not outcome.interrupted
    return np.array(outcome.output["weights"], dtype=np.float64)


def final_weights(job: Job, settings: Settings) -> np.ndarray:
    """The weights in the job's final checkpoint, read back from the dataset store."""
    store = CheckpointStore.for_key(job.result["checkpoint_key"], settings=settings)
    latest = store.latest()
    assert latest is not None and latest.step == job.result["steps"]
    weights: np.ndarray = store.load_state(latest)["weights"]
    return weights


def flow_run_state_names(job_id: str) -> list[tuple[str, str, str | None]]:
    """(type, name, message) of every state the run went through, oldest first."""
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(job_id)
    ordered = sorted(states, key=lambda s: s.timestamp)
    return [(s.type.value, s.name or "", s.message) for s in ordered]


def worker_finished_with(job: Job) -> bool:
    """True once the worker has finished handling the run's last process (its executed-flow-run event).

    Needed before retrying a run whose process was killed: after the executor reported CRASHED, Prefect's
    base worker proposes CRASHED a second time when it sees the exit status, and that second proposal
    can land on top of a retry made in between (Scheduled -> Crashed is allowed).
    """
    body = {
        "filter": {
            "occurred": {
                "since": (job.created_at - timedelta(seconds=5)).isoformat(),
                "until": (utcnow() + timedelta(seconds=5)).isoformat(),
            },
            "event": {"name": ["prefect.worker.executed-flow-run"]},
        },
        "limit": 50,
    }
    response = httpx.post(f"{os.environ['PREFECT_API_URL']}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    resource = f"prefect.flow-run.{job.id}"
    return any(
        related.get("prefect.resource.id") == resource
        for event in response.json().get("events") or []
        for related in event.get("related") or []
    )


# --------------------------------------------------------------------------------------------------
# SIGKILL midway, then `jobbridge retry`


def test_killed_training_resumes_from_its_checkpoint_with_the_same_model(pool_settings: Settings) -> None:
    config = {"seed": 3, "step_delay": 0.04}
    steps = 150
    job = control.submit(
        Job(
            name="train to kill",
            type="train",
            parameters={"entry_point": ENTRY_POINT, "steps": steps, "checkpoint_every": 10, "config": config},
        ),
        settings=pool_settings,
    )
    store = CheckpointStore.for_key(job.id, settings=pool_settings)  # keyed by the job id by default
    reached = wait_for(
        "a checkpoint at step 30 or later",
        lambda: (latest := store.latest()) is not None and latest.step >= 30 and latest.step,
        timeout=120,
        interval=0.05,
    )
    with get_client(sync_client=True) as client:
        pid = local_pid_of(client.read_flow_run(job.id).infrastructure_pid)
    assert pid is not None and pid_alive(pid)
    os.kill(pid, signal.SIGKILL)

    crashed = control.wait_for(job.id, timeout=60)
    assert crashed.status is JobStatus.CRASHED, crashed  # killed midway, not finished
    killed_at = store.latest()
    assert killed_at is not None and reached <= killed_at.step < steps

    wait_for("the worker to finish with the killed run", lambda: worker_finished_with(job), 60, 0.25)
    control.retry(job.id)  # the same job (same id), so the same checkpoints
    final = control.wait_for(job.id, timeout=120)
    assert final.status is JobStatus.COMPLETED, final.error
    assert final.attempts == 2
    assert final.result["resumed_from_step"] == killed_at.step > 0
    assert final.result["step"] == steps
    expected = reference_weights(config, steps)
    assert final_weights(final, pool_settings).tobytes() == expected.tobytes()
    assert final.result["output"]["weights_sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Spot interruption notice -> checkpoint at once, RETRYING, continue when the notice is gone


class NoticeServer:
    """A real HTTP server standing in for the EC2 metadata endpoint: 404, or the notice when set."""

    PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self) -> None:
        self.notice: dict[str, str] | None = None
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                notice = owner.notice
                if self.path != owner.PATH or notice is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps(notice).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{self.PATH}"


@pytest.fixture
def notice_server() -> Iterator[NoticeServer]:
    server = NoticeServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def submit_with_env(job: Job, settings: Settings, env: dict[str, str]) -> Job:
    """Submit ``job`` through its deployment like control.submit, with extra environment for its runs."""
    spec = get_spec(job.type)
    parameters = spec.validate_parameters(job.parameters)
    job = job.model_copy(update={"parameters": parameters})
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            ensure_deployment(client, spec, settings),
            parameters=parameters,
            name=job.name,
            tags=control.job_tags(job, settings),
            work_queue_name=queue_for_priority(job.priority),
            job_variables={"env": {**job_environment(settings), **env}},
        )
    return control.get_job(str(run.id), settings=settings)


def test_spot_notice_checkpoints_hands_back_and_the_job_continues(
    pool_settings: Settings, notice_server: NoticeServer
) -> None:
    config = {"seed": 5, "step_delay": 0.02}
    steps = 400
    key = f"spot-{os.getpid()}-{free_port()}"
    job = submit_with_env(
        Job(
            name="train on spot",
            type="train",
            parameters={
                "entry_point": ENTRY_POINT,
                "steps": steps,
                # No periodic checkpoint before the end: any earlier one is the notice's.
                "checkpoint_every": 10_000,
                "checkpoint_key": key,
                "config": config,
                "requeue_delay_seconds": 1,
            },
        ),
        pool_settings,
        {"JOBBRIDGE_SPOT_NOTICE_URL": notice_server.url, "JOBBRIDGE_SPOT_POLL_SECONDS": "0.1"},
    )
    wait_for(
        "the job to train a tenth of its steps", lambda: control.get_job(job.id).progress >= 10, 120, 0.1
    )
    assert notice_server.requests > 0 and control.get_job(job.id).status is JobStatus.RUNNING
    trained = int(control.get_job(job.id).progress * steps / 100)
    notice_server.notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}

    def handed_back() -> list[tuple[str, str, str | None]]:
        return [s for s in flow_run_state_names(job.id) if s[1] == "AwaitingRetry"]

    retrying = wait_for("the run to be handed back", handed_back, timeout=60, interval=0.1)
    state_type, state_name, message = retrying[0]
    assert status_from_prefect(state_type, state_name) is JobStatus.RETRYING
    assert message and "spot interruption notice: terminate" in message
    store = CheckpointStore.for_key(key, settings=pool_settings)
    interrupted_at = store.latest()
    assert interrupted_at is not None and trained <= interrupted_at.step < steps  # checkpointed at once

    notice_server.notice = None  # the interruption did not happen after all, or a new instance answers
    final = control.wait_for(job.id, timeout=120)
    assert final.status is JobStatus.COMPLETED, final.error
    assert final.attempts >= 2
    assert final.result["resumed_from_step"] >= interrupted_at.step > 0
    assert final_weights(final, pool_settings).tobytes() == reference_weights(config, steps).tobytes()
    names = [name for _, name, _ in flow_run_state_names(job.id)]
    assert "Crashed" not in names and "Failed" not in names  # handed back, never crashed


# --------------------------------------------------------------------------------------------------
# In-process run (no deployment): a notice cannot hand it to a worker; it fails saying how to resume


def test_in_process_run_interrupted_by_a_notice_fails_and_retry_resumes_it(
    notice_server: NoticeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBBRIDGE_SPOT_NOTICE_URL", notice_server.url)
    monkeypatch.setenv("JOBBRIDGE_SPOT_POLL_SECONDS", "0.05")
    settings = reload_settings().model_copy(update={"execution": "inprocess"})
    notice_server.notice = {"action": "stop", "time": "2030-01-01T00:02:00Z"}
    try:
        job = control.submit(
            Job(
                name="train in process",
                type="train",
                parameters={"entry_point": ENTRY_POINT, "steps": 200, "config": {"step_delay": 0.005}},
            ),
            wait=True,
            timeout=120,
            settings=settings,
        )
        assert job.status is JobStatus.FAILED
        assert job.error and "spot interruption notice: stop" in job.error
        assert f"jobbridge retry {job.id}" in job.error
        saved = CheckpointStore.for_key(job.id, settings=settings).latest()
        assert saved is not None and 0 < saved.step < 200
        notice_server.notice = None
        control.retry(job.id, settings=settings)
        final = control.wait_for(job.id, timeout=120, settings=settings)
        assert final.status is JobStatus.COMPLETED, final.error
        assert final.result["resumed_from_step"] == saved.step
        with pytest.raises(JobbridgeError, match="only FAILED, CRASHED or CANCELLED"):
            control.retry(job.id, settings=settings)
    finally:
        monkeypatch.undo()
        reload_settings()


# --------------------------------------------------------------------------------------------------
# The store on S3 (the stack's moto server): same layout, same guarantees through s3fs


def test_checkpoints_on_s3_round_trip_and_resume(tmp_path: Path) -> None:
    settings = reload_settings()
    bucket = f"jb-ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=settings.aws_region,
    ).create_bucket(Bucket=bucket)
    on_s3 = settings.model_copy(update={"dataset_store": f"s3://{bucket}/datasets"})
    store = CheckpointStore.for_key("s3-key", settings=on_s3, keep=2)
    assert store.url == f"s3://{bucket}/datasets/checkpoints/s3-key"
    config = {"seed": 9}
    ctx = TrainContext(
        config=config, steps=120, checkpoint_every=25, store=store, stop=lambda: ctx.step >= 60
    )
    first = run_entry_point(ENTRY_POINT, ctx)
    assert first.interrupted and store.latest() == first.checkpoint and first.step == 60
    resumed = run_entry_point(
        ENTRY_POINT, TrainContext(config=config, steps=120, checkpoint_every=25, store=store)
    )
    assert resumed.start_step == 60 and store.steps() == [100, 120]
    assert np.array(resumed.output["weights"]).tobytes() == reference_weights(config, 120).tobytes()
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "f.bin").write_bytes(b"abc")
    saved = store.save_directory(130, tmp_path / "dir")
    restored = store.download(saved, tmp_path / "back")
    assert (restored / "sub" / "f.bin").read_bytes() == b"abc"
