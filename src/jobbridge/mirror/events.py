"""Prefect flow-run state events, read as job state changes, and turned into mirror transitions.

Prefect emits one ``prefect.flow-run.<State name>`` event per state change, whether read live from the
websocket or later from ``POST /api/events/filter``; both give the same JSON. Only the state's labels on the
event's resource are used (type, name, message, timestamp, run count) plus the run's tags from its related
resources, so the truth is what the server recorded, and nothing depends on hooks in the flow's process.

The rest of the Job (name, type, parameters, org, ...) is the flow run's and does not change, so it is read
from the API once per run and cached; a final state reads the run again for its result and end time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import FlowRun, State, StateType

from jobbridge.control import job_from_flow_run
from jobbridge.jobs import Job, as_utc, status_from_prefect
from jobbridge.mirror.transition import Transition, sequence_for
from jobbridge.runtime import prefect_client
from jobbridge.settings import Settings

__all__ = ["EVENT_PREFIX", "JobBuilder", "StateChange"]

EVENT_PREFIX = "prefect.flow-run."
_RUN_RESOURCE = "prefect.flow-run."
_TAG_RESOURCE = "prefect.tag."


@dataclass(frozen=True)
class StateChange:
    """One flow run entering one state, as an event (or the reconciler) reported it."""

    run_id: str
    state_type: str
    state_name: str
    message: str
    timestamp: datetime
    run_count: int
    event_id: str
    tags: tuple[str, ...]

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> StateChange | None:
        """Read an event's JSON; None for events that are not a flow run's state change (heartbeats)."""
        resource = event.get("resource") or {}
        resource_id = str(resource.get("prefect.resource.id", ""))
        state_type = resource.get("prefect.state-type")
        stamp = resource.get("prefect.state-timestamp")
        if not resource_id.startswith(_RUN_RESOURCE) or not state_type or not stamp:
            return None
        tags = tuple(
            str(related["prefect.resource.id"]).removeprefix(_TAG_RESOURCE)
            for related in event.get("related") or []
            if related.get("prefect.resource.role") == "tag"
        )
        return cls(
            run_id=resource_id.removeprefix(_RUN_RESOURCE),
            state_type=str(state_type),
            state_name=str(resource.get("prefect.state-name") or ""),
            message=str(resource.get("prefect.state-message") or ""),
            timestamp=as_utc(datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))),
            run_count=int(resource.get("prefect.run-count") or 0),
            event_id=str(event.get("id") or ""),
            tags=tags,
        )

    @classmethod
    def from_run(cls, run: FlowRun) -> StateChange | None:
        """The run's current state, as the reconciler reads it from the API."""
        state = run.state
        if state is None or state.timestamp is None:
            return None
        return cls(
            run_id=str(run.id),
            state_type=state.type.value,
            state_name=state.name or "",
            message=state.message or "",
            timestamp=as_utc(state.timestamp),
            run_count=run.run_count,
            event_id=f"reconcile:{state.id}",
            tags=tuple(run.tags),
        )

    @property
    def is_final(self) -> bool:
        """True for a state the run cannot leave (except by a retry of the whole run)."""
        return status_from_prefect(self.state_type, self.state_name).is_final


class JobBuilder:
    """Builds the Job a state change leaves behind, reading each flow run from the API once."""

    def __init__(self, settings: Settings, cache_size: int = 10_000) -> None:
        self.settings = settings
        self._runs: OrderedDict[str, FlowRun] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def is_ours(self, change: StateChange) -> bool:
        """True for runs jobbridge submitted (in this mode): they carry its tag."""
        return self.settings.tag_prefix in change.tags

    def transition(self, change: StateChange) -> Transition:
        """The transition for ``change``: the job in that state, sequenced by the state's timestamp."""
        run = self._run(change.run_id, fresh=change.is_final)
        state = State(
            type=StateType(change.state_type),
            name=change.state_name,
            message=change.message,
            timestamp=change.timestamp,
        )
        updates: dict[str, Any] = {"state": state, "run_count": max(run.run_count, change.run_count)}
        if change.state_type == StateType.RUNNING.value and run.start_time is None:
            updates["start_time"] = change.timestamp
        if change.is_final and run.end_time is None:
            updates["end_time"] = change.timestamp
        as_of = run.model_copy(update=updates)
        with prefect_client(self.settings) as client:
            job: Job = job_from_flow_run(client, as_of, self.settings, details=change.is_final)
        if change.state_type == StateType.RUNNING.value:
            self._remember(as_of)
        return Transition.of(job, change.timestamp, event_id=change.event_id or None)

    def forget(self, run_id: str) -> None:
        """Drop a run from the cache (its job is final)."""
        with self._lock:
            self._runs.pop(run_id, None)

    def _run(self, run_id: str, *, fresh: bool) -> FlowRun:
        with self._lock:
            cached = self._runs.get(run_id)
        if cached is not None and not fresh:
            return cached
        with prefect_client(self.settings) as client:
            run = client.read_flow_run(UUID(run_id))
        self._remember(run)
        return run

    def _remember(self, run: FlowRun) -> None:
        with self._lock:
            self._runs[str(run.id)] = run
            self._runs.move_to_end(str(run.id))
            while len(self._runs) > self._cache_size:
                self._runs.popitem(last=False)


def sequence_of(change: StateChange) -> int:
    """The transition sequence a change gets (the same whether it came from an event or the API)."""
    return sequence_for(change.timestamp)
