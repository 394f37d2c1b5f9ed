"""Benchmark: the status mirror (issue 3), against a naive one-put-per-event writer in the same run.

Live part: ``--jobs`` (200) ``test-noop`` jobs are submitted at once (``control.submit`` from 8 threads,
while the work pool is paused, then released; the pool gets a concurrency limit of 2 and the worker 2 warm
processes) through the embedded stack's work pool. jobbridge's
:class:`~jobbridge.mirror.service.MirrorService` runs in this process (its own outbox file, fresh DynamoDB
table and Mongo collections, write-counting client wrappers), and beside it a naive writer with its own
subscription to Prefect's event stream does, per flow-run state event, one unconditional ``put_item`` and
one ``replace_one(upsert=True)`` of a record built from the event alone, into its own table and
collection. Reported per store: lag (store write returned - Prefect state timestamp) p50/p99/max over
every transition of the jobs, transitions delivered, write requests and writes per transition,
throughput per second of write time; and where our lag goes, stage by stage (event stream, intake
queue, job build with its API reads, outbox offer, lane wait, store write). The final state of both
stores is checked: every job COMPLETED with history QUEUED, RUNNING, COMPLETED.

Replay part (store-bound, no Prefect): the transitions captured above are written again into fresh
tables/collections, (a) through a fresh outbox and its delivery lanes, (b) by the targets' ``apply()``
directly from ``--lanes`` threads, (c) by the naive unconditional put from as many threads; transitions/s
per store, median of ``--rounds`` interleaved rounds, and the ratios.

The stack's own mirror service is started with no targets (JOBBRIDGE_MIRROR_DYNAMODB/MONGODB=false,
JOBBRIDGE_MIRROR_LAYOUTS={}) so that it writes nothing; note that its intake still reads each run from
the API. Run: ``.venv/bin/python bench/bench_mirror.py [--jobs 200]``. Starts its own embedded stack on
free ports in a temporary home and stops it at the end; writes bench/results/mirror.json. About 12 minutes
on 2 cores, nearly all of it Prefect on SQLite creating and running the 200 pool jobs (``--jobs 100``
halves that).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

DYNAMO_WRITES = {"put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item"}
MONGO_WRITES = {
    "insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one",
    "delete_many", "find_one_and_update", "find_one_and_replace", "bulk_write",
}  # fmt: skip
MONGO_DATABASE = "jobbridge_bench"
STORES = ("dynamodb", "mongodb")
LAG_TARGET_S = 2.0
STAGES = ("stream", "intake queue", "build (API reads)", "outbox offer", "lane wait", "store write")


# -------------------------------------------------------------------------------------- environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_environment(home: Path, warm: int) -> None:
    """Fix ports, homes, plugins and the stack mirror's (empty) targets before Prefect is imported."""
    port = _free_port()
    for key in ("AWS_ENDPOINT_URL", "JOBBRIDGE_AWS_ENDPOINT_URL", "JOBBRIDGE_MONGODB_URL", "JOBBRIDGE_MODE"):
        os.environ.pop(key, None)  # the benchmark writes to the stack's own moto and nx-27017
    os.environ.update(
        {
            "PREFECT_HOME": str(home / "prefect-client"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "JOBBRIDGE_HOME": str(home / "stack"),
            "JOBBRIDGE_PREFECT_PORT": str(port),
            "JOBBRIDGE_MOTO_PORT": str(_free_port()),
            "JOBBRIDGE_MONGO_PORT": str(_free_port()),
            "JOBBRIDGE_PLUGINS": "tests.support.jobs",
            "JOBBRIDGE_EXECUTION": "pool",
            "JOBBRIDGE_WORKER_WARM_PROCESSES": str(warm),
            "JOBBRIDGE_MIRROR_DYNAMODB": "false",
            "JOBBRIDGE_MIRROR_MONGODB": "false",
            "JOBBRIDGE_MIRROR_LAYOUTS": "{}",
            "JOBBRIDGE_MIRROR_BLOCKS": "",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        }
    )
    sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _epoch(stamp: Any) -> float:
    """Epoch seconds of a datetime or an ISO 8601 string."""
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def wait_until(what: str, check: Callable[[], bool], deadline_s: float, interval: float = 0.25) -> float:
    """Poll ``check`` until true; returns the seconds it took. Raises TimeoutError naming ``what``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > deadline_s:
            raise TimeoutError(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(interval)
    return time.monotonic() - started


# -------------------------------------------------------------------------------- counting wrappers


class Meter:
    """Counts and times the write requests of one store, in total and per thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.count = 0
        self.failed = 0
        self.seconds = 0.0
        self.durations: list[float] = []

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if not _is_condition_failure(exc):
                with self._lock:
                    self.failed += 1
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._local.count = self.thread_count() + 1
            with self._lock:
                self.count += 1
                self.seconds += elapsed
                self.durations.append(elapsed)

    def thread_count(self) -> int:
        """Write requests made so far by the calling thread (to count the writes of one apply())."""
        return int(getattr(self._local, "count", 0))


def _is_condition_failure(exc: Exception) -> bool:
    """A stale/duplicate write refused by the store's condition: an answer, not a failed request."""
    text = f"{type(exc).__name__} {exc}"
    return "ConditionalCheckFailed" in text or "E11000" in text or "duplicate key" in text


class CountingDynamo:
    """A boto3 DynamoDB client wrapper: counts and times write requests, forwards everything else."""

    def __init__(self, client: Any, meter: Meter) -> None:
        self._client = client
        self.meter = meter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name in DYNAMO_WRITES:
            return functools.partial(self.meter.call, attribute)
        return attribute


class _CountingProxy:
    def __init__(self, target: Any, meter: Meter) -> None:
        self._target = target
        self._meter = meter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name in MONGO_WRITES:
            return functools.partial(self._meter.call, attribute)
        return attribute


class CountingDatabase:
    """A pymongo Database wrapper counting write calls made on its collections and on its client."""

    def __init__(self, database: Any, meter: Meter) -> None:
        self._database = database
        self.meter = meter
        self.name = database.name
        self.client = _CountingProxy(database.client, meter)

    def __getitem__(self, name: str) -> _CountingProxy:
        return _CountingProxy(self._database[name], meter=self.meter)


@dataclass
class Applied:
    """One apply() of a target: which transition, when, and how many write requests it made."""

    job_id: str
    status: str
    seq: int
    event_id: str
    occurred: float
    started: float
    returned: float
    written: bool
    writes: int
    history_only: bool
    transition: Any = field(repr=False)

    @property
    def lag(self) -> float:
        return self.returned - self.occurred


class TimedTarget:
    """A mirror target that records each apply() (lag, write requests) and delegates to the real one."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter
        self.name = inner.name
        self.layout = inner.layout
        self.applied: list[Applied] = []
        self._lock = threading.Lock()

    def ensure(self) -> None:
        self.inner.ensure()

    def apply(self, transition: Any) -> bool:
        before = self.meter.thread_count()
        started = time.time()
        written = bool(self.inner.apply(transition))
        returned = time.time()
        record = Applied(
            job_id=transition.job.id,
            status=transition.job.status.value,
            seq=transition.seq,
            event_id=transition.event_id,
            occurred=transition.occurred.timestamp(),
            started=started,
            returned=returned,
            written=written,
            writes=self.meter.thread_count() - before,
            history_only=transition.history_only,
            transition=transition,
        )
        with self._lock:
            self.applied.append(record)
        return written

    def records(self) -> list[Applied]:
        with self._lock:
            return list(self.applied)


# ------------------------------------------------------------------------------------------- stores


class Stores:
    """Clients of the stack's moto_server and nx-27017, and fresh names for this run."""

    def __init__(self, settings: Any) -> None:
        import boto3
        from botocore.config import Config
        from pymongo import MongoClient

        self.dynamodb = boto3.client(
            "dynamodb",
            endpoint_url=settings.dynamodb_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(max_pool_connections=32, retries={"max_attempts": 2}),
        )
        self.mongo: Any = MongoClient(settings.mongodb_uri, serverSelectionTimeoutMS=10_000, maxPoolSize=32)
        self.database = self.mongo[MONGO_DATABASE]
        self.run_id = uuid.uuid4().hex[:8]

    def name(self, kind: str) -> str:
        return f"bench_{kind}_{self.run_id}"

    def ours(self, kind: str) -> dict[str, TimedTarget]:
        """Our two targets on fresh table/collections, wrapped to count and time their writes."""
        from jobbridge.mirror.dynamodb import DynamoDBJobStore
        from jobbridge.mirror.mongodb import MongoJobStore

        name = self.name(kind)
        dynamo_meter, mongo_meter = Meter(), Meter()
        dynamo = DynamoDBJobStore(CountingDynamo(self.dynamodb, dynamo_meter), f"{name}_jobs")
        mongo = MongoJobStore(CountingDatabase(self.database, mongo_meter), f"{name}_jobs", f"{name}_events")
        return {"dynamodb": TimedTarget(dynamo, dynamo_meter), "mongodb": TimedTarget(mongo, mongo_meter)}

    def naive_table(self, kind: str) -> tuple[CountingDynamo, str]:
        """A fresh one-key table for the naive writer (PK = job id), and a counting client."""
        table = f"{self.name(kind)}_naive"
        self.dynamodb.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        return CountingDynamo(self.dynamodb, Meter()), table

    def naive_collection(self, kind: str) -> _CountingProxy:
        return _CountingProxy(self.database[f"{self.name(kind)}_naive"], Meter())

    def close(self) -> None:
        self.mongo.close()


def naive_dynamo_put(client: CountingDynamo, table: str, job_id: str, fields: dict[str, str]) -> None:
    """The naive writer's one unconditional put of a job record."""
    item = {"PK": {"S": job_id}, **{key: {"S": value} for key, value in fields.items()}}
    client.put_item(TableName=table, Item=item)


def naive_mongo_put(collection: _CountingProxy, job_id: str, fields: dict[str, str]) -> None:
    """The naive writer's one unconditional upsert of a job document."""
    collection.replace_one({"_id": job_id}, {"_id": job_id, **fields}, upsert=True)


# ------------------------------------------------------------------------------------ naive writer


@dataclass
class NaiveWrite:
    job_id: str
    state: str
    occurred: float
    dynamodb_returned: float
    mongodb_returned: float
    dynamodb_seconds: float
    mongodb_seconds: float


class NaiveWriter:
    """Its own subscription to Prefect's flow-run events; one unconditional put per event per store."""

    def __init__(self, stores: Stores) -> None:
        self.dynamodb, self.table = stores.naive_table("live")
        self.collection = stores.naive_collection("live")
        self.writes: list[NaiveWrite] = []
        self.events = 0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="naive-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._follow())
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.ready.set()

    async def _follow(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        event_filter = EventFilter(event=EventNameFilter(prefix=["prefect.flow-run."]))  # type: ignore[call-arg]
        async with get_events_subscriber(filter=event_filter, reconnect_on_clean_close=True) as events:
            self.ready.set()
            iterator = events.__aiter__()
            while not self.stop.is_set():
                try:
                    event = await asyncio.wait_for(iterator.__anext__(), timeout=0.5)
                except TimeoutError:
                    continue
                self.write(event)

    def write(self, event: Any) -> None:
        """One put per store, in this (the websocket's) thread, as a simple writer would."""
        self.events += 1
        resource = event.resource
        state_type = resource.get("prefect.state-type")
        if not state_type:  # heartbeats and other non-state events carry no state
            return
        job_id = resource.id.removeprefix("prefect.flow-run.")
        stamp = resource.get("prefect.state-timestamp") or event.occurred.isoformat()
        fields = {
            "status": str(state_type),
            "state": str(resource.get("prefect.state-name") or ""),
            "updated_at": str(stamp),
            "event_id": str(event.id),
        }
        started = time.time()
        naive_dynamo_put(self.dynamodb, self.table, job_id, fields)
        dynamodb_returned = time.time()
        naive_mongo_put(self.collection, job_id, fields)
        mongodb_returned = time.time()
        self.writes.append(
            NaiveWrite(
                job_id=job_id,
                state=fields["state"],
                occurred=_epoch(stamp),
                dynamodb_returned=dynamodb_returned,
                mongodb_returned=mongodb_returned,
                dynamodb_seconds=dynamodb_returned - started,
                mongodb_seconds=mongodb_returned - dynamodb_returned,
            )
        )


# --------------------------------------------------------------------------------- our mirror, live


class StageProbe:
    """Timestamps of each event's way through one MirrorService instance (wraps its own methods)."""

    def __init__(self, service: Any) -> None:
        self.received: dict[str, float] = {}
        self.intake: dict[str, float] = {}
        self.offer_start: dict[str, float] = {}
        self.offer_end: dict[str, float] = {}
        self.verdicts: dict[str, str] = {}
        self.following = threading.Event()
        on_event, accept_event, offer = service._on_event, service._accept_event, service.offer

        def probed_on_event(event: dict[str, Any]) -> None:
            self.received.setdefault(str(event.get("id") or ""), time.time())
            on_event(event)

        def probed_accept_event(event: dict[str, Any]) -> None:
            self.intake.setdefault(str(event.get("id") or ""), time.time())
            accept_event(event)

        def probed_offer(transition: Any) -> str:
            self.offer_start[transition.event_id] = time.time()
            verdict: str = offer(transition)
            self.offer_end[transition.event_id] = time.time()
            self.verdicts[transition.event_id] = verdict
            return verdict

        service._on_event = probed_on_event
        service._accept_event = probed_accept_event
        service.offer = probed_offer
        probe = self

        class _Following(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "following Prefect's event stream" in record.getMessage():
                    probe.following.set()

        logger = logging.getLogger("jobbridge.mirror")
        logger.setLevel(logging.INFO)
        logger.addHandler(_Following())

    def stages(self, record: Applied) -> dict[str, float] | None:
        """Seconds spent in each stage by one delivered transition; None when it came from the reconciler."""
        key = record.event_id
        if key not in self.received or key not in self.intake or key not in self.offer_end:
            return None
        return {
            "stream": self.received[key] - record.occurred,
            "intake queue": self.intake[key] - self.received[key],
            "build (API reads)": self.offer_start[key] - self.intake[key],
            "outbox offer": self.offer_end[key] - self.offer_start[key],
            "lane wait": record.started - self.offer_end[key],
            "store write": record.returned - record.started,
        }


def submit_jobs(count: int, threads: int) -> tuple[list[Any], float, list[str]]:
    """Submit ``count`` test-noop jobs at once from ``threads`` threads; returns (jobs, seconds, retries)."""
    from jobbridge import control
    from jobbridge.jobs import Job

    done = [0]
    lock = threading.Lock()
    retries: list[str] = []

    run_key = uuid.uuid4().hex[:8]

    def one(index: int) -> Any:
        job = Job(name=f"mirror-bench-{index}", type="test-noop", parameters={"value": index})
        for attempt in range(6):
            try:  # the same idempotency key on a retry: a run the server did create is not made twice
                job = control.submit(job, idempotency_key=f"mirror-bench-{run_key}-{index}")
                break
            except Exception as exc:  # Prefect on SQLite answers 503 "database is locked" under load
                if attempt == 5:
                    raise
                with lock:
                    retries.append(f"job {index}: {type(exc).__name__}: {str(exc)[:120]}")
                time.sleep(min(10.0, 0.5 * 2**attempt))
        with lock:
            done[0] += 1
            if done[0] % 25 == 0:
                print(
                    f"  submitted {done[0]}/{count} after {time.perf_counter() - started:.1f} s", flush=True
                )
        return job

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        jobs = list(pool.map(one, range(count)))
    return jobs, time.perf_counter() - started, retries


def _pause_pool(pool: str, paused: bool, limit: int | None) -> None:
    """Pause the work pool while the jobs are created (so all are queued at once); cap its concurrency.

    Why: creating flow runs while the worker runs others makes Prefect's SQLite answer "database is
    locked" (503) after its 60 s busy timeout, and a worker that claims 200 released runs at once has
    them CRASHED by the same 503 ("Failed to submit flow run to infrastructure"); a pool concurrency
    limit keeps the worker to a few runs at a time.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    with get_client(sync_client=True) as client:
        client.update_work_pool(pool, WorkPoolUpdate(is_paused=paused, concurrency_limit=limit))


def wait_completed_in_prefect(job_ids: list[str], deadline_s: float) -> dict[str, Any]:
    """Poll Prefect until every job is final; returns run id -> flow run. Non-COMPLETED ones are reported."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: dict[str, Any] = {}
    ids = [UUID(job_id) for job_id in job_ids]

    last_print = [time.monotonic()]

    def all_final() -> bool:
        if time.monotonic() - last_print[0] > 15:
            final = sum(1 for run in runs.values() if run.state and run.state.is_final())
            print(f"  {final}/{len(ids)} final in Prefect", flush=True)
            last_print[0] = time.monotonic()
        with get_client(sync_client=True) as client:
            for start in range(0, len(ids), 200):
                chunk = ids[start : start + 200]
                for run in client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=200
                ):
                    runs[str(run.id)] = run
        return len(runs) == len(ids) and all(run.state and run.state.is_final() for run in runs.values())

    wait_until(f"{len(ids)} jobs final in Prefect", all_final, deadline_s, interval=1.0)
    return runs


def run_live(args: argparse.Namespace, settings: Any, stores: Stores, home: Path) -> dict[str, Any]:
    """The live part: submit, follow with ours and the naive writer, wait, measure, verify."""
    from jobbridge.mirror.outbox import Outbox
    from jobbridge.mirror.service import MirrorService

    targets = stores.ours("live")
    service = MirrorService(
        list(targets.values()),
        settings=settings,
        outbox=Outbox(home / "bench-outbox.sqlite3"),
        lanes=args.lanes,
    )
    probe = StageProbe(service)
    naive = NaiveWriter(stores)
    naive.start()
    service.start()
    try:
        wait_until("the naive writer's subscription", naive.ready.is_set, 60)
        if naive.error is not None:
            raise RuntimeError(f"naive writer failed: {naive.error!r}")
        wait_until("our mirror to follow the event stream", probe.following.is_set, 60)

        limit = args.pool_limit or None
        _pause_pool(settings.work_pool, not args.no_pause, limit)
        try:
            jobs, submit_s, submit_retries = submit_jobs(args.jobs, args.submit_threads)
        finally:
            _pause_pool(settings.work_pool, False, limit)
        print(
            f"submitted {len(jobs)} jobs in {submit_s:.1f} s from {args.submit_threads} threads", flush=True
        )
        job_ids = [job.id for job in jobs]
        wanted = set(job_ids)
        waited = time.perf_counter()
        runs = wait_completed_in_prefect(job_ids, args.deadline)
        not_completed = {i: r.state.type.value for i, r in runs.items() if r.state.type.value != "COMPLETED"}
        prefect_wait = time.perf_counter() - waited
        print(
            f"all final in Prefect {prefect_wait:.1f} s after the last submit; "
            f"not COMPLETED: {len(not_completed)}",
            flush=True,
        )

        def ours_done() -> bool:
            for target in targets.values():
                finals = {
                    r.job_id for r in target.records() if r.status == "COMPLETED" and r.job_id in wanted
                }
                if len(finals) < len(wanted - set(not_completed)):
                    return False
            depth = sum(t.depth for t in service.outbox.status(list(targets)).targets)
            return depth == 0

        def naive_done() -> bool:
            finals = {w.job_id for w in list(naive.writes) if w.state == "Completed" and w.job_id in wanted}
            return len(finals) >= len(wanted - set(not_completed))

        ours_wait = wait_until("our mirror to deliver every transition", ours_done, 120)
        naive_wait = wait_until("the naive writer to see every Completed event", naive_done, 120)
    finally:
        service.stop()
        naive.close()
    outbox_status = {t.target: t for t in service.outbox.status(list(targets)).targets}
    result: dict[str, Any] = {
        "jobs": len(jobs),
        "submit_s": submit_s,
        "submit_retries": submit_retries,
        "prefect_wait_s": prefect_wait,
        "not_completed": not_completed,
        "ours_extra_wait_s": ours_wait,
        "naive_extra_wait_s": naive_wait,
        "prefect_span_s": _prefect_span(runs),
        "ours": {},
        "naive": {},
    }
    for store, target in targets.items():
        records = [r for r in target.records() if r.job_id in wanted]
        written = [r for r in records if r.written]
        lags = [r.lag for r in written]
        status = outbox_status[target.name]
        result["ours"][store] = {
            "transitions": len(records),
            "written": len(written),
            "history_only": sum(r.history_only for r in records),
            "write_requests": target.meter.count,
            "failed_requests": target.meter.failed,
            "writes_per_transition": target.meter.count / max(1, len(records)),
            "max_writes_one_transition": max((r.writes for r in records), default=0),
            "lag_p50_s": percentile(lags, 50),
            "lag_p99_s": percentile(lags, 99),
            "lag_max_s": max(lags, default=float("nan")),
            "outbox_lag_p50_s": status.lag_p50,
            "outbox_lag_p99_s": status.lag_p99,
            "write_seconds": target.meter.seconds,
            "per_write_second": len(records) / target.meter.seconds if target.meter.seconds else float("nan"),
            "wall_rate": _wall_rate(records),
            "by_status": _lag_by_status(written),
        }
    result["breakdown"] = {store: _breakdown(probe, targets[store].records(), wanted) for store in STORES}
    result["verdicts"] = _count(probe.verdicts.values())
    writes = [w for w in naive.writes if w.job_id in wanted]
    result["naive"]["events_received"] = naive.events
    for store in STORES:
        returned = [getattr(w, f"{store}_returned") for w in writes]
        lags = [r - w.occurred for r, w in zip(returned, writes, strict=True)]
        meter = naive.dynamodb.meter if store == "dynamodb" else naive.collection._meter
        seconds = sum(getattr(w, f"{store}_seconds") for w in writes)
        result["naive"][store] = {
            "events": len(writes),
            "write_requests": meter.count,
            "failed_requests": meter.failed,
            "writes_per_event": meter.count / max(1, len(naive.writes)),
            "lag_p50_s": percentile(lags, 50),
            "lag_p99_s": percentile(lags, 99),
            "lag_max_s": max(lags, default=float("nan")),
            "write_seconds": seconds,
            "per_write_second": len(writes) / seconds if seconds else float("nan"),
            "wall_rate": len(writes) / (max(returned) - min(w.occurred for w in writes)) if writes else 0.0,
        }
    result["verify_ours"] = verify_ours(targets, jobs, set(not_completed))
    result["verify_naive"] = verify_naive(naive, job_ids)
    result["captured"] = [r.transition for r in targets["dynamodb"].records() if r.job_id in wanted]
    return result


def _prefect_span(runs: dict[str, Any]) -> float:
    """Seconds from the first run's creation to the last run's end, on the server's clock."""
    created = [run.created.timestamp() for run in runs.values() if run.created]
    ended = [run.end_time.timestamp() for run in runs.values() if run.end_time]
    return max(ended) - min(created) if created and ended else float("nan")


def _wall_rate(records: list[Applied]) -> float:
    """Transitions per second from the first state change to the last write returned."""
    if not records:
        return 0.0
    return len(records) / (max(r.returned for r in records) - min(r.occurred for r in records))


def _lag_by_status(records: list[Applied]) -> dict[str, dict[str, float]]:
    by: dict[str, list[float]] = {}
    for record in records:
        by.setdefault(record.status, []).append(record.lag)
    return {s: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)} for s, v in by.items()}


