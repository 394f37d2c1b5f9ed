"""Periodic reconciliation: what the mirror believes about open jobs, checked against Prefect's API.

Events can be missed (the service was down longer than the server keeps replayable events, a websocket
dropped between pages), so every few seconds the reconciler reads each job the mirror still holds as not
final and offers its current state; the outbox drops it when it is already known.

It also sweeps *stale* runs, the case Prefect does not report by itself (#16746): a run RUNNING (or
CANCELLING) whose flow-run process is gone while its worker is gone too, e.g. the worker's machine was
killed. A run whose ``infrastructure_pid`` names this host (``{hostname}:{pid}``, as jobbridge's worker
writes it) and whose process has been missing for ``mirror_stale_seconds`` is set CRASHED in Prefect (the
truth), with a message that says why (a CANCELLING run gets a longer grace, then CANCELLED); the mirror
then follows the resulting event like any other.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from uuid import UUID

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import Cancelled, Crashed

from jobbridge.mirror.events import StateChange
from jobbridge.processes import local_pid_of
from jobbridge.runtime import prefect_client
from jobbridge.settings import Settings

__all__ = ["Reconciler"]

log = logging.getLogger("jobbridge.mirror")

_PAGE = 200
_OPEN_TYPES = [
    StateType.SCHEDULED,
    StateType.PENDING,
    StateType.RUNNING,
    StateType.PAUSED,
    StateType.CANCELLING,
]
_LIVE_TYPES = {StateType.RUNNING, StateType.CANCELLING}
#: A CANCELLING run's worker reports CANCELLED itself, seconds after the process exits (3-16 s seen under
#: load): the sweep leaves it that long before it steps in, and then ends it CANCELLED, as it was asked.
CANCELLING_GRACE_SECONDS = 60.0


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Reconciler:
    """Offers the API's current state of open jobs, and marks runs whose process died CRASHED."""

    def __init__(self, settings: Settings, offer: Callable[[StateChange], object]) -> None:
        self.settings = settings
        self.offer = offer
        self._missing_since: dict[str, float] = {}

    def open_runs(self) -> list[FlowRun]:
        """Every jobbridge run Prefect holds as not final (the start-up sweep: nothing escapes the mirror)."""
        runs: list[FlowRun] = []
        with prefect_client(self.settings) as client:
            while True:
                page = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=[self.settings.tag_prefix]),
                        state=dict(type=FlowRunFilterStateType(any_=_OPEN_TYPES)),  # type: ignore[arg-type]
                    ),
                    limit=_PAGE,
                    offset=len(runs),
                )
                runs.extend(page)
                if len(page) < _PAGE:
                    return runs

    def runs(self, run_ids: Iterable[str]) -> list[FlowRun]:
        """The flow runs with these ids (those that still exist), 200 per request."""
        ids = [UUID(run_id) for run_id in run_ids]
        found: list[FlowRun] = []
        with prefect_client(self.settings) as client:
            for start in range(0, len(ids), _PAGE):
                chunk = ids[start : start + _PAGE]
                found.extend(
                    client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=_PAGE
                    )
                )
        return found

    def reconcile(self, run_ids: Iterable[str]) -> int:
        """Offer the current state of each run; sweep the stale ones. Returns how many were offered."""
        offered = 0
        for run in self.runs(run_ids):
            change = StateChange.from_run(run)
            if change is None:
                continue
            self.offer(change)
            offered += 1
            self._sweep(run)
        return offered

    def _sweep(self, run: FlowRun) -> None:
        """Mark the run CRASHED once its local process has been gone for ``mirror_stale_seconds``."""
        key = str(run.id)
        state = run.state
        pid = local_pid_of(run.infrastructure_pid)
        if state is None or state.type not in _LIVE_TYPES or pid is None or _pid_exists(pid):
            self._missing_since.pop(key, None)
            return
        first_missing = self._missing_since.setdefault(key, time.monotonic())
        cancelling = state.type is StateType.CANCELLING
        grace = self.settings.mirror_stale_seconds
        if cancelling:
            grace = max(grace, CANCELLING_GRACE_SECONDS)
        if time.monotonic() - first_missing < grace:
            return
        message = (
            f"Flow run process {run.infrastructure_pid} is gone and no worker reported its end "
            f"(missing for over {grace:g} s); marked {'cancelled' if cancelling else 'crashed'} by "
            "jobbridge's mirror"
        )
        log.warning("run %s: %s", key, message)
        end: State = Cancelled(message=message) if cancelling else Crashed(message=message)
        with prefect_client(self.settings) as client:
            client.set_flow_run_state(run.id, end, force=True)
        self._missing_since.pop(key, None)
