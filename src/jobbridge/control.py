"""Submit and control jobs through Prefect: the only module that turns Jobs into flow runs and back.

A job is one flow run. Its type, org, owner and priority travel as flow-run tags
(``jobbridge:type:extract``, ``jobbridge:org:acme``...; ``test_jobbridge:...`` in TEST mode), so listing by
org or type is a server-side tag filter and TEST jobs never show up among production ones.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import FlowRunCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, LogSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Pending, Scheduled, to_state_create

from jobbridge.batch.grouping import ITEMS_ARTIFACT_TYPE
from jobbridge.deployments import ensure_deployment, queue_for_priority
from jobbridge.errors import (
    IdempotencyConflictError,
    JobbridgeError,
    JobNotFoundError,
    JobValidationError,
)
from jobbridge.jobs import (
    DEFAULT_PRIORITY,
    FINAL_STATUSES,
    Job,
    JobItem,
    JobStatus,
    status_from_prefect,
    utcnow,
)
from jobbridge.modes import configure_logging, debug_logger, job_environment
from jobbridge.registry import JobTypeSpec, get_spec
from jobbridge.runtime import pool_is_online, prefect_client, settings_override
from jobbridge.settings import Settings, get_settings
from jobbridge.tasks.progress import RESULT_ARTIFACT_TYPE

log = debug_logger("control")

#: Tag fields carried as ``<prefix>:<field>:<value>``.
_TAG_FIELDS = ("type", "org", "owner", "priority")
_POLL_SECONDS = 0.25
_MAX_PAGE = 200
_PREFECT_ERROR_PREFIX = "Flow run encountered an exception: "


# ----------------------------------------------------------------------------------------- tags


def job_tags(job: Job, settings: Settings) -> list[str]:
    """The flow-run tags that carry ``job``'s type, org, owner and priority, plus its own tags."""
    prefix = settings.tag_prefix
    tags = [prefix, f"{prefix}:type:{job.type}", f"{prefix}:priority:{job.priority}"]
    if job.org:
        tags.append(f"{prefix}:org:{job.org}")
    if job.owner:
        tags.append(f"{prefix}:owner:{job.owner}")
    return tags + [tag for tag in job.tags if tag not in tags]


def _read_tags(tags: list[str], settings: Settings) -> tuple[dict[str, str], list[str]]:
    """Split flow-run tags into jobbridge fields and the user's own tags."""
    prefix = settings.tag_prefix + ":"
    fields: dict[str, str] = {}
    own: list[str] = []
    for tag in tags:
        if tag == settings.tag_prefix:
            continue
        if tag.startswith(prefix):
            name, _, value = tag[len(prefix) :].partition(":")
            if name in _TAG_FIELDS:
                fields[name] = value
                continue
        own.append(tag)
    return fields, own


# ------------------------------------------------------------------------------- flow run -> Job


def _artifact_data(client: SyncPrefectClient, flow_run_id: UUID, kind: str) -> Any:
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            type=ArtifactFilterType(any_=[kind]),
        ),
        sort=ArtifactSort.UPDATED_DESC,
        limit=1,
    )
    return artifacts[0].data if artifacts else None


def job_from_flow_run(
    client: SyncPrefectClient, run: FlowRun, settings: Settings, *, details: bool = True
) -> Job:
    """Build the Job that a flow run represents (progress and result read from its artifacts)."""
    fields, own_tags = _read_tags(list(run.tags), settings)
    state = run.state
    status = status_from_prefect(state.type.value if state else None, state.name if state else None)
    progress = 100.0 if status is JobStatus.COMPLETED else 0.0
    result: Any = None
    items: list[JobItem] = []
    if details:
        if status is not JobStatus.COMPLETED:
            data = _artifact_data(client, run.id, "progress")
            if isinstance(data, int | float):
                progress = float(min(max(data, 0.0), 100.0))
        result = _artifact_data(client, run.id, RESULT_ARTIFACT_TYPE)
        items = _batch_items(client, run, fields)
    error = None
    if status in (JobStatus.FAILED, JobStatus.CRASHED, JobStatus.CANCELLED) and state:
        error = (state.message or status.value.lower()).removeprefix(_PREFECT_ERROR_PREFIX)
    return Job(
        id=str(run.id),
        name=run.name,
        type=fields.get("type", "unknown"),
        parameters=dict(run.parameters or {}),
        priority=int(fields.get("priority", DEFAULT_PRIORITY)),
        org=fields.get("org"),
        owner=fields.get("owner"),
        tags=own_tags,
        status=status,
        progress=progress,
        created_at=run.created or run.expected_start_time or utcnow(),
        started_at=run.start_time,
        finished_at=run.end_time if status in FINAL_STATUSES else None,
        attempts=run.run_count,
        error=error,
        result=result,
        items=items,
    )


