"""``batch``: one named job over many items, each with its own status (Curatore's document batches).

The items (inline ``items``, or a JSON-lines ``items_file`` for big batches) go in groups to a registered
item handler (:mod:`jobbridge.batch.handlers`), one Prefect task per group, at most ``concurrency``
groups at a time, on a Dask cluster when ``JOBBRIDGE_DASK_ADDRESS`` is set and on a thread pool otherwise.
An item that fails fails alone; the job's progress is items done / total; each item's status and error go
into the job's items artifact (``Job.items``).

How it ends: COMPLETED when every item is done. Otherwise a FAILED-type Prefect state, named
``CompletedWithErrors`` when some items were done and ``Failed`` when none were (or the handler is
missing), its message giving the count and the first error. Not a Completed state with an error message:
that was Curatore's ``COMPLETED`` + ``error_message '1/3 documents failed'``, which every reader that
looks only at the status (CLI exit codes, dashboards, legacy mirrors, Prefect automations) took for a
success. The state's name keeps the partial outcome visible in Prefect's UI; the result's ``outcome``
(``completed`` / ``completed_with_errors`` / ``failed``), its counts and first failures tell the rest.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobbridge.batch.grouping import (
    ITEMS_ARTIFACT_TYPE,
    BatchReport,
    Entry,
    Group,
    ItemOutcome,
    choose_group_size,
    count_file_items,
    entries_from_file,
    entries_from_list,
    group_failed,
    groups,
    run_group,
)
from jobbridge.batch.handlers import UnknownItemHandlerError, get_item_handler
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.settings import Settings, get_settings
from jobbridge.tasks.files import field_error, require_path
from jobbridge.tasks.progress import Progress, record_result, start_progress

#: Inline items a job may carry; more belong in ``items_file`` (parameters live in Prefect's database).
MAX_INLINE_ITEMS = 10_000
#: Name of the FAILED-type state of a batch where some items were done and some failed.
COMPLETED_WITH_ERRORS = "CompletedWithErrors"
#: Failures logged one by one; the rest are counted in the summary.
LOGGED_FAILURES = 20


class BatchParameters(BaseModel):
    """Parameters of a ``batch`` job."""

    model_config = ConfigDict(extra="forbid")

    handler: str = Field(description="Name of a registered item handler (echo, checksum, fail-if, ...).")
    items: list[Any] | None = Field(
        default=None,
        description=f"The items, as JSON values (at most {MAX_INLINE_ITEMS}; use items_file for more). "
        "An object's 'id' field names the item, else its index.",
    )
    items_file: Path | None = Field(
        default=None,
        description="A JSON-lines file with one item per line, read lazily (for big batches). "
        "An object's 'id' field names the item, else its line number.",
    )
    group_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Items per task (default: JOBBRIDGE_BATCH_GROUP_SIZE, else chosen from the count).",
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Groups run at once (default: JOBBRIDGE_BATCH_CONCURRENCY).",
    )

    @field_validator("handler")
    @classmethod
    def _handler_is_registered(cls, value: str) -> str:
        try:
            get_item_handler(value)
        except UnknownItemHandlerError as error:
            raise PydanticCustomError("handler", "{reason}", {"reason": str(error)}) from None
        return value

    @field_validator("items")
    @classmethod
    def _items_fit(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and len(value) > MAX_INLINE_ITEMS:
            raise PydanticCustomError(
                "items",
                "holds {count} items, more than {limit}: write them to a JSON-lines file and pass items_file",
                {"count": len(value), "limit": MAX_INLINE_ITEMS},
            )
        return value

    @field_validator("items_file")
    @classmethod
    def _items_file_exists(cls, value: Path | None) -> Path | None:
        return None if value is None else require_path(value, "file")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.items is None) == (self.items_file is None):
            raise field_error("items", "give exactly one of items and items_file", self.items)
        return self


# --------------------------------------------------------------------------------------------------
# The task runner


def batch_task_runner(settings: Settings, concurrency: int) -> TaskRunner[Any]:
    """The runner one batch fans out on: Dask when ``dask_address`` is set, else a thread pool.

    Chosen at run time rather than fixed on the ``@flow``, so one deployed flow follows the settings
    of the worker that runs it. ``local`` starts a LocalCluster of worker *processes* (real parallelism
    for CPU-bound handlers; each imports jobbridge once); any other value is a scheduler's address.
    """
    address = settings.dask_address
    if not address:
        return ThreadPoolTaskRunner(max_workers=concurrency)
    from prefect_dask.task_runners import DaskTaskRunner

    if address == "local":
        workers = max(1, min(concurrency, os.cpu_count() or 1))
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": max(1, concurrency // workers),
                "processes": True,
                "dashboard_address": None,
            }
        )
    return DaskTaskRunner(address=address)


def describe_runner(settings: Settings) -> str:
    """``threads``, ``dask:local`` or ``dask:<address>``: where the groups ran (in the result)."""
    return f"dask:{settings.dask_address}" if settings.dask_address else "threads"


# --------------------------------------------------------------------------------------------------
# Groups as tasks


@task(name="batch-group", task_run_name="batch-group-{group.number}", cache_policy=NO_CACHE, **RETRYABLE)
def process_group(group: Group, handler: str) -> list[ItemOutcome]:
    """Run the handler over one group; item errors are outcomes, not task failures.

    So this task fails (and retries) only when the group as a whole breaks; an unknown handler is a
    validation error and is not retried. Not cached: handlers may have side effects.
    """
    return run_group(get_item_handler(handler), group.entries)


def fan_out(
    runner: TaskRunner[Any], handler: str, batches: Iterator[Group], limit: int
) -> Iterator[list[ItemOutcome]]:
    """Submit each group as a task, at most ``limit`` in flight, and yield outcomes as groups finish.

    Bounded in flight, so a million-item file is read only as fast as it is processed. A group whose
    task failed as a whole counts as failed items, and the other groups carry on.
    """
    finished: queue.SimpleQueue[PrefectFuture[Any]] = queue.SimpleQueue()
    pending: dict[PrefectFuture[Any], Group] = {}

    def collect() -> list[ItemOutcome]:
        future = finished.get()
        group = pending.pop(future)
        try:
            return list(future.result())
        except Exception as exc:
            return group_failed(group.entries, exc)

    for group in batches:
        if len(pending) >= limit:
            yield collect()
        future = runner.submit(process_group, {"group": group, "handler": handler})
        pending[future] = group
        future.add_done_callback(finished.put)
    while pending:
        yield collect()


# --------------------------------------------------------------------------------------------------
# The flow


def record_items(records: list[dict[str, Any]], summary: str) -> None:
    """Attach the per-item records to the flow run (read back as ``Job.items``)."""
    context = FlowRunContext.get()
    flow_run_id = context.flow_run.id if context and context.flow_run else None
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                type=ITEMS_ARTIFACT_TYPE, data=records, description=summary, flow_run_id=flow_run_id
            )
        )


def _entries(params: BatchParameters) -> tuple[int, Iterator[Entry]]:
    if params.items is not None:
        return len(params.items), entries_from_list(params.items)
    assert params.items_file is not None  # the model requires one of them
    return count_file_items(params.items_file), entries_from_file(params.items_file)


def _log_failures(outcomes: list[ItemOutcome], already: int) -> None:
    logger = get_run_logger()
    for outcome in outcomes:
        if outcome.ok:
            continue
        if already < LOGGED_FAILURES:
            logger.warning("item %s failed: %s", outcome.id, outcome.error)
        already += 1


def _outcome_state(report: BatchReport, result: dict[str, Any]) -> dict[str, Any] | State[Any]:
    if report.outcome == "completed":
        return result
    name = COMPLETED_WITH_ERRORS if report.outcome == "completed_with_errors" else "Failed"
    return Failed(name=name, message=report.summary())


@job_type("batch", parameters=BatchParameters)
@flow(name="batch", description="Run an item handler over many items, each with its own status.")
def batch(
    handler: str,
    items: list[Any] | None = None,
    items_file: Path | None = None,
    group_size: int | None = None,
    concurrency: int | None = None,
) -> dict[str, Any] | State[Any]:
    """Run ``handler`` over every item; returns counts and failures (see the module for the outcome)."""
    params = begin(
        "batch",
        BatchParameters,
        handler=handler,
        items=items,
        items_file=items_file,
        group_size=group_size,
        concurrency=concurrency,
    )
    settings = get_settings()
    slots = params.concurrency or settings.batch_concurrency
    total, entries = _entries(params)
    size = choose_group_size(total, slots, params.group_size or settings.batch_group_size)
    runner_name = describe_runner(settings)
    get_run_logger().info(
        "running '%s' over %d items in groups of %d, %d at a time, on %s",
        params.handler,
        total,
        size,
        slots,
        runner_name,
    )
    tracker = Progress(start_progress(f"'{params.handler}' over {total} items"), total, unit="items")
    report = BatchReport(total)
    started = time.monotonic()
    with batch_task_runner(settings, slots) as runner:
        for outcomes in fan_out(runner, params.handler, groups(entries, size), slots):
            _log_failures(outcomes, report.failed)
            report.add(outcomes)
            tracker.advance(len(outcomes))
    tracker.finish()
    seconds = time.monotonic() - started
    result = report.as_result(
        handler=params.handler,
        group_size=size,
        groups=-(-total // size) if total else 0,
        concurrency=slots,
        runner=runner_name,
        seconds=round(seconds, 3),
        items_per_second=round(total / seconds, 1) if seconds > 0 else None,
    )
    record_items(report.records(), report.summary())
    record_result(result, report.summary())
    return _outcome_state(report, result)
