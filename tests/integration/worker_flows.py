"""Flows the worker integration tests deploy (entrypoints ``worker_flows:<name>``).

Kept tiny and dependency-free: they run inside the worker's flow-run processes, which import
this module from the deployment's ``path`` (copied into the run's workspace).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow


@flow(persist_result=True)
def double(x: int = 1) -> dict[str, int]:
    """Return something checkable plus the pid that ran it."""
    return {"value": x * 2, "pid": os.getpid()}


@flow(persist_result=True)
def sleepy(seconds: float = 120.0, marker: str | None = None) -> int:
    """Record this process's pid in ``marker``, then sleep (a run to cancel or kill)."""
    if marker:
        tmp = Path(marker).with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(marker)
    time.sleep(seconds)
    return os.getpid()


@flow(persist_result=True)
def env_probe() -> dict[str, object]:
    """Report what the run's process sees of the job's environment (job variables ``env``)."""
    from prefect.settings import get_current_settings

    return {
        "var": os.environ.get("JB_WORKER_TEST_VAR"),
        "default_retries": get_current_settings().tasks.default_retries,
        "pid": os.getpid(),
    }
