"""A pre-started ("warm") flow-run process for :class:`jobbridge.deployments.worker.JobbridgeWorker`.

Why this exists: most of a stock process worker's submit->RUNNING latency is spent starting fresh
interpreters (the workspace supervisor, then ``python -m prefect.engine``), each importing Prefect
(~1 s on 2 cores) before it can do anything. A warm process pays those imports *before* a run
arrives, then blocks on stdin. When the worker claims a run it writes one JSON line (see
:class:`WarmJob`) and closes stdin; this process then does exactly what Prefect's
``prefect.runner._workspace_supervisor`` + ``prefect.engine.__main__`` pair does, but in-process:

1. adopt the worker-prepared environment and working directory (as a fresh process would);
2. prepare the deployment workspace (pull steps / storage copy) and write the workspace manifest
   the worker's hook runner reads for ``on_cancellation`` / ``on_crashed`` hooks;
3. run the flow run through the engine: ``configure_from_env``, ``handle_engine_signals``,
   ``load_flow_run``, ``load_flow``, ``RunMetrics``, ``run_flow``.

If the workspace selects another launcher (an explicit command, or Prefect's automatic
``uv run`` for projects declaring ``prefect`` as a dependency) the process ``exec``s it, exactly
like the stock supervisor, so the pid the worker reported stays the flow run's pid.

One warm process runs at most one flow run and then exits (isolation: killing it kills the run).
An idle warm process exits by itself when its stdin reaches EOF (its worker went away).

What cannot change between the warm start and the run (documented limitation): anything read
while importing -- interpreter flags and ``PYTHON*`` variables such as ``PYTHONHASHSEED``,
modules already imported (Prefect, pydantic, ``jobbridge.flows`` and their import-time reads of
the environment, and their code as it was on disk when the warm process started), the Python
executable and its site-packages; ``sys.path`` entries the warm process started with stay (after
the run's own). Prefect settings *are* re-read from the adopted environment (the global settings
context is refreshed), logging is reconfigured when ``PREFECT_LOGGING_*`` changed, ``TZ`` is
re-applied, the run's ``PYTHONPATH`` entries go first on ``sys.path`` and jobbridge's cached
``get_settings()`` is cleared. The worker starts warm processes with its own environment
(including its ``PREFECT_API_URL`` and profile settings), so in practice only per-job ``env``
differs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

# ``python -m`` puts the start-up working directory first on ``sys.path``; a fresh engine
# process would instead see the run's working directory there. Remember the start-up path so the
# run's path can be rebuilt like a fresh ``python -m`` would.
_STARTUP_SYS_PATH: list[str] = list(sys.path)

_logger = logging.getLogger("jobbridge.deployments.warm")

#: Engine command a stock supervisor would ``exec``; when selected we run it in-process instead.
ENGINE_MODULE = "prefect.engine"


@dataclass(frozen=True)
class WarmJob:
    """What the worker hands a warm process: one flow run, and how a fresh process would see it.

    ``config`` is a ``prefect.runner._workspace_runtime.WorkspaceSupervisorConfig`` as JSON
    (flow run id, workspace root, manifest path, explicit command), ``env`` the complete
    environment the stock starter would have given the supervisor, ``cwd`` its working directory.
    """

    config: dict[str, Any]
    env: dict[str, str]
    cwd: str | None
    stream_output: bool

    def to_line(self) -> bytes:
        """Serialise as the single newline-terminated line the warm process reads."""
        payload = {
            "config": self.config,
            "env": self.env,
            "cwd": self.cwd,
            "stream_output": self.stream_output,
        }
        return json.dumps(payload).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> WarmJob:
        """Parse a line written by :meth:`to_line`."""
        payload = json.loads(line)
        return cls(
            config=dict(payload["config"]),
            env={str(k): str(v) for k, v in payload["env"].items()},
            cwd=payload.get("cwd"),
            stream_output=bool(payload.get("stream_output", True)),
        )


def preimport() -> None:
    """Import everything a flow run needs before one arrives; this is the time a warm process saves."""
    import prefect
    import prefect._internal.metrics
    import prefect.deployments.steps.core
    import prefect.engine
    import prefect.filesystems
    import prefect.flow_engine
    import prefect.runner._workspace_resolver
    import prefect.runner._workspace_supervisor
    import prefect.task_engine  # noqa: F401

    try:
        # Registers the project's built-in flows so their deployments load without importing.
        import jobbridge.flows  # noqa: F401
    except ImportError:
        _logger.debug("jobbridge.flows is not importable; flows load at run time", exc_info=True)


def _replace_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``env`` (as ``exec`` with that environment would) and re-read
    what Prefect and the C library derive from it."""
    logging_before = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING_")}
    tz_before = os.environ.get("TZ")
    os.environ.clear()
    os.environ.update(env)

    import prefect.context

    prefect.context.refresh_global_settings_context()
    logging_after = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING_")}
    if logging_after != logging_before:
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)
    if os.environ.get("TZ") != tz_before and hasattr(time, "tzset"):
        time.tzset()
    # jobbridge's own settings are cached per process; forget anything read before the hand-over.
    jobbridge_settings = sys.modules.get("jobbridge.settings")
    cached = getattr(jobbridge_settings, "get_settings", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


def _fresh_sys_path(working_directory: Path, env: dict[str, str]) -> list[str]:
    """The ``sys.path`` for the run: what a fresh ``python -m prefect.engine`` started in
    ``working_directory`` with ``env`` would put first (cwd, then ``PYTHONPATH``), followed by
    every entry this process started with (its own ``PYTHONPATH`` included: modules may already
    have been imported from there, so those entries are kept rather than dropped)."""
    pythonpath = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    result: list[str] = []
    for entry in [str(working_directory), *pythonpath, *_STARTUP_SYS_PATH[1:]]:
        if entry not in result:
            result.append(entry)
    return result


@dataclass(frozen=True)
class _Launch:
    """How the prepared workspace wants the engine started."""

    command: list[str]
    working_directory: Path
    environment: dict[str, str]
    in_process: bool


async def _prepare(job_config: dict[str, Any]) -> _Launch:
    """Mirror of ``prefect.runner._workspace_supervisor.supervise`` up to the engine launch."""
    from prefect.logging.handlers import APILogHandler
    from prefect.runner._workspace_resolver import prepare_workspace_for_flow_run
    from prefect.runner._workspace_runtime import (
        PreparedWorkspaceManifest,
        WorkspaceSupervisorConfig,
        write_private_model,
    )
    from prefect.runner._workspace_starter import (
        _workspace_command,  # pyright: ignore[reportPrivateUsage]
        workspace_environment,
    )
    from prefect.runner._workspace_supervisor import (
        _hook_command,  # pyright: ignore[reportPrivateUsage]
        _restore_runner_environment,  # pyright: ignore[reportPrivateUsage]
        _runner_owns_environment_key,  # pyright: ignore[reportPrivateUsage]
    )
    from prefect.utilities.processutils import (
        command_from_string,
        get_sys_executable,
        sanitize_subprocess_env,
    )

    config = WorkspaceSupervisorConfig.model_validate(job_config)
    runner_environment = {
        key: value for key, value in os.environ.items() if _runner_owns_environment_key(key)
    }
    workspace = await prepare_workspace_for_flow_run(config.flow_run_id, config.workspace_root)
    environment = sanitize_subprocess_env(workspace_environment(workspace))
    _restore_runner_environment(environment, runner_environment)
    environment["PREFECT__FLOW_RUN_ID"] = str(config.flow_run_id)
    environment["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
    selected_command = _workspace_command(workspace, config.command, environment=environment)
    command = (
        command_from_string(selected_command)
        if selected_command is not None
        else [get_sys_executable(), "-m", ENGINE_MODULE]
    )
    environment["PREFECT__FLOW_ENTRYPOINT"] = workspace.runtime_entrypoint

    manifest = PreparedWorkspaceManifest(
        working_directory=workspace.working_directory,
        project_root=workspace.project_root,
        runtime_entrypoint=workspace.runtime_entrypoint,
        hook_command=_hook_command(command),
        environment=environment,
    )
    write_private_model(config.manifest_path, manifest)
    await APILogHandler.aflush()
    return _Launch(
        command=command,
        working_directory=workspace.working_directory,
        environment=environment,
        in_process=selected_command is None,
    )


def run_engine(flow_run_id: UUID) -> None:
    """Run one flow run in this process: the body of ``python -m prefect.engine``'s ``__main__``.

    Kept line-for-line equivalent (Prefect 3.9.1) so exit codes mean the same to the worker:
    0 when the engine handled the outcome, 1 on an unexpected exception, a signal when killed.
    """
    from prefect._internal.control_listener import configure_from_env
    from prefect._internal.metrics import RunMetrics
    from prefect.engine import (
        _drive_run_flow_result,  # pyright: ignore[reportPrivateUsage]
        handle_engine_signals,
    )
    from prefect.flow_engine import load_flow, load_flow_run, run_flow
    from prefect.logging.loggers import flow_run_logger

    # Consume the control-channel bootstrap env before loading flow code (as the engine does).
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        flow_run = load_flow_run(flow_run_id=flow_run_id)
        run_logger = flow_run_logger(flow_run=flow_run)
        try:
            flow = load_flow(flow_run)
        except Exception:
            run_logger.error("Unexpected exception encountered when trying to load flow", exc_info=True)
            raise
        with RunMetrics(flow_run, flow):
            # The engine passes its LoggerAdapter although run_flow is annotated with Logger.
            run_result: object = run_flow(
                flow, flow_run=flow_run, error_logger=cast("logging.Logger", run_logger)
            )
            _drive_run_flow_result(flow, run_result)


def _silence_output() -> None:
    """``stream_output=False``: the stock worker sends the run's stdout/stderr to /dev/null."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def execute(job: WarmJob) -> int:
    """Run the handed-over flow run in this process; returns the process exit code."""
    import traceback

    import anyio
    from prefect.logging.handlers import APILogHandler

    if not job.stream_output:
        _silence_output()
    if job.cwd:
        os.chdir(job.cwd)
    _replace_environ(job.env)

    try:
        launch = anyio.run(_prepare, job.config)
    except Exception:
        # Same as the stock supervisor: report on stderr, exit 1, the worker proposes CRASHED.
        traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(Exception):
            anyio.run(APILogHandler.aflush)
        return 1

    if not launch.in_process:
        # Another launcher (explicit command, ``uv run``): replace this process, keeping the pid.
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(launch.working_directory)
        os.execvpe(launch.command[0], launch.command, launch.environment)

    os.chdir(launch.working_directory)
    _replace_environ(launch.environment)
    sys.path[:] = _fresh_sys_path(launch.working_directory, launch.environment)
    importlib.invalidate_caches()
    sys.argv = [ENGINE_MODULE]
    run_engine(UUID(launch.environment["PREFECT__FLOW_RUN_ID"]))
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobbridge.deployments.warm",
        description="Pre-import Prefect, then run the one flow run handed over on stdin.",
    )
    # Only a marker: lets operators and tests tell which worker a warm process belongs to.
    parser.add_argument("--worker-pid", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: pre-import, wait for one job line on stdin, run it (EOF: exit quietly)."""
    _parse_args(argv)
    try:
        preimport()
        line = sys.stdin.buffer.readline()
    except KeyboardInterrupt:
        # An idle warm process interrupted (e.g. a stack stopping every descendant with SIGINT)
        # holds no run: leave quietly instead of printing a traceback.
        return 130
    if not line.strip():
        # The worker closed our stdin without a job (shutdown) or died: nothing to do.
        return 0
    job = WarmJob.from_line(line)
    return execute(job)


if __name__ == "__main__":
    raise SystemExit(main())
