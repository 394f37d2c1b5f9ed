"""How a running job reports progress and its result, through Prefect artifacts.

Progress is one Prefect *progress* artifact per flow run (the UI shows it; ``get_job`` reads it back as
``Job.progress``), updated at most every ``progress_interval_seconds`` so a job over millions of small files
does not flood the API. The result is a *result* artifact whose ``data`` is the job's JSON result, so a
failed job (e.g. a validation that found differences) still carries its result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.context import FlowRunContext

from jobbridge.settings import get_settings

RESULT_ARTIFACT_TYPE = "result"
ProgressCallback = Callable[[int], None]


def start_progress(description: str) -> UUID:
    """Create the flow run's progress artifact at 0 %; returns its id for the tasks to update."""
    artifact_id = create_progress_artifact(progress=0.0, description=description)
    assert isinstance(artifact_id, UUID)  # the sync call returns the id, not a coroutine
    return artifact_id


def _human_bytes(amount: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(amount) < 1024 or unit == "TB":
            return f"{amount:.1f} {unit}" if unit != "B" else f"{int(amount)} B"
        amount /= 1024
    return f"{amount:.1f} TB"  # pragma: no cover - loop always returns


class Progress:
    """Counts work done towards a known total and maps it onto a span of the job's 0-100 %.

    A flow with several phases gives each phase its own span (say scanning 0-5 %, copying 5-100 %).
    Thread-safe: tasks running on a thread pool may share one instance.
    """

    def __init__(
        self,
        artifact_id: UUID | None,
        total: int,
        *,
        unit: str = "bytes",
        low: float = 0.0,
        high: float = 100.0,
        interval: float | None = None,
    ) -> None:
        self.artifact_id = artifact_id
        self.total = max(total, 0)
        self.unit = unit
        self.low, self.high = low, high
        self.interval = get_settings().progress_interval_seconds if interval is None else interval
        self.done = 0
        self._started = time.monotonic()
        self._last_sent = 0.0
        self._lock = threading.Lock()

    @property
    def percent(self) -> float:
        """Progress of the whole job, in percent."""
        fraction = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        return self.low + (self.high - self.low) * fraction

    def describe(self) -> str:
        """``12.0 MB / 40.0 MB, 80.1 MB/s, ETA 0 s``: what the UI shows beside the bar."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        remaining = max(self.total - self.done, 0)
        eta = f"ETA {remaining / rate:.0f} s" if rate > 0 else "ETA unknown"
        if self.unit == "bytes":
            return f"{_human_bytes(self.done)} / {_human_bytes(self.total)}, {_human_bytes(rate)}/s, {eta}"
        return f"{self.done} / {self.total} {self.unit}, {rate:.1f} {self.unit}/s, {eta}"

    def advance(self, amount: int) -> None:
        """Add ``amount`` units of work done; sends an update when the interval has passed."""
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if now - self._last_sent < self.interval:
                return
            self._last_sent = now
        self._send()

    def callback(self) -> ProgressCallback:
        """``advance`` as a plain callable, for the pure file functions."""
        return self.advance

    def finish(self) -> None:
        """Mark this span complete and send it now, whatever the interval."""
        with self._lock:
            self.done = max(self.done, self.total)
        self._send()

    def _send(self) -> None:
        if self.artifact_id is None:
            return
        update_progress_artifact(
            self.artifact_id, progress=round(self.percent, 2), description=self.describe()
        )


def record_result(result: dict[str, Any], summary: str) -> None:
    """Attach the job's JSON result to its flow run (read back as ``Job.result``)."""
    context = FlowRunContext.get()
    flow_run_id = context.flow_run.id if context and context.flow_run else None
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                type=RESULT_ARTIFACT_TYPE,
                data=result,
                description=summary,
                flow_run_id=flow_run_id,
            )
        )
