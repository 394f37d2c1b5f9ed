"""Integration tests of :mod:`jobbridge.deployments.worker` against real components.

A real ``prefect server start`` (own temporary ``PREFECT_HOME``, free port), a real ``process``
work pool, real deployments of the flows in ``worker_flows.py`` and the worker started as
``python -m jobbridge.deployments.worker``. Every wait is a poll with a deadline.

Fixtures are prefixed ``worker_`` so a later shared conftest cannot clash with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pytest

from jobbridge.processes import local_pid_of
from tests.support.helpers import free_port, pid_alive, wait_for

pytestmark = pytest.mark.slow  # Linux only, like the worker: /proc and POSIX signals

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIR = REPO_ROOT / "src"
FLOWS_FILE = Path(__file__).with_name("worker_flows.py")
POOL = "jb-worker-test"
# A second pool for tests that need their own worker to get the run (the module-scoped worker
# keeps serving POOL until the module ends).
SOLO_POOL = "jb-worker-test-solo"
MODULE_NAME = "jb_worker_test_flows"

T = TypeVar("T")


def _warm_pids(worker_pid: int) -> list[int]:
    """Pids of live warm processes belonging to ``worker_pid`` (found via /proc cmdlines)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"jobbridge.deployments.warm" in argv
            and b"--worker-pid" in argv
            and str(worker_pid).encode() in argv
            and pid_alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


def _stop(proc: subprocess.Popen[bytes], deadline: float = 30.0) -> int:
    """Stop like an operator: SIGTERM (drain), SIGTERM again, then SIGKILL after a deadline."""
    for sig in (signal.SIGTERM, signal.SIGTERM):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(deadline)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


@dataclass
class WorkerStack:
    """The running server and what the tests need to talk to it."""

    api_url: str
    env: dict[str, str]
    tmp: Path
    deployments: dict[str, UUID]

    def settings(self) -> Any:
        """Prefect settings context pointing this (test) process at the server."""
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_LOCAL_STORAGE_PATH,
            temporary_settings,
        )

        return temporary_settings(
            updates={
                PREFECT_API_URL: self.api_url,
                PREFECT_LOCAL_STORAGE_PATH: self.env["PREFECT_LOCAL_STORAGE_PATH"],
            }
        )

    def start_worker(self, name: str, *extra: str, pool: str = POOL) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobbridge.deployments.worker",
                "--pool",
                pool,
                "--name",
                name,
                "--query-seconds",
                "0.5",
                *extra,
            ],
            env=self.env,
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerStack]:
    """A real Prefect server, a ``process`` pool and one deployment per flow in worker_flows."""
    tmp = tmp_path_factory.mktemp("worker")
    code_dir = tmp / "code"
    code_dir.mkdir()
    shutil.copy(FLOWS_FILE, code_dir / FLOWS_FILE.name)
    # The production shape: a module-path entrypoint importable from the worker's environment,
    # no ``path`` (nothing copied into the run's workspace).
    module_dir = tmp / "modules"
    module_dir.mkdir()
    shutil.copy(FLOWS_FILE, module_dir / f"{MODULE_NAME}.py")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    pythonpath = [
        str(SRC_DIR),
        str(module_dir),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "PREFECT_WORKER_PREFETCH_SECONDS": "10",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "PYTHONUNBUFFERED": "1",
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_log = (tmp / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        cwd=tmp,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def healthy() -> bool:
            if server.poll() is not None:
                raise AssertionError("prefect server exited: " + (tmp / "server.log").read_text())
            try:
                return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server to be healthy", healthy, timeout=120, interval=0.25)
        stack = WorkerStack(api_url=api_url, env=env, tmp=tmp, deployments={})
        with stack.settings():
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import WorkPoolCreate
            from prefect.workers.process import ProcessWorker

            with get_client(sync_client=True) as client:
                for pool in (POOL, SOLO_POOL):
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=pool,
                            type="process",
                            base_job_template=ProcessWorker.get_default_base_job_template(),
                        )
                    )
                for pool, flow_name, key in [
                    (POOL, "double", "double"),
                    (POOL, "sleepy", "sleepy"),
                    (SOLO_POOL, "sleepy", "solo-sleepy"),
                ]:
                    flow_id = client.create_flow_from_name(flow_name)
                    stack.deployments[key] = client.create_deployment(
                        flow_id=flow_id,
                        name=f"{pool}-{flow_name}",
                        entrypoint=f"worker_flows:{flow_name}",
                        work_pool_name=pool,
                        path=str(code_dir),
                    )
                flow_id = client.create_flow_from_name("env_probe")
                stack.deployments["env_probe"] = client.create_deployment(
                    flow_id=flow_id,
                    name=f"{POOL}-env-probe",
                    entrypoint=f"{MODULE_NAME}:env_probe",
                    work_pool_name=POOL,
                    job_variables={
                        "env": {"JB_WORKER_TEST_VAR": "from-job", "PREFECT_TASKS_DEFAULT_RETRIES": "3"}
                    },
                )
        yield stack
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        server_log.close()


