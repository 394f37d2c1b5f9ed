"""Deployments and the work pool they run on.

Each job type's flow has one deployment, ``<type>/jobbridge`` (``<type>/test_jobbridge`` in TEST mode), in
the ``local`` process pool. The pool has one work queue per priority (``priority-1`` .. ``priority-3``, with
Prefect queue priorities 1..3), because a worker drains a higher-priority queue first: that is how a job's
priority reaches Prefect, which has no per-run priority (Prefect #22563).

Entrypoints are module paths (``jobbridge.flows.extract:extract``), so a worker imports the installed
package instead of a copy of its source: no pull step, no storage block.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.utilities.callables import parameter_schema
from prefect.workers.process import ProcessWorker

from jobbridge.registry import JobTypeSpec, get_spec, known_types
from jobbridge.settings import Settings

PRIORITY_QUEUES: dict[int, str] = {1: "priority-1", 2: "priority-2", 3: "priority-3"}
WORK_POOL_TYPE = "process"


def queue_for_priority(priority: int) -> str:
    """The work queue that carries jobs of ``priority`` (1 high .. 3 low)."""
    return PRIORITY_QUEUES[priority]


def ensure_work_pool(settings: Settings, api_url: str | None = None) -> None:
    """Create the process work pool and its priority queues if they are missing (idempotent)."""
    from jobbridge.runtime import prefect_api

    with prefect_api(settings, api_url), get_client(sync_client=True) as client:
        create_work_pool(client, settings)


def create_work_pool(client: SyncPrefectClient, settings: Settings) -> None:
    """Create the work pool and its priority queues through ``client`` where they are missing."""
    try:
        client.read_work_pool(settings.work_pool)
    except ObjectNotFound:
        with suppress(ObjectAlreadyExists):
            client.create_work_pool(
                WorkPoolCreate(
                    name=settings.work_pool,
                    type=WORK_POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="jobbridge jobs run here (one process per job).",
                )
            )
    existing = {queue.name for queue in client.read_work_queues(work_pool_name=settings.work_pool)}
    for priority, name in PRIORITY_QUEUES.items():
        if name in existing:
            continue
        with suppress(ObjectAlreadyExists):
            client.create_work_queue(
                name=name,
                priority=priority,
                work_pool_name=settings.work_pool,
                description=f"jobbridge jobs of priority {priority} (1 is drained first)",
            )


_deployment_ids: dict[tuple[str, str, str, str, str], UUID] = {}


def ensure_deployment(client: SyncPrefectClient, spec: JobTypeSpec, settings: Settings) -> UUID:
    """The id of ``spec``'s deployment, created or updated on first use in this process."""
    api_url = str(client.api_url)
    key = (api_url, spec.name, settings.deployment_name, settings.work_pool, spec.entrypoint)
    if key in _deployment_ids:
        return _deployment_ids[key]
    flow_id = client.create_flow(spec.flow)
    deployment_id = client.create_deployment(
        flow_id=flow_id,
        name=settings.deployment_name,
        description=spec.description or f"jobbridge job type '{spec.name}'",
        work_pool_name=settings.work_pool,
        work_queue_name=queue_for_priority(2),
        entrypoint=spec.entrypoint,
        parameter_openapi_schema=parameter_schema(spec.flow.fn).model_dump_for_openapi(),
        enforce_parameter_schema=False,
        tags=[settings.tag_prefix, f"{settings.tag_prefix}:type:{spec.name}"],
        job_variables=_default_job_variables(settings),
    )
    _deployment_ids[key] = deployment_id
    return deployment_id


def _default_job_variables(settings: Settings) -> dict[str, Any]:
    from jobbridge.modes import job_environment

    return {"env": job_environment(settings)}


def ensure_deployments(settings: Settings, api_url: str | None = None) -> dict[str, UUID]:
    """Create the work pool and a deployment for every registered job type (``stack up`` calls this)."""
    from jobbridge.runtime import prefect_api

    with prefect_api(settings, api_url), get_client(sync_client=True) as client:
        create_work_pool(client, settings)
        return {name: ensure_deployment(client, get_spec(name), settings) for name in known_types()}
