"""Job types for the benchmarks, loaded as a plugin (JOBBRIDGE_PLUGINS=bench_jobs) by bench and worker."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from jobbridge.registry import job_type


class NoopParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 0


def noop_body(value: int) -> dict[str, int]:
    """The body both the jobbridge job and the bare Prefect flow run."""
    return {"value": value + 1}


@job_type("bench-noop", parameters=NoopParams)
@flow(name="bench-noop")
def bench_noop(value: int = 0) -> dict[str, int]:
    """A job that does nothing: what is left is jobbridge's and Prefect's overhead."""
    return noop_body(value)


@flow(name="bare-noop")
def bare_noop(value: int = 0) -> dict[str, int]:
    """The same body as a plain Prefect flow, the baseline."""
    return noop_body(value)