def _wait_online(stack: WorkerStack, proc: subprocess.Popen[bytes], name: str, pool: str = POOL) -> None:
    from prefect.client.orchestration import get_client

    with stack.settings(), get_client(sync_client=True) as client:

        def online() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{stack.log(name)}")
            workers = client.read_workers_for_work_pool(pool)
            return any(w.name == name and w.status.value == "ONLINE" for w in workers)

        wait_for(f"worker {name} to be online", online, timeout=60, interval=0.25)


@pytest.fixture(scope="module")
def worker_process(worker_stack: WorkerStack) -> Iterator[subprocess.Popen[bytes]]:
    """One JobbridgeWorker (one warm process) serving the pool for the run tests."""
    name = "jb-worker-main"
    proc = worker_stack.start_worker(name, "--warm", "1")
    try:
        _wait_online(worker_stack, proc, name)
        yield proc
    finally:
        _stop(proc)


def _submit(stack: WorkerStack, flow_name: str, **parameters: Any) -> UUID:
    from prefect.client.orchestration import get_client

    with stack.settings(), get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(stack.deployments[flow_name], parameters=parameters)
        return run.id


def _read(stack: WorkerStack, flow_run_id: UUID) -> Any:
    from prefect.client.orchestration import get_client

    with stack.settings(), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _wait_state(stack: WorkerStack, flow_run_id: UUID, final: bool, timeout: float) -> Any:
    """Wait until the run is RUNNING (``final=False``) or in a final state (``final=True``)."""

    def reached() -> Any:
        run = _read(stack, flow_run_id)
        if run.state is None:
            return None
        if final:
            return run if run.state.is_final() else None
        if run.state.is_final():
            raise AssertionError(f"run ended before running: {run.state!r}")
        return run if run.state.is_running() else None

    return wait_for(
        f"flow run {flow_run_id} ({'final' if final else 'running'})", reached, timeout=timeout, interval=0.2
    )


def _running_pid(stack: WorkerStack, flow_run_id: UUID, marker: Path) -> int:
    """The run's infrastructure pid, checked to be the process that executes the flow."""
    run = _wait_state(stack, flow_run_id, final=False, timeout=60)
    marker_text: str = wait_for(
        "the flow to write its pid", lambda: marker.read_text() if marker.exists() else None, timeout=30
    )
    marker_pid = int(marker_text)
    reported: str = wait_for(
        "infrastructure_pid", lambda: _read(stack, flow_run_id).infrastructure_pid, timeout=10
    )
    assert run.state.is_running()
    assert local_pid_of(reported) == marker_pid
    return marker_pid


def test_deployment_run_completes_with_its_return_value(
    worker_stack: WorkerStack, worker_process: subprocess.Popen[bytes]
) -> None:
    warm_before = wait_for("a warm process", lambda: _warm_pids(worker_process.pid), timeout=30)
    flow_run_id = _submit(worker_stack, "double", x=21)
    run = _wait_state(worker_stack, flow_run_id, final=True, timeout=60)
    assert run.state.is_completed(), (run.state, worker_stack.log("jb-worker-main"))
    with worker_stack.settings():
        result = run.state.result()
    assert result["value"] == 42
    # The run executed in a process the worker had pre-started, and that is the reported pid.
    assert result["pid"] == local_pid_of(run.infrastructure_pid)
    assert result["pid"] in warm_before
    # ...and a replacement warm process is ready for the next run.
    wait_for("a replacement warm process", lambda: _warm_pids(worker_process.pid), timeout=30)


