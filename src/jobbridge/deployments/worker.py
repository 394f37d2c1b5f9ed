"""A process worker that starts flow runs in pre-started ("warm") Python processes.

Why: with a stock ``ProcessWorker`` most of the time from ``run_deployment`` to RUNNING is spent
starting interpreters and importing Prefect for every run. :class:`JobbridgeWorker` keeps ``warm``
processes (``python -m jobbridge.deployments.warm``) that have already done those imports; a claimed
run is handed to one of them over stdin and a replacement is started at once.

Everything else is Prefect's own machinery, unchanged: the worker polls and proposes states
exactly like ``ProcessWorker``, and each run goes through ``FlowRunExecutorContext`` /
``FlowRunExecutor`` with a custom *starter* (:class:`WarmProcessStarter`, in
:mod:`jobbridge.deployments.warm_pool` with :class:`WarmProcessPool`) in place of Prefect's
``WorkspaceResolvingEngineCommandStarter``. The starter registers the run with the executor's
control channel, builds the same environment the stock starter would, and reports the warm
process as the run's ``ProcessHandle`` (its own process group). Hence:

* the flow run's ``infrastructure_pid`` is ``{hostname}:{pid}`` of the warm process (as Prefect 2's
  process worker wrote it), so that the mirror's stale sweep can tell a dead run on this host;
* cancellation (a run set to CANCELLING) is observed by the executor context, which delivers the
  intent on the control channel and SIGTERMs / SIGKILLs that process group, then finalises
  CANCELLED and runs ``on_cancellation`` hooks (via the workspace manifest the warm process wrote);
* a warm process that dies (``kill -9``) is seen when ``wait()`` returns and is reported CRASHED.

Runs whose job configuration sets an explicit ``command`` are delegated to the stock
``ProcessWorker.run`` (that command is what the user asked to be executed).

Stopping (``python -m jobbridge.deployments.worker``): the first SIGINT/SIGTERM drains -- no new runs
are claimed, the worker exits once the running ones have finished; a second one stops now (like
Prefect 3.9.1's ``prefect worker start`` on its *first* signal, which does not drain: in-flight
flow-run processes are SIGTERMed and report CRASHED); a third SIGKILLs the worker. Idle warm
processes are killed on every orderly exit and leave by themselves (stdin EOF) if the worker dies.

Work pool type: the worker reports ``type = "process"`` so it serves ordinary ``process`` pools (same
base job template as ``ProcessWorker``, no type-mismatch warning, and a stock
``prefect worker start --pool NAME`` can serve the same pool). Its dispatch key is
``jobbridge-process`` so that importing this module does not replace ``ProcessWorker`` in Prefect's
worker-type registry.

Prefect version: written against Prefect 3.9.1 private runner modules (``prefect.runner.*``); pin it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.workers.base import BaseWorkerResult
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

# WarmProcessPool and WarmProcessStarter lived here before the split; still importable from here.
from jobbridge.deployments.warm_pool import WarmProcessPool, WarmProcessStarter
from jobbridge.processes import infrastructure_id

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = [
    "JobbridgeWorker",
    "WarmProcessPool",
    "WarmProcessStarter",
    "build_parser",
    "main",
]


class JobbridgeWorker(ProcessWorker):
    """``ProcessWorker`` whose flow runs start in warm processes (see module docstring).

    ``warm`` is the number of idle warm processes kept ready (0 = stock behaviour).
    """

    type = "process"
    _description = "Process worker that starts flow runs in pre-started Python processes."
    _display_name = "Jobbridge process"

    def __init__(self, *args: Any, warm: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warm_pool = WarmProcessPool(warm)
        self._draining = False
        self._polling = False
        self._active_runs = 0

    @classmethod
    def __dispatch_key__(cls) -> str:
        # Registry key only; the API-facing worker type stays "process" (see module docstring).
        return "jobbridge-process"

    @property
    def warm_pool(self) -> WarmProcessPool:
        """The pool of warm processes (exposed for health checks and tests)."""
        return self._warm_pool

    async def setup(self) -> None:
        """Start the warm processes first: they import while the worker syncs with the API."""
        await self._warm_pool.fill()
        try:
            await super().setup()
        except BaseException:
            await self._warm_pool.aclose()
            raise

    async def teardown(self, *exc_info: Any) -> None:
        """Stop like ``ProcessWorker``, then kill idle warm processes so none outlive us."""
        try:
            await self._warm_pool.aclose()
        finally:
            await super().teardown(*exc_info)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called: no new runs are claimed."""
        return self._draining

    @property
    def busy(self) -> bool:
        """True while a poll is claiming runs or a claimed run has not finished yet."""
        return self._polling or bool(self._submitting_flow_run_ids) or self._active_runs > 0

    async def drain(self, check_interval: float = 0.2) -> None:
        """Stop claiming runs and return once every claimed run has finished.

        Prefect 3.9.1's worker has no drain: its first SIGINT/SIGTERM cancels the worker and thereby
        terminates in-flight flow-run processes. This lets a stop wait for them instead.
        """
        self._draining = True
        while self.busy:
            await anyio.sleep(check_interval)

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        """Poll and claim like ``BaseWorker``, except while draining (then claim nothing)."""
        if self._draining:
            return []
        self._polling = True
        try:
            return await super().get_and_submit_flow_runs()
        finally:
            self._polling = False

    async def _submit_run_and_capture_errors(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[int | Exception] | None = None,
    ) -> BaseWorkerResult | Exception:
        # Counts a run from submission until its final state was proposed (see ``busy``).
        self._active_runs += 1
        try:
            return await super()._submit_run_and_capture_errors(flow_run, task_status)
        finally:
            self._active_runs -= 1

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> ProcessWorkerResult:
        """``ProcessWorker.run`` with :class:`WarmProcessStarter` as the starter.

        Explicit job commands and ``warm=0`` go through the stock implementation.
        """
        if configuration._command_configured or self._warm_pool.size == 0:
            return await super().run(flow_run, configuration, task_status)
        if task_status is None:
            task_status = anyio.TASK_STATUS_IGNORED

        working_dir_ctx: contextlib.AbstractContextManager[Any] = (
            tempfile.TemporaryDirectory(suffix="prefect")
            if not configuration.working_dir
            else contextlib.nullcontext(configuration.working_dir)
        )
        execution: FlowRunExecutionResult | None = None
        with working_dir_ctx as working_dir, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as ctx:
                workspace_root = Path(working_dir).resolve()
                starter = WarmProcessStarter(
                    pool=self._warm_pool,
                    workspace_root=workspace_root,
                    stream_output=configuration.stream_output,
                    control_channel=ctx.control_channel,
                    source_cwd=workspace_root,
                    environment=configuration.env,
                )
                ctx.call_after_exit(starter.close)
                executor = ctx.create_executor(
                    flow_run,
                    starter,
                    propose_submitting=False,
                    hook_runner=starter.hook_runner,
                )

                async def execute(
                    *, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as task_group:
                    handle = await task_group.start(execute)
                    if handle.pid is None:
                        raise RuntimeError("Flow run process has no PID")
                    task_status.started(infrastructure_id(handle.pid))

        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m jobbridge.deployments.worker`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m jobbridge.deployments.worker",
        description="Serve a Prefect process work pool, starting flow runs in warm processes.",
    )
    parser.add_argument("--pool", "-p", default=None, help="work pool name (default: settings)")
    parser.add_argument(
        "--warm", type=int, default=None, help="idle warm processes to keep (default: settings)"
    )
    parser.add_argument(
        "--query-seconds",
        type=float,
        default=None,
        help="seconds between polls for scheduled runs (default: settings)",
    )
    parser.add_argument(
        "--prefetch-seconds",
        type=float,
        default=None,
        help="how far ahead to claim scheduled runs (default: PREFECT_WORKER_PREFETCH_SECONDS)",
    )
    parser.add_argument("--name", "-n", default=None, help="worker name (default: random)")
    parser.add_argument("--limit", "-l", type=int, default=None, help="max concurrent runs")
    return parser


def _install_stop_handlers(worker: JobbridgeWorker, main_task: asyncio.Task[Any]) -> bool:
    """SIGINT/SIGTERM: 1st drains then stops, 2nd stops now, 3rd SIGKILLs (False: unsupported).

    "Stops" means cancelling the worker's main task, which is how ``prefect worker start`` stops
    on its first signal: Prefect's executor then terminates in-flight flow-run processes, which
    report CRASHED, and :meth:`JobbridgeWorker.teardown` kills the idle warm processes.
    """
    loop = asyncio.get_running_loop()
    received = 0
    background: set[asyncio.Task[None]] = set()  # keeps the drain task referenced

    async def drain_then_stop() -> None:
        await worker.drain()
        print("Worker drained; stopping.", flush=True)
        main_task.cancel()

    def on_signal(signum: int) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            print(
                f"Received {name}: draining (claiming no new flow runs, waiting for the running "
                "ones). Send it again to stop now.",
                flush=True,
            )
            task = loop.create_task(drain_then_stop())
            background.add(task)
            task.add_done_callback(background.discard)
        elif received == 2:
            print(f"Received {name} again: stopping now.", flush=True)
            main_task.cancel()
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


async def _serve(args: argparse.Namespace, pool: str, warm: int) -> None:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker

    worker = JobbridgeWorker(
        work_pool_name=pool,
        name=args.name,
        limit=args.limit,
        prefetch_seconds=args.prefetch_seconds,
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        warm=warm,
    )
    main_task = asyncio.current_task()
    if main_task is None or not _install_stop_handlers(worker, main_task):
        # No asyncio signal support (Windows): Prefect's own handlers, no drain.
        setup_signal_handlers_worker(os.getpid(), "the jobbridge worker", print)
    await worker.start(printer=print)


def main(argv: list[str] | None = None) -> int:
    """Run the worker until it is stopped; returns the process exit code."""
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings

    args = build_parser().parse_args(argv)
    try:
        from jobbridge.settings import get_settings

        settings = get_settings()
        default_pool, default_warm = settings.work_pool, settings.worker_warm_processes
        default_query: float = settings.worker_query_seconds
    except ImportError:  # pragma: no cover - settings module is always shipped
        default_pool, default_warm, default_query = "local", 1, 1.0
    pool = args.pool or default_pool
    warm = default_warm if args.warm is None else args.warm
    query_seconds = default_query if args.query_seconds is None else args.query_seconds
    if warm < 0 or query_seconds <= 0:
        build_parser().error("--warm must be >= 0 and --query-seconds > 0")

    with temporary_settings(updates={PREFECT_WORKER_QUERY_SECONDS: query_seconds}):
        try:
            asyncio.run(_serve(args, pool, warm))
        except (asyncio.CancelledError, KeyboardInterrupt):
            print("Worker stopped!")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
