"""The warm-process pool behind :class:`jobbridge.deployments.worker.JobbridgeWorker`.

Why: starting an interpreter and importing Prefect is most of a stock process worker's time from
``run_deployment`` to RUNNING. :class:`WarmProcessPool` keeps processes of
``python -m jobbridge.deployments.warm`` (see :mod:`jobbridge.deployments.warm`) that have already
done those imports, and :class:`WarmProcessStarter` is the Prefect *starter* that hands one claimed
flow run to one of them (over stdin) instead of spawning a fresh process, then has the pool start a
replacement. The worker module keeps only the Prefect worker itself and its command line.

The starter fulfils the contract of Prefect 3.9.1's private ``prefect.runner._flow_run_executor``
``ProcessStarter`` (built like ``WorkspaceResolvingEngineCommandStarter``): registering the run with
the executor's control channel, building the same environment the stock starter would and
reporting the warm process (the leader of its own process group) as the run's ``ProcessHandle``, so
cancellation, crash detection and ``on_cancellation`` / ``on_crashed`` hooks behave as with the stock
starter. Pin Prefect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from prefect.runner._process_manager import ProcessHandle, create_isolated_termination_scope
from prefect.runner._workspace_hook_runner import WorkspaceHookRunner
from prefect.runner._workspace_runtime import WorkspaceSupervisorConfig
from prefect.settings import get_current_settings
from prefect.utilities.processutils import get_sys_executable, sanitize_subprocess_env

from jobbridge.deployments.warm import WarmJob

if TYPE_CHECKING:
    from collections.abc import Mapping

    from prefect.client.schemas.objects import FlowRun
    from prefect.runner._control_channel import ControlChannel

__all__ = ["WARM_MODULE", "WarmProcessPool", "WarmProcessStarter"]

WARM_MODULE = "jobbridge.deployments.warm"

#: Seconds to wait for killed warm processes to be reaped during shutdown.
_REAP_TIMEOUT_SECONDS = 5.0


def _import_root() -> str | None:
    """Directory that makes ``jobbridge`` importable when it is not installed (``src/`` of a
    checkout), to put on the warm processes' ``PYTHONPATH`` so they import the same code as us.

    ``None`` when jobbridge lives in site-packages: the interpreter finds it there anyway, and a
    site-packages entry on ``PYTHONPATH`` would move it ahead of the standard library.
    """
    import site
    import sysconfig

    import jobbridge

    root = Path(next(iter(jobbridge.__path__))).resolve().parent
    interpreter_dirs = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    with contextlib.suppress(AttributeError):
        interpreter_dirs.update(site.getsitepackages())
    if any(root == Path(entry).resolve() for entry in interpreter_dirs):
        return None
    return str(root)


def _with_pythonpath(env: dict[str, str], entry: str | None) -> dict[str, str]:
    """``env`` with ``entry`` appended to ``PYTHONPATH`` unless absent or already present."""
    if entry is None:
        return env
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if entry not in parts:
        parts.append(entry)
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}


def _kill_group(process: anyio.abc.Process) -> None:
    """SIGKILL a warm process and anything it started (it leads its own process group)."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sys.platform == "win32":
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGKILL)


