"""The mirror service (``jobbridge mirror run``): Prefect's state changes into every mirror target.

Pipeline, each stage decoupled by durable or bounded queues so that a slow or dead store stops nothing
but its own deliveries:

1. *intake*: flow-run events from Prefect (REST catch-up from the durable cursor, then the live
   websocket) and the reconciler's reads of open jobs become :class:`~jobbridge.mirror.events.StateChange`
   objects, then Jobs (:class:`~jobbridge.mirror.events.JobBuilder`), then transitions;
2. *outbox*: each transition is offered to the :class:`~jobbridge.mirror.outbox.Outbox`, which drops
   duplicates and status-less changes and queues one row per target whose layout applies to the job,
   in one SQLite transaction (nothing accepted is lost if the service dies right after);
3. *delivery*: per target, ``lanes`` threads each deliver the rows of the jobs hashed to them in queue
   order (so one job's transitions reach a store in order while other jobs go in parallel); a store that
   cannot be reached keeps its rows and is retried with capped exponential backoff, a job the layout can
   never hold is recorded as rejected and skipped.

Writes are conditional on the transition's sequence inside each target, so the whole pipeline may deliver
a transition twice (after a crash between the store's write and the outbox's delete) without effect.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from prefect.exceptions import ObjectNotFound

from jobbridge.errors import JobbridgeError
from jobbridge.jobs import utcnow
from jobbridge.mirror.events import JobBuilder, StateChange
from jobbridge.mirror.outbox import Delivery, Outbox, Verdict
from jobbridge.mirror.reconcile import Reconciler
from jobbridge.mirror.stream import catch_up, follow, overlap_since
from jobbridge.mirror.target import MirrorEncodeError, MirrorTarget, layouts_for
from jobbridge.mirror.transition import Transition
from jobbridge.runtime import resolve_api_url
from jobbridge.settings import Settings, get_settings

__all__ = ["MirrorService", "build_service", "heartbeat_problem", "main", "mirror_status", "outbox_path"]

log = logging.getLogger("jobbridge.mirror")

#: How far behind the newest event the stored cursor stays: events arrive out of order.
CURSOR_OVERLAP = timedelta(minutes=2)
#: Where a first start (no cursor yet) catches up from.
FIRST_CATCH_UP = timedelta(hours=1)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.2, 5.0
HEARTBEAT = "heartbeat"
HEARTBEAT_SECONDS = 1.0
_BATCH = 50


def outbox_path(settings: Settings) -> Any:
    """The outbox file of this mode (TEST mode keeps its own)."""
    return settings.state_dir / "mirror" / f"{settings.namespaced('outbox')}.sqlite3"


class MirrorService:
    """Intake, outbox and delivery for a fixed set of targets; see the module docstring."""

    def __init__(
        self,
        targets: Sequence[MirrorTarget],
        *,
        settings: Settings | None = None,
        outbox: Outbox | None = None,
        lanes: int = 4,
    ) -> None:
        self.settings = settings or get_settings()
        names = [target.name for target in targets]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise JobbridgeError(f"mirror targets must have unique names; repeated: {', '.join(duplicates)}")
        self.targets = {target.name: target for target in targets}
        self.outbox = outbox or Outbox(outbox_path(self.settings))
        self.lanes = lanes
        self.builder = JobBuilder(self.settings)
        self.reconciler = Reconciler(self.settings, self.accept)
        self.stop_event = threading.Event()
        self._wake = {(name, lane): threading.Event() for name in self.targets for lane in range(lanes)}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10_000)
        self._threads: list[threading.Thread] = []
        self._newest_event: str | None = None

    # -- intake ---------------------------------------------------------------------------------------

    def accept(self, change: StateChange) -> str | None:
        """Turn a state change of one of our runs into a transition and offer it; None if not ours."""
        if not self.targets or not self.builder.is_ours(change):
            return None  # no target to write to: skip the API reads that building the job takes
        transition = self.builder.transition(change)
        if transition.is_final:
            self.builder.forget(change.run_id)
        return self.offer(transition)

    def offer(self, transition: Transition) -> str:
        """Queue a transition for every target whose layout applies to its job; wake their lanes."""
        layouts = layouts_for(transition.job, self.settings.mirror_layouts)
        lane = zlib.crc32(transition.job.id.encode()) % self.lanes
        chosen = [name for name, target in self.targets.items() if target.layout in layouts]
        verdict = self.outbox.offer(transition, [(name, lane) for name in chosen])
        if verdict in (Verdict.CURRENT, Verdict.HISTORY):
            for name in chosen:
                self._wake[name, lane].set()
        return verdict

    def _on_event(self, event: dict[str, Any]) -> None:
        self._events.put(event)

    def _intake_loop(self) -> None:
        """Turn queued events into transitions (API reads happen here, off the websocket's loop)."""
        last_cursor_write = 0.0
        while not self.stop_event.is_set():
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._accept_event(event)
            if time.monotonic() - last_cursor_write > 1.0:
                self._save_cursor()
                last_cursor_write = time.monotonic()
        self._save_cursor()

    def _accept_event(self, event: dict[str, Any]) -> None:
        change = StateChange.from_event(event)
        occurred = str(event.get("occurred") or "")
        if occurred and (self._newest_event is None or occurred > self._newest_event):
            self._newest_event = occurred
        if change is None:
            return
        for attempt in range(5):
            try:
                self.accept(change)
                return
            except JobbridgeError as exc:  # Prefect unreachable: it will come back; wait a little
                log.warning("event %s of run %s: %s", change.event_id, change.run_id, exc)
                if self.stop_event.wait(min(_BACKOFF_MAX, _BACKOFF_FIRST * 2**attempt)):
                    return
            except ObjectNotFound:
                log.warning("run %s was deleted before event %s was mirrored", change.run_id, change.event_id)
                return
            except Exception:
                log.exception("event %s of run %s could not be mirrored", change.event_id, change.run_id)
                return
        log.error(
            "gave up on event %s of run %s; the reconciler will catch up", change.event_id, change.run_id
        )

    def _save_cursor(self) -> None:
        if self._newest_event is None:
            return
        from datetime import datetime

        newest = datetime.fromisoformat(self._newest_event.replace("Z", "+00:00"))
        stored = self.outbox.cursor()
        candidate = (newest - CURSOR_OVERLAP).isoformat()
        if stored is None or candidate > stored:
            self.outbox.set_cursor(candidate)

    def catch_up(self) -> int:
        """Read every event since the durable cursor through the REST API; returns how many."""
        since = overlap_since(self.outbox.cursor(), FIRST_CATCH_UP)
        count = 0
        api_url = resolve_api_url(self.settings)
        if api_url is None:
            raise JobbridgeError("no Prefect API to read events from: set PREFECT_API_URL or start the stack")
        for event in catch_up(api_url, since, utcnow() + timedelta(minutes=1)):
            self._accept_event(event)
            count += 1
        self._save_cursor()
        return count

    # -- delivery -------------------------------------------------------------------------------------

    def deliver_once(self, target_name: str, lane: int) -> int:
        """Deliver what is pending in one lane, in order; stops at the first failure. Returns delivered."""
        target = self.targets[target_name]
        done = 0
        for delivery in self.outbox.pending(target_name, lane, _BATCH):
            if not self._deliver(target, delivery):
                raise _StoreDown
            done += 1
        return done

    def _deliver(self, target: MirrorTarget, delivery: Delivery) -> bool:
        try:
            written = target.apply(delivery.transition)
        except MirrorEncodeError as exc:
            log.warning("%s cannot hold job %s: %s", target.name, delivery.transition.job.id, exc)
            self.outbox.rejected(delivery, str(exc))
            return True
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if delivery.attempts == 0:
                log.warning("%s is unavailable (%s); changes wait in the outbox", target.name, message)
            self.outbox.failed(delivery, message)
            self._reensure(target)
            return False
        lag = (utcnow() - delivery.transition.occurred).total_seconds()
        self.outbox.delivered(delivery, written=written, lag=lag)
        return True

    @staticmethod
    def _reensure(target: MirrorTarget) -> None:
        """A store that came back empty (a restarted in-memory server) needs its tables again."""
        try:
            target.ensure()
        except Exception as exc:
            log.debug("%s: ensure failed again: %s", target.name, exc)

    def _lane_loop(self, target_name: str, lane: int) -> None:
        backoff = 0.0
        wake = self._wake[target_name, lane]
        while not self.stop_event.is_set():
            wake.clear()
            try:
                done = self.deliver_once(target_name, lane)
                backoff = 0.0
            except _StoreDown:
                backoff = min(_BACKOFF_MAX, max(_BACKOFF_FIRST, backoff * 2))
                self.stop_event.wait(backoff)
                continue
            except Exception:
                log.exception("delivery to %s failed unexpectedly", target_name)
                self.stop_event.wait(_BACKOFF_MAX)
                continue
            if done < _BATCH:
                wake.wait(1.0)

    # -- lifecycle ------------------------------------------------------------------------------------

    def ensure_targets(self) -> None:
        """Create every target's tables and indexes; a store that is down is retried by its lanes."""
        for target in self.targets.values():
            try:
                target.ensure()
            except Exception as exc:
                log.warning("%s: cannot prepare it yet (%s: %s)", target.name, type(exc).__name__, exc)

    def start(self) -> None:
        """Start delivery, intake, the event stream and the reconciler in background threads."""
        self.ensure_targets()
        for name in self.targets:
            for lane in range(self.lanes):
                self._spawn(f"deliver-{name}-{lane}", self._lane_loop, name, lane)
        self._spawn("catch-up", self._catch_up_then_follow)
        self._spawn("intake", self._intake_loop)
        self._spawn("reconcile", self._reconcile_loop)
        self._spawn("heartbeat", self._heartbeat_loop)

    def _heartbeat_loop(self) -> None:
        """Tell ``stack status`` (through the outbox file) that the service is alive."""
        while not self.stop_event.is_set():
            self.outbox.set_cursor(f"{time.time():.3f}", name=HEARTBEAT)
            self.stop_event.wait(HEARTBEAT_SECONDS)

    def _catch_up_then_follow(self) -> None:
        while not self.stop_event.is_set():
            try:
                log.info("caught up on %d events", self.catch_up())
                break
            except Exception as exc:
                log.warning("catch-up failed (%s: %s); retrying", type(exc).__name__, exc)
                self.stop_event.wait(_BACKOFF_MAX)
        follow(self._on_event, self.stop_event)

    def _reconcile_loop(self) -> None:
        started = False
        while not self.stop_event.wait(0 if not started else self.settings.mirror_reconcile_seconds):
            try:
                if not started:
                    for run in self.reconciler.open_runs():
                        change = StateChange.from_run(run)
                        if change is not None:
                            self.accept(change)
                    started = True
                self.reconciler.reconcile(job_id for job_id, _, _ in self.outbox.open_jobs())
                self.outbox.prune()
            except Exception as exc:
                log.warning("reconciliation failed (%s: %s); next try soon", type(exc).__name__, exc)

    def _spawn(self, name: str, function: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=function, args=args, name=f"mirror-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread (pending rows stay in the outbox for the next start)."""
        self.stop_event.set()
        for event in self._wake.values():
            event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM; stop cleanly."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop_event.set())
        self.start()
        log.info("mirroring into %s", ", ".join(self.targets))
        self.stop_event.wait()
        self.stop()


def heartbeat_problem(settings: Settings, since: float) -> str | None:
    """None when a mirror service wrote its heartbeat after ``since`` and recently, else what is wrong."""
    path = outbox_path(settings)
    if not path.exists():
        return f"no outbox at {path} yet"
    beat = Outbox(path).cursor(HEARTBEAT)
    if beat is None or float(beat) < since - 2.0:
        return "the mirror service has not reported since it started"
    age = time.time() - float(beat)
    if age > 10 * HEARTBEAT_SECONDS:
        return f"the mirror service's last heartbeat is {age:.0f} s old"
    return None


def mirror_status(settings: Settings) -> dict[str, Any]:
    """What ``jobbridge mirror status`` shows: per target depth, lag and last error; the service's state."""
    from dataclasses import asdict

    path = outbox_path(settings)
    if not path.exists():
        raise JobbridgeError(
            f"no mirror has run here yet ({path} does not exist): start one with `jobbridge stack up` "
            "or `jobbridge mirror run`"
        )
    status = Outbox(path).status()
    problem = heartbeat_problem(settings, 0.0)
    return {
        "targets": [asdict(target) for target in status.targets],
        "open_jobs": status.open_jobs,
        "cursor": status.cursor,
        "running": problem is None,
        "problem": problem,
        "outbox": str(path),
    }


class _StoreDown(Exception):
    """A delivery failed because its target is unavailable (internal)."""


def build_service(settings: Settings | None = None) -> MirrorService:
    """The service for the configured targets (saved blocks, or settings)."""
    from jobbridge.blocks import mirror_targets

    chosen = settings or get_settings()
    return MirrorService(mirror_targets(chosen), settings=chosen)


def main(argv: list[str] | None = None) -> int:
    """``python -m jobbridge.mirror.service``: run the mirror until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_service().run_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
