"""Job types that exist only for the tests, loaded as a plugin (JOBBRIDGE_PLUGINS) by tests and workers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict

from jobbridge.registry import job_type


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = 60.0
    pid_file: str | None = None


@job_type("test-sleep", parameters=SleepParams)
@flow(name="test-sleep")
def test_sleep(seconds: float = 60.0, pid_file: str | None = None) -> dict[str, int]:
    """Write this process's pid to ``pid_file``, then wait ``seconds`` (something to cancel)."""
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    get_run_logger().info("sleeping %s s in pid %s", seconds, os.getpid())
    threading.Event().wait(seconds)
    return {"pid": os.getpid()}


class FlakyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    marker: str


@job_type("test-flaky", parameters=FlakyParams)
@flow(name="test-flaky")
def test_flaky(marker: str) -> dict[str, str]:
    """Fail until the file ``marker`` exists (something to retry)."""
    if not Path(marker).exists():
        raise RuntimeError(f"marker {marker} is missing")
    get_run_logger().info("marker found")
    return {"marker": marker}


class NoopParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 0


@job_type("test-noop", parameters=NoopParams)
@flow(name="test-noop")
def test_noop(value: int = 0) -> dict[str, float]:
    """Return at once (latency measurements)."""
    return {"value": value, "at": time.time()}