def _batch_items(client: SyncPrefectClient, run: FlowRun, fields: dict[str, str]) -> list[JobItem]:
    """Per-item status of a batch job (its ``batch-items`` artifact); other types have none.

    Read only for batch jobs: the artifact of a big batch is up to about 800 KB.
    """
    if fields.get("type") != "batch":
        return []
    records = _artifact_data(client, run.id, ITEMS_ARTIFACT_TYPE)
    if not isinstance(records, list):
        return []
    return [JobItem.model_validate(record) for record in records]


def _read_run(client: SyncPrefectClient, job_id: str, settings: Settings) -> FlowRun:
    try:
        run_id = UUID(str(job_id))
    except ValueError:
        raise JobNotFoundError(f"'{job_id}' is not a job id (a job id is a UUID)") from None
    try:
        run = client.read_flow_run(run_id)
    except ObjectNotFound:
        raise JobNotFoundError(f"no job with id {job_id}") from None
    if settings.tag_prefix not in run.tags:
        raise JobNotFoundError(
            f"no job with id {job_id} in {settings.mode.value} mode "
            f"(flow run {job_id} is not tagged '{settings.tag_prefix}')"
        )
    return run


# ------------------------------------------------------------------------------------- submit


def submit(
    job: Job,
    *,
    wait: bool = False,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    settings: Settings | None = None,
) -> Job:
    """Validate ``job`` and start it; returns the job as Prefect holds it (its id is the flow run id).

    Through the job type's deployment when a worker is polling the work pool (``execution=auto``), else
    in-process: in a background thread, or in this thread when ``wait`` is true. Resubmitting with the
    same ``idempotency_key`` returns the same job; the same key with other parameters is an error.
    """
    settings = settings or get_settings()
    configure_logging(settings)
    spec = get_spec(job.type)
    parameters = spec.validate_parameters(job.parameters)
    job = job.model_copy(update={"type": spec.name, "parameters": parameters})
    log.debug("submitting %s job %r with %s", spec.name, job.name, parameters)
    with prefect_client(settings) as client:
        run = _create_run(client, spec, job, settings, idempotency_key)
        if idempotency_key and dict(run.parameters or {}) != parameters:
            raise IdempotencyConflictError(
                f"idempotency key '{idempotency_key}' already belongs to job {run.id} "
                f"with other parameters ({run.parameters}); use a new key to submit different work"
            )
        if run.deployment_id is None and _is_fresh(run):
            _run_in_process(spec, run, settings, block=wait)
        if wait:
            return _wait(client, str(run.id), timeout, settings)
        return job_from_flow_run(client, client.read_flow_run(run.id), settings, details=False)


def _is_fresh(run: FlowRun) -> bool:
    """True for a run nobody has started yet (a resubmitted idempotent run is not started twice)."""
    return run.state is not None and run.state.type is StateType.PENDING and run.run_count == 0


def _route_through_pool(client: SyncPrefectClient, spec: JobTypeSpec, settings: Settings) -> bool:
    if settings.execution == "inprocess" or not spec.entrypoint:
        if settings.execution == "pool":
            raise JobValidationError(
                f"job type '{spec.name}' has no importable entrypoint, so no worker can run it; "
                "define its flow in an importable module or set JOBBRIDGE_EXECUTION=inprocess"
            )
        return False
    if settings.execution == "pool":
        return True
    return pool_is_online(client, settings.work_pool)


def _create_run(
    client: SyncPrefectClient,
    spec: JobTypeSpec,
    job: Job,
    settings: Settings,
    idempotency_key: str | None,
) -> FlowRun:
    name = job.name if job.name.startswith(settings.namespace) else settings.namespaced(job.name)
    tags = job_tags(job, settings)
    if _route_through_pool(client, spec, settings):
        deployment_id = ensure_deployment(client, spec, settings)
        return client.create_flow_run_from_deployment(
            deployment_id,
            parameters=job.parameters,
            name=name,
            tags=tags,
            idempotency_key=idempotency_key,
            work_queue_name=queue_for_priority(job.priority),
            job_variables={"env": job_environment(settings)},
        )
    flow_id = _flow_id(client, spec)
    create = FlowRunCreate(
        flow_id=flow_id,
        name=name,
        parameters=job.parameters,
        tags=tags,
        state=to_state_create(Pending()),
        idempotency_key=idempotency_key,
    )
    response = client.request("POST", "/flow_runs/", json=create.model_dump(mode="json", exclude_unset=True))
    return FlowRun.model_validate(response.json())