class WarmProcessPool:
    """Keeps ``size`` idle warm processes, hands them out one run each and replaces them.

    Warm processes are started with the worker's environment plus the worker's Prefect settings
    (what Prefect's own starter gives flow-run processes), so import-time settings such as
    ``PREFECT_API_URL`` match; the run's own environment is applied at hand-over. Each warm
    process leads its own session/process group, like Prefect's isolated flow-run processes, so
    cancellation can kill everything a run started and a terminal Ctrl-C does not reach it.
    """

    def __init__(self, size: int, *, cwd: Path | str | None = None) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self._cwd = str(cwd) if cwd is not None else None
        self._idle: deque[anyio.abc.Process] = deque()
        self._closed = False
        self._lock = anyio.Lock()

    @property
    def idle_pids(self) -> list[int]:
        """Pids of the warm processes currently waiting for a run."""
        return [p.pid for p in self._idle if p.returncode is None]

    def _environment(self) -> dict[str, str]:
        env: dict[str, str | None] = dict(os.environ)
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        return _with_pythonpath(sanitize_subprocess_env(env), _import_root())

    async def _spawn(self) -> anyio.abc.Process:
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        return await anyio.open_process(
            [get_sys_executable(), "-m", WARM_MODULE, "--worker-pid", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
            cwd=self._cwd,
            env=self._environment(),
            **kwargs,
        )

    async def fill(self) -> None:
        """Start warm processes until ``size`` are idle (dead ones are dropped first)."""
        async with self._lock:
            await self._drop_dead()
            while not self._closed and len(self._idle) < self.size:
                self._idle.append(await self._spawn())

    async def _drop_dead(self) -> None:
        for process in [p for p in self._idle if p.returncode is not None]:
            self._idle.remove(process)
            with anyio.CancelScope(shield=True):
                await process.aclose()

    async def acquire(self) -> anyio.abc.Process:
        """An idle warm process for one run (a newly started one when none is idle)."""
        async with self._lock:
            if self._closed:
                raise RuntimeError("The warm process pool is closed")
            await self._drop_dead()
            if self._idle:
                return self._idle.popleft()
            return await self._spawn()

    async def aclose(self) -> None:
        """Kill every idle warm process and reap it; runs already handed out are not touched."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with self._lock:
                idle = list(self._idle)
                self._idle.clear()
            for process in idle:
                _kill_group(process)
            with anyio.move_on_after(_REAP_TIMEOUT_SECONDS):
                for process in idle:
                    await process.wait()
            for process in idle:
                with contextlib.suppress(Exception):
                    await process.aclose()


class WarmProcessStarter:
    """Prefect ``ProcessStarter`` that hands a flow run to a warm process instead of spawning.

    Fulfils the ``prefect.runner._flow_run_executor.ProcessStarter`` contract: signal the
    ``ProcessHandle`` via ``task_status.started`` before blocking, block until the process exits.
    Built like ``WorkspaceResolvingEngineCommandStarter`` (per-attempt runtime directory with
    the workspace manifest, a ``WorkspaceHookRunner`` reading it), so hooks behave the same.
    """

    def __init__(
        self,
        *,
        pool: WarmProcessPool,
        workspace_root: Path,
        stream_output: bool = True,
        control_channel: ControlChannel | None = None,
        source_cwd: Path | str | None = None,
        environment: Mapping[str, str | None] | None = None,
        deployment_name: str | None = None,
        heartbeat_seconds: int | None = None,
    ) -> None:
        self._pool = pool
        self._workspace_root = workspace_root
        self._stream_output = stream_output
        self._control_channel = control_channel
        self._source_cwd = source_cwd
        self._environment = dict(environment or {})
        self._deployment_name = deployment_name
        self._heartbeat_seconds = heartbeat_seconds
        self._runtime_directory = tempfile.TemporaryDirectory(prefix="jobbridge-warm-attempt-")
        self._manifest_path = Path(self._runtime_directory.name) / "workspace.json"
        self._hook_runner = WorkspaceHookRunner(
            manifest_path=self._manifest_path, stream_output=stream_output
        )

    @property
    def hook_runner(self) -> WorkspaceHookRunner:
        """Runs ``on_cancellation`` / ``on_crashed`` hooks in the prepared workspace runtime."""
        return self._hook_runner

    def close(self) -> None:
        """Remove the per-attempt runtime directory (after cancellation work has drained)."""
        self._runtime_directory.cleanup()

    def _child_environment(self, flow_run: FlowRun, control_env: dict[str, str]) -> dict[str, str]:
        """The environment ``EngineCommandStarter(env_overrides_settings=True)`` would build."""
        deployment_name = (
            self._deployment_name
            if self._deployment_name is not None
            else self._environment.get("PREFECT__DEPLOYMENT_NAME")
        )
        env: dict[str, str | None] = dict(os.environ)
        env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        env.update(self._environment)
        env.update(
            {
                "PREFECT__FLOW_RUN_ID": str(flow_run.id),
                "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
                **control_env,
                "PREFECT__DEPLOYMENT_NAME": deployment_name,
            }
        )
        if self._heartbeat_seconds is not None:
            env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(int(self._heartbeat_seconds))
        return sanitize_subprocess_env(env)

    async def _hand_over(self, line: bytes) -> anyio.abc.Process:
        """Write the job to a warm process; retry once on a fresh one if the first had died."""
        last_error: Exception | None = None
        for _ in range(2):
            process = await self._pool.acquire()
            try:
                assert process.stdin is not None
                await process.stdin.send(line)
                await process.stdin.aclose()
                return process
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                last_error = exc
                _kill_group(process)
                with anyio.CancelScope(shield=True):
                    await process.aclose()
        raise RuntimeError(f"Could not hand the flow run to a warm process: {last_error}")

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand ``flow_run`` to a warm process, report its handle, wait until it exits."""
        control_env: dict[str, str] = {}
        control_registered = False
        if self._control_channel is not None:
            try:
                port, token = self._control_channel.register(flow_run.id)
                control_env = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
                control_registered = True
            except RuntimeError:
                # Channel disabled (no loopback listener): Prefect falls back to kill-only.
                pass

        config = WorkspaceSupervisorConfig(
            flow_run_id=flow_run.id,
            workspace_root=self._workspace_root,
            manifest_path=self._manifest_path,
            command=None,
        )
        job = WarmJob(
            config=config.model_dump(mode="json"),
            env=self._child_environment(flow_run, control_env),
            cwd=str(self._source_cwd) if self._source_cwd is not None else None,
            stream_output=self._stream_output,
        )
        try:
            process = await self._hand_over(job.to_line())
        except BaseException:
            if control_registered and self._control_channel is not None:
                self._control_channel.unregister(flow_run.id)
            raise
        # Replace the process we just used; runs in the background, never delays this run.
        replenish = anyio.create_task_group()
        async with replenish:
            replenish.start_soon(self._replenish)
            scope = create_isolated_termination_scope(process.pid) if sys.platform != "win32" else None
            handle = (
                ProcessHandle(process, termination_scope=scope)
                if scope is not None
                else ProcessHandle(process)
            )
            task_status.started(handle)
            try:
                await process.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    # Like Prefect's ``open_process``: a cancelled wait terminates the child.
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.terminate()
                    await process.aclose()

    async def _replenish(self) -> None:
        try:
            await self._pool.fill()
        except Exception:
            from prefect.logging import get_logger

            get_logger("jobbridge.worker").exception("Could not start a warm process")