def _count(values: Iterable[str]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for value in values:
        counted[value] = counted.get(value, 0) + 1
    return counted


def _breakdown(probe: StageProbe, records: list[Applied], wanted: set[str]) -> dict[str, Any]:
    """Per stage p50/p99 over DynamoDB deliveries, and the mean stage split of the slowest 5 %."""
    staged = [(r, probe.stages(r)) for r in records if r.job_id in wanted and r.written]
    known = [(r, s) for r, s in staged if s is not None]
    result: dict[str, Any] = {
        "from_events": len(known),
        "from_reconciler": sum(1 for _, s in staged if s is None),
        "stages": {
            stage: {
                "p50": percentile([s[stage] for _, s in known], 50),
                "p99": percentile([s[stage] for _, s in known], 99),
            }
            for stage in STAGES
        },
    }
    slowest = sorted(known, key=lambda pair: pair[0].lag)[-max(1, len(known) // 20) :]
    if slowest:
        result["slowest_5pct_mean"] = {
            stage: statistics.fmean(s[stage] for _, s in slowest) for stage in STAGES
        }
        result["slowest_5pct_lag_mean"] = statistics.fmean(r.lag for r, _ in slowest)
    return result


def verify_ours(targets: dict[str, TimedTarget], jobs: list[Any], skipped: set[str]) -> dict[str, Any]:
    """Every job COMPLETED in both stores with history QUEUED, RUNNING, COMPLETED; mismatches listed."""
    expected = ["QUEUED", "RUNNING", "COMPLETED"]
    dynamo, mongo = targets["dynamodb"].inner, targets["mongodb"].inner
    mismatches: list[str] = []
    for job in jobs:
        if job.id in skipped:
            continue
        in_dynamo = dynamo.get(job.type, job.id)
        in_mongo = mongo.get(job.id)
        histories = {
            "dynamodb": [e.status.value for e in dynamo.history(job.type, job.id)],
            "mongodb": [e.status.value for e in mongo.history(job.id)],
        }
        for store, current in (("dynamodb", in_dynamo), ("mongodb", in_mongo)):
            status = current.status.value if current else None
            if status != "COMPLETED" or histories[store] != expected:
                mismatches.append(f"{store} {job.id}: status {status}, history {histories[store]}")
    return {"checked": len(jobs) - len(skipped), "mismatches": mismatches}


def verify_naive(naive: NaiveWriter, job_ids: list[str]) -> dict[str, Any]:
    """What the naive writer left: jobs whose last write is not the final state (out-of-order events)."""
    wrong_dynamo = 0
    for job_id in job_ids:
        item = naive.dynamodb._client.get_item(TableName=naive.table, Key={"PK": {"S": job_id}}).get("Item")
        if item is None or item["state"]["S"] != "Completed":
            wrong_dynamo += 1
    collection = naive.collection._target
    found = {doc["_id"]: doc.get("state") for doc in collection.find({"_id": {"$in": job_ids}})}
    wrong_mongo = sum(1 for job_id in job_ids if found.get(job_id) != "Completed")
    return {"not_completed_dynamodb": wrong_dynamo, "not_completed_mongodb": wrong_mongo}


# --------------------------------------------------------------------------------- replay (no Prefect)


def _partition(transitions: list[Any], threads: int) -> list[list[Any]]:
    """Transitions per thread, by job (crc32 like the service's lanes), each job's in sequence order."""
    parts: list[list[Any]] = [[] for _ in range(threads)]
    for transition in transitions:
        parts[zlib.crc32(transition.job.id.encode()) % threads].append(transition)
    return parts


def _in_threads(parts: list[list[Any]], write: Callable[[Any], Any]) -> float:
    """Run ``write`` over each part in its own thread; seconds until the last one finished."""

    def drain(part: list[Any]) -> None:
        for item in part:
            for attempt in range(20):
                try:
                    write(item)
                    break
                except Exception:  # counted by the meter; moto answers 500 to concurrent transactions
                    if attempt == 19:
                        raise
                    time.sleep(min(2.0, 0.05 * 2**attempt))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        list(pool.map(drain, parts))
    return time.perf_counter() - started


def replay_round(
    stores: Stores, transitions: list[Any], store: str, threads: int, tag: str, home: Path
) -> dict[str, Any]:
    """One round of (a) outbox+lanes, (b) direct apply(), (c) naive put, for one store."""
    from jobbridge.mirror.outbox import Outbox
    from jobbridge.mirror.service import MirrorService
    from jobbridge.settings import get_settings

    result: dict[str, Any] = {}
    n = len(transitions)

    # (a) the service's own path: offer into a fresh outbox, then every lane drains it.
    target = stores.ours(f"{tag}_a")[store]
    service = MirrorService(
        [target],
        settings=get_settings(),
        outbox=Outbox(home / f"replay-{tag}-{store}.sqlite3"),
        lanes=threads,
    )
    target.ensure()
    started = time.perf_counter()
    for transition in transitions:
        service.offer(transition)
    offer_s = time.perf_counter() - started

    # The service's own lane loops (with their backoff when the store fails), until the outbox is empty.
    lanes = [
        threading.Thread(target=service._lane_loop, args=(target.name, index), daemon=True)
        for index in range(threads)
    ]
    started = time.perf_counter()
    for thread in lanes:
        thread.start()
    try:
        wait_until(
            f"replay of {n} transitions into {store} through the outbox",
            lambda: service.outbox.status([target.name]).targets[0].depth == 0,
            600,
            interval=0.02,
        )
        deliver_s = time.perf_counter() - started
    finally:
        service.stop()
    result["outbox_lanes"] = {
        "per_s": n / deliver_s,
        "offer_per_s": n / offer_s,
        "writes": target.meter.count,
        "failed": target.meter.failed,
        "delivered": len(target.records()),
    }

    # (b) the targets' apply() directly, jobs partitioned over the threads.
    target = stores.ours(f"{tag}_b")[store]
    target.ensure()
    elapsed = _in_threads(_partition(transitions, threads), target.apply)
    durations = target.meter.durations
    result["direct_apply"] = {
        "per_s": n / elapsed,
        "writes": target.meter.count,
        "failed": target.meter.failed,
        # moto copies the whole table for every TransactWriteItems: the cost grows with the table
        "first_50_ms": 1000 * statistics.fmean(durations[:50]),
        "last_50_ms": 1000 * statistics.fmean(durations[-50:]),
    }

    # (c) the naive unconditional put of a record built from the transition alone.
    if store == "dynamodb":
        client, table = stores.naive_table(f"{tag}_c")

        def naive_write(t: Any) -> None:
            naive_dynamo_put(client, table, t.job.id, _naive_fields(t))

        meter = client.meter
    else:
        collection = stores.naive_collection(f"{tag}_c")

        def naive_write(t: Any) -> None:
            naive_mongo_put(collection, t.job.id, _naive_fields(t))

        meter = collection._meter
    elapsed = _in_threads(_partition(transitions, threads), naive_write)
    result["naive_put"] = {
        "per_s": n / elapsed,
        "writes": meter.count,
        "failed": meter.failed,
        "first_50_ms": 1000 * statistics.fmean(meter.durations[:50]),
        "last_50_ms": 1000 * statistics.fmean(meter.durations[-50:]),
    }
    return result


def _naive_fields(transition: Any) -> dict[str, str]:
    return {
        "status": transition.job.status.value,
        "updated_at": transition.occurred.isoformat(),
        "event_id": transition.event_id,
    }


def synthetic_transitions(count: int) -> list[Any]:
    """``count`` jobs x PENDING, QUEUED, RUNNING, COMPLETED, one second apart (when nothing was captured)."""
    from datetime import UTC, timedelta

    from jobbridge.jobs import Job, JobStatus
    from jobbridge.mirror.transition import Transition

    start = datetime.now(UTC)
    transitions = []
    for index in range(count):
        job = Job(name=f"synthetic-{index}", type="test-noop", created_at=start)
        for step, status in enumerate(
            (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED)
        ):
            snapshot = job.model_copy(
                update={"status": status, "progress": 100.0 if status.is_final else 0.0}
            )
            transitions.append(Transition.of(snapshot, start + timedelta(seconds=step)))
    return transitions


def run_replay(args: argparse.Namespace, stores: Stores, captured: list[Any], home: Path) -> dict[str, Any]:
    seen: dict[tuple[str, int], Any] = {}
    for transition in captured:
        seen.setdefault(
            (transition.job.id, transition.seq), transition.model_copy(update={"history_only": False})
        )
    transitions = sorted(seen.values(), key=lambda t: t.seq)
    source = "captured"
    if not transitions:
        transitions, source = synthetic_transitions(args.jobs), "synthetic"
    rounds: dict[str, list[dict[str, Any]]] = {store: [] for store in STORES}
    for index in range(args.rounds):
        for store in STORES:
            rounds[store].append(replay_round(stores, transitions, store, args.lanes, f"r{index}", home))
            print(
                f"replay round {index + 1}/{args.rounds} {store}: "
                f"{ {k: round(v['per_s']) for k, v in rounds[store][-1].items()} }",
                flush=True,
            )
    summary: dict[str, Any] = {"transitions": len(transitions), "source": source, "threads": args.lanes}
    for store in STORES:
        summary[store] = {
            variant: {
                "per_s": statistics.median(r[variant]["per_s"] for r in rounds[store]),
                "writes_per_transition": statistics.median(r[variant]["writes"] for r in rounds[store])
                / len(transitions),
                "failed_requests": sum(r[variant]["failed"] for r in rounds[store]),
            }
            for variant in ("outbox_lanes", "direct_apply", "naive_put")
        }
        for variant in ("direct_apply", "naive_put"):
            for key in ("first_50_ms", "last_50_ms"):
                summary[store][variant][key] = statistics.median(r[variant][key] for r in rounds[store])
        summary[store]["offer_per_s"] = statistics.median(
            r["outbox_lanes"]["offer_per_s"] for r in rounds[store]
        )
    return summary


# ------------------------------------------------------------------------------------------- report


def _report_live(results: dict[str, Any]) -> None:
    live = results["live"]
    setup = results["setup"]
    print(
        f"\nLive: {live['jobs']} test-noop jobs submitted at once ({live['submit_s']:.1f} s to submit from "
        f"{setup['submit_threads']} threads, pool paused meanwhile: {setup['paused']}, "
        f"retries {len(live['submit_retries'])}), {setup['warm']} warm worker processes, "
        f"pool concurrency limit {setup['pool_limit'] or 'none'}; "
        f"Prefect creation->last end {live['prefect_span_s']:.1f} s; "
        f"not COMPLETED: {len(live['not_completed'])}"
    )
    header = f"  {'':10} {'':8} {'items':>6} {'writes':>7} {'failed':>7} {'w/item':>7} {'lag p50':>8}"
    print(header + f" {'p99':>7} {'max':>7} {'per write-s':>12} {'wall/s':>7}")
    for store in STORES:
        for who, row, items in (
            ("jobbridge", live["ours"][store], live["ours"][store]["transitions"]),
            ("naive", live["naive"][store], live["naive"][store]["events"]),
        ):
            per_item = row.get("writes_per_transition", row.get("writes_per_event"))
            print(
                f"  {store:10} {who:8} {items:6d} {row['write_requests']:7d} {row['failed_requests']:7d} "
                f"{per_item:7.2f} "
                f"{row['lag_p50_s']:7.2f}s {row['lag_p99_s']:6.2f}s {row['lag_max_s']:6.2f}s "
                f"{row['per_write_second']:12.0f} {row['wall_rate']:7.1f}"
            )
        ours, naive = live["ours"][store], live["naive"][store]
        print(
            f"  {store:10} ratio naive/jobbridge lag p99 {naive['lag_p99_s'] / ours['lag_p99_s']:.2f}x; "
            f"jobbridge/naive per write-second {ours['per_write_second'] / naive['per_write_second']:.2f}x; "
            f"max writes for one transition {ours['max_writes_one_transition']} "
            f"(outbox's own lag p50/p99 {ours['outbox_lag_p50_s']:.2f}/{ours['outbox_lag_p99_s']:.2f} s)"
        )
        print(
            f"  {store:10} our lag by status: "
            + ", ".join(
                f"{s} p50 {v['p50']:.2f} p99 {v['p99']:.2f} (n={v['n']})"
                for s, v in ours["by_status"].items()
            )
        )
    dynamo, mongo = live["breakdown"]["dynamodb"], live["breakdown"]["mongodb"]
    print(
        f"\n  where our lag goes (deliveries from events: {dynamo['from_events']} DynamoDB, "
        f"{mongo['from_events']} MongoDB; from the reconciler: {dynamo['from_reconciler']}, "
        f"{mongo['from_reconciler']})"
    )
    print(f"  {'':20} {'DynamoDB':>34}   {'MongoDB':>34}")
    print(f"  {'stage':20}" + f" {'p50':>8} {'p99':>8} {'slowest 5% mean':>16}  " * 2)
    for stage in STAGES:
        line = f"  {stage:20}"
        for breakdown in (dynamo, mongo):
            row = breakdown["stages"][stage]
            slow = breakdown.get("slowest_5pct_mean", {}).get(stage, float("nan"))
            line += f" {row['p50']:7.3f}s {row['p99']:7.3f}s {slow:15.3f}s  "
        print(line)
    print(f"  outbox verdicts: {live['verdicts']}")
    verify = live["verify_ours"]
    print(
        f"\n  final state, jobbridge: {verify['checked']} jobs checked, "
        f"{len(verify['mismatches'])} mismatches"
    )
    for line in verify["mismatches"][:20]:
        print(f"    {line}")
    naive_v = live["verify_naive"]
    print(
        f"  final state, naive: not 'Completed' in DynamoDB {naive_v['not_completed_dynamodb']}, "
        f"in MongoDB {naive_v['not_completed_mongodb']}"
    )
    lag_ok = all(live["ours"][s]["lag_p99_s"] <= LAG_TARGET_S for s in STORES)
    writes_ok = all(live["ours"][s]["max_writes_one_transition"] <= 1 for s in STORES)
    print(
        f"  target p99 lag <= {LAG_TARGET_S:.0f} s: {'met' if lag_ok else 'NOT met'}; "
        f"at most one write per store per transition: {'met' if writes_ok else 'NOT met'}"
    )


def _report_replay(results: dict[str, Any]) -> None:
    replay = results["replay"]
    print(
        f"\nReplay ({replay['source']}, {replay['transitions']} transitions, {replay['threads']} threads, "
        f"median of {results['setup']['rounds']} rounds), transitions/s:"
    )
    print(
        f"  {'':10} {'outbox+lanes':>13} {'apply()':>9} {'naive put':>10} {'ratio lanes/naive':>18} "
        f"{'apply/naive':>12} {'offers/s':>9}"
    )
    for store in STORES:
        row = replay[store]
        lanes, direct, naive_put = (row[v]["per_s"] for v in ("outbox_lanes", "direct_apply", "naive_put"))
        failed = "/".join(
            str(row[v]["failed_requests"]) for v in ("outbox_lanes", "direct_apply", "naive_put")
        )
        print(
            f"  {store:10} {lanes:13.0f} {direct:9.0f} {naive_put:10.0f} {lanes / naive_put:17.2f}x "
            f"{direct / naive_put:11.2f}x {row['offer_per_s']:9.0f}   failed requests (a/b/c) {failed}"
        )
        direct_row, naive_row = row["direct_apply"], row["naive_put"]
        print(
            f"  {store:10} one write request, first 50 -> last 50 of the replay: apply() "
            f"{direct_row['first_50_ms']:.1f} -> {direct_row['last_50_ms']:.1f} ms, naive put "
            f"{naive_row['first_50_ms']:.1f} -> {naive_row['last_50_ms']:.1f} ms"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs submitted at once (default 200)")
    parser.add_argument("--submit-threads", type=int, default=8, help="threads submitting them (default 8)")
    parser.add_argument("--warm", type=int, default=2, help="warm worker processes (default 2)")
    parser.add_argument("--lanes", type=int, default=4, help="delivery lanes per target (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="replay rounds (default 1)")
    parser.add_argument(
        "--pool-limit", type=int, default=2, help="work pool concurrency limit, 0 for none (default 2)"
    )
    parser.add_argument(
        "--no-pause",
        action="store_true",
        help="submit while the worker runs (default: the pool is paused until all are submitted)",
    )
    parser.add_argument("--deadline", type=float, default=900, help="seconds for the jobs to finish")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="jobbridge-bench-mirror-"))
    _prepare_environment(home, args.warm)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    from jobbridge.settings import reload_settings
    from jobbridge.stack import Stack

    settings = reload_settings()
    stack = Stack(settings)
    started = time.perf_counter()
    stack.up()
    results: dict[str, Any] = {
        "setup": {
            "stack_up_s": time.perf_counter() - started,
            "warm": args.warm,
            "lanes": args.lanes,
            "submit_threads": args.submit_threads,
            "rounds": args.rounds,
            "paused": not args.no_pause,
            "pool_limit": args.pool_limit,
            "cores": os.cpu_count(),
        },
    }
    stores = Stores(settings)
    out = BENCH_DIR / "results" / "mirror.json"
    out.parent.mkdir(exist_ok=True)
    try:
        live = run_live(args, settings, stores, home)
        captured = live.pop("captured")
        results["live"] = live
        out.write_text(json.dumps(_jsonable(results), indent=2))
        _report_live(results)
        results["replay"] = run_replay(args, stores, captured, home)
        out.write_text(json.dumps(_jsonable(results), indent=2))
        _report_replay(results)
    finally:
        stores.close()
        stack.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