_flow_ids: dict[tuple[str, str], UUID] = {}


def _flow_id(client: SyncPrefectClient, spec: JobTypeSpec) -> UUID:
    """The server's id of ``spec``'s flow, registered once per API per process."""
    key = (str(client.api_url), spec.flow.name)
    if key not in _flow_ids:
        _flow_ids[key] = client.create_flow(spec.flow)
    return _flow_ids[key]


def _run_in_process(spec: JobTypeSpec, run: FlowRun, settings: Settings, *, block: bool) -> None:
    """Run the flow here, against the same API; heartbeats are off (no worker watches this run)."""
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if PREFECT_API_URL.value():  # a background thread does not inherit this thread's settings context
        updates[PREFECT_API_URL] = PREFECT_API_URL.value()

    def body() -> None:
        with settings_override(updates):
            run_flow(spec.flow, flow_run=run, parameters=dict(run.parameters), return_type="state")

    if block:
        body()
        return
    thread = threading.Thread(target=body, name=f"jobbridge-job-{run.id}", daemon=False)
    thread.start()


# ------------------------------------------------------------------------------ read & control


def get_job(job_id: str, *, settings: Settings | None = None) -> Job:
    """The job with id ``job_id``, read from Prefect (status, progress, result)."""
    settings = settings or get_settings()
    with prefect_client(settings) as client:
        return job_from_flow_run(client, _read_run(client, job_id, settings), settings)


@dataclass
class JobPage:
    """One page of :func:`list_jobs`; pass ``next_cursor`` back to get the next page."""

    jobs: list[Job] = field(default_factory=list)
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


_STATUS_FILTERS: dict[JobStatus, tuple[list[StateType], list[str] | None, list[str] | None]] = {
    JobStatus.PENDING: ([StateType.SCHEDULED], ["AwaitingConcurrencySlot"], None),
    JobStatus.QUEUED: (
        [StateType.SCHEDULED, StateType.PENDING],
        None,
        ["AwaitingRetry", "AwaitingConcurrencySlot"],
    ),
    JobStatus.RETRYING: ([StateType.SCHEDULED], ["AwaitingRetry"], None),
    JobStatus.RUNNING: ([StateType.RUNNING], None, None),
    JobStatus.PAUSED: ([StateType.PAUSED], None, None),
    JobStatus.CANCELLING: ([StateType.CANCELLING], None, None),
    JobStatus.COMPLETED: ([StateType.COMPLETED], None, None),
    JobStatus.FAILED: ([StateType.FAILED], None, None),
    JobStatus.CANCELLED: ([StateType.CANCELLED], None, None),
    JobStatus.CRASHED: ([StateType.CRASHED], None, None),
}


def _run_filter(
    settings: Settings, org: str | None, status: JobStatus | None, job_type: str | None
) -> FlowRunFilter:
    prefix = settings.tag_prefix
    tags = [prefix]
    if job_type:
        tags.append(f"{prefix}:type:{get_spec(job_type).name}")
    if org:
        tags.append(f"{prefix}:org:{org}")
    run_filter = FlowRunFilter(tags=FlowRunFilterTags(all_=tags))
    if status is not None:
        types, names, not_names = _STATUS_FILTERS[status]
        run_filter.state = FlowRunFilterState(
            type=FlowRunFilterStateType(any_=types),
            name=FlowRunFilterStateName(any_=names, not_any_=not_names) if names or not_names else None,
        )
    return run_filter


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except ValueError:
        raise JobValidationError(f"cursor '{cursor}' is not one that list_jobs returned") from None


def list_jobs(
    *,
    org: str | None = None,
    status: JobStatus | str | None = None,
    type: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    settings: Settings | None = None,
) -> JobPage:
    """Jobs newest first, filtered server-side by org, status and type; at most ``limit`` (1-200)."""
    settings = settings or get_settings()
    if not 1 <= limit <= _MAX_PAGE:
        raise JobValidationError(f"limit {limit} is out of range: use 1 to {_MAX_PAGE}")
    wanted = _parse_status(status)
    offset = _decode_cursor(cursor)
    with prefect_client(settings) as client:
        # One extra run tells whether another page exists; the server caps a page at 200 runs.
        fetch = min(limit + 1, _MAX_PAGE)
        runs = client.read_flow_runs(
            flow_run_filter=_run_filter(settings, org, wanted, type),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=fetch,
            offset=offset,
        )
        jobs = [job_from_flow_run(client, run, settings, details=False) for run in runs[:limit]]
    next_cursor = None
    if len(runs) > limit or (fetch == limit and len(runs) == limit):
        next_cursor = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
    return JobPage(jobs=jobs, next_cursor=next_cursor)