def test_module_entrypoint_without_path_sees_the_job_environment(
    worker_stack: WorkerStack, worker_process: subprocess.Popen[bytes]
) -> None:
    flow_run_id = _submit(worker_stack, "env_probe")
    run = _wait_state(worker_stack, flow_run_id, final=True, timeout=60)
    assert run.state.is_completed(), (run.state, worker_stack.log("jb-worker-main"))
    with worker_stack.settings():
        result = run.state.result()
    # The job's env reached the (pre-started) process, including Prefect settings read from it.
    assert result["var"] == "from-job"
    assert result["default_retries"] == 3
    assert result["pid"] == local_pid_of(run.infrastructure_pid)


def test_cancelling_a_running_flow_run_ends_cancelled_and_kills_its_process(
    worker_stack: WorkerStack, worker_process: subprocess.Popen[bytes]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    marker = worker_stack.tmp / "cancel.pid"
    flow_run_id = _submit(worker_stack, "sleepy", seconds=300, marker=str(marker))
    pid = _running_pid(worker_stack, flow_run_id, marker)

    with worker_stack.settings(), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling())
    run = _wait_state(worker_stack, flow_run_id, final=True, timeout=30)
    assert run.state.is_cancelled(), (run.state, worker_stack.log("jb-worker-main"))
    wait_for("the flow-run process to be gone", lambda: not pid_alive(pid), timeout=10)


def test_killed_flow_run_process_is_reported_crashed(
    worker_stack: WorkerStack, worker_process: subprocess.Popen[bytes]
) -> None:
    marker = worker_stack.tmp / "kill.pid"
    flow_run_id = _submit(worker_stack, "sleepy", seconds=300, marker=str(marker))
    pid = _running_pid(worker_stack, flow_run_id, marker)

    os.kill(pid, signal.SIGKILL)
    run = _wait_state(worker_stack, flow_run_id, final=True, timeout=30)
    assert run.state.is_crashed(), (run.state, worker_stack.log("jb-worker-main"))
    assert worker_process.poll() is None, "the worker must survive a killed flow run"


def test_worker_shutdown_leaves_no_warm_process(worker_stack: WorkerStack) -> None:
    name = "jb-worker-shutdown"
    proc = worker_stack.start_worker(name, "--warm", "2")
    try:
        _wait_online(worker_stack, proc, name)
        warm: list[int] = wait_for(
            "two warm processes",
            lambda: pids if len(pids := _warm_pids(proc.pid)) == 2 else None,
            timeout=30,
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        assert code == 0, worker_stack.log(name)
    finally:
        _stop(proc)
    wait_for("warm processes to be gone", lambda: not any(pid_alive(p) for p in warm), timeout=10)


def test_first_signal_drains_running_flow_runs(worker_stack: WorkerStack) -> None:
    name = "jb-worker-drain"
    proc = worker_stack.start_worker(name, "--warm", "1", pool=SOLO_POOL)
    try:
        _wait_online(worker_stack, proc, name, SOLO_POOL)
        marker = worker_stack.tmp / "drain.pid"
        flow_run_id = _submit(worker_stack, "solo-sleepy", seconds=4, marker=str(marker))
        pid = _running_pid(worker_stack, flow_run_id, marker)
        warm = wait_for("a replacement warm process", lambda: _warm_pids(proc.pid), timeout=30)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert code == 0, worker_stack.log(name)
        run = _read(worker_stack, flow_run_id)
        assert run.state.is_completed(), (run.state, worker_stack.log(name))
    finally:
        _stop(proc)
    wait_for(
        "all worker processes to be gone", lambda: not any(pid_alive(p) for p in [pid, *warm]), timeout=10
    )


def test_idle_warm_processes_exit_when_the_worker_is_killed(worker_stack: WorkerStack) -> None:
    name = "jb-worker-sigkill"
    proc = worker_stack.start_worker(name, "--warm", "1")
    try:
        warm = wait_for("a warm process", lambda: _warm_pids(proc.pid), timeout=60)
        proc.kill()
        proc.wait(10)
    finally:
        _stop(proc)
    # Their stdin reaches EOF when the worker dies; they must not linger as orphans.
    wait_for("orphaned warm processes to exit", lambda: not any(pid_alive(p) for p in warm), timeout=30)