def _parse_status(status: JobStatus | str | None) -> JobStatus | None:
    if status is None or isinstance(status, JobStatus):
        return status
    try:
        return JobStatus(status.upper())
    except ValueError:
        known = ", ".join(s.value for s in JobStatus)
        raise JobValidationError(f"status '{status}' is not one of {known}") from None


def wait_for(job_id: str, *, timeout: float | None = None, settings: Settings | None = None) -> Job:
    """Poll until the job reaches a final status (or ``timeout`` seconds pass) and return it."""
    settings = settings or get_settings()
    with prefect_client(settings) as client:
        return _wait(client, job_id, timeout, settings)


def _wait(client: SyncPrefectClient, job_id: str, timeout: float | None, settings: Settings) -> Job:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = _read_run(client, job_id, settings)
        state = run.state
        status = status_from_prefect(state.type.value if state else None, state.name if state else None)
        if status in FINAL_STATUSES or (deadline is not None and time.monotonic() >= deadline):
            return job_from_flow_run(client, run, settings)
        time.sleep(_POLL_SECONDS)


def cancel(
    job_id: str, *, wait: bool = False, timeout: float = 30.0, settings: Settings | None = None
) -> Job:
    """Ask the job to stop. A queued job is cancelled at once; a running one goes through CANCELLING."""
    settings = settings or get_settings()
    with prefect_client(settings) as client:
        run = _read_run(client, job_id, settings)
        job = job_from_flow_run(client, run, settings, details=False)
        if job.status is JobStatus.CANCELLED:
            return job
        if job.status in FINAL_STATUSES:
            raise JobbridgeError(f"job {job_id} is already {job.status.value}; nothing to cancel")
        # A run no worker has claimed yet is cancelled at once; a claimed one goes through
        # CANCELLING so that its worker stops the process.
        not_started = run.state is None or run.state.type is StateType.SCHEDULED
        new_state: State[Any] = Cancelled() if not_started else Cancelling()
        client.set_flow_run_state(run.id, new_state, force=True)
    if wait:
        return wait_for(job_id, timeout=timeout, settings=settings)
    return get_job(job_id, settings=settings)


def retry(job_id: str, *, settings: Settings | None = None) -> Job:
    """Run a FAILED, CRASHED or CANCELLED job again: the same job (same id), one more attempt."""
    settings = settings or get_settings()
    with prefect_client(settings) as client:
        run = _read_run(client, job_id, settings)
        job = job_from_flow_run(client, run, settings, details=False)
        retryable = (JobStatus.FAILED, JobStatus.CRASHED, JobStatus.CANCELLED)
        if job.status not in retryable:
            raise JobbridgeError(
                f"job {job_id} is {job.status.value}; only FAILED, CRASHED or CANCELLED jobs can be retried"
            )
        if run.deployment_id is not None:
            client.set_flow_run_state(run.id, Scheduled(name="AwaitingRetry"), force=True)
        else:
            spec = get_spec(job.type)
            client.set_flow_run_state(run.id, Pending(), force=True)
            _run_in_process(spec, client.read_flow_run(run.id), settings, block=False)
        return job_from_flow_run(client, client.read_flow_run(run.id), settings, details=False)


@dataclass(frozen=True)
class LogLine:
    """One log line of a job."""

    timestamp: datetime
    level: str
    message: str
    logger: str


_LEVELS = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}


def logs(job_id: str, *, follow: bool = False, settings: Settings | None = None) -> Iterator[LogLine]:
    """The job's log lines in order; with ``follow``, keeps reading until the job is final."""
    settings = settings or get_settings()
    with prefect_client(settings) as client:
        run = _read_run(client, job_id, settings)
        offset = 0
        while True:
            batch = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                sort=LogSort.TIMESTAMP_ASC,
                offset=offset,
                limit=200,
            )
            for entry in batch:
                yield LogLine(
                    timestamp=entry.timestamp,
                    level=_LEVELS.get(entry.level, str(entry.level)),
                    message=entry.message,
                    logger=entry.name,
                )
            offset += len(batch)
            if len(batch) == 200:
                continue
            if not follow:
                return
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                follow = False  # one more read picks up the lines written at the end
                continue
            time.sleep(_POLL_SECONDS)
