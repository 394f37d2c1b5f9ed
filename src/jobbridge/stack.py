"""The embedded local stack: real Prefect, moto and nx-27017 servers plus a worker, on loopback.

``jobbridge stack up`` must leave servers running after the CLI exits, and ``jobbridge stack down``
(a later, different process) must stop exactly those servers and nothing else. Each service is a
managed background process of :mod:`jobbridge.processes`: it runs in its own session, its pid and
kernel start time are recorded in ``<state_dir>/stack.json``, and a pid is only ever signalled after its
start time proves it is still the process we started (pids are reused). Each service writes one log
file under ``<state_dir>/logs/``, whose tail is quoted in every error about that service.

This module knows the services: how to start each one, how to tell that it is healthy and in which
order to start and stop them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from jobbridge.errors import StackError
from jobbridge.processes import Record, StateFile, locked, log_tail, port_problem, spawn, stop
from jobbridge.settings import Settings

__all__ = ["ServiceStatus", "Stack", "running_api_url"]

HOST = "127.0.0.1"
_POLL_SECONDS = 0.2
_STATE_FILE = "stack.json"
_LOCK_FILE = "stack.lock"
_HEALTH_DEADLINES = {"prefect": 90.0, "moto": 30.0, "mongo": 30.0, "worker": 60.0, "mirror": 60.0}
_PORT_SETTINGS = {
    "prefect": "JOBBRIDGE_PREFECT_PORT",
    "moto": "JOBBRIDGE_MOTO_PORT",
    "mongo": "JOBBRIDGE_MONGO_PORT",
}
_HEARTBEAT_SKEW_SECONDS = 2.0
# Services that drain on SIGINT (finish their running flow runs, then exit): stopped with SIGINT first.
_DRAINING_SERVICES = frozenset({"worker"})


@dataclass
class ServiceStatus:
    """What ``status`` knows about one service; ``url`` is where a user reaches it."""

    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str = ""


# --------------------------------------------------------------------------------------------------
# Health checks: each returns None when healthy, else a short reason for the user.


def _check_http(url: str, timeout: float) -> str | None:
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {type(exc).__name__}"
    return None if response.status_code == 200 else f"GET {url} answered {response.status_code}"


def _check_mongo(port: int, timeout: float) -> str | None:
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient[dict[str, Any]] = MongoClient(
        HOST, port, serverSelectionTimeoutMS=int(timeout * 1000), connectTimeoutMS=int(timeout * 1000)
    )
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        return f"ping to mongodb://{HOST}:{port} failed: {type(exc).__name__}"
    finally:
        client.close()
    return None


def _check_worker(api_url: str, pool: str, since: float, timeout: float) -> str | None:
    """Healthy when a worker of ``pool`` is ONLINE and has sent a heartbeat since ``since``."""
    url = f"{api_url}/work_pools/{pool}/workers/filter"
    try:
        response = httpx.post(url, json={"limit": 50}, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"POST {url} failed: {type(exc).__name__}"
    if response.status_code != 200:
        return f"POST {url} answered {response.status_code}"
    for worker in response.json():
        beat = worker.get("last_heartbeat_time")
        recent = bool(beat) and datetime.fromisoformat(beat).timestamp() >= since - _HEARTBEAT_SKEW_SECONDS
        if worker.get("status") == "ONLINE" and recent:
            return None
    return f"no online worker in work pool {pool!r} with a heartbeat since it started"


def _is_recorded_alive(records: dict[str, Record], name: str) -> bool:
    record = records.get(name)
    return record is not None and record.is_ours()


def _stop(record: Record) -> bool:
    """Stop one recorded service and all its processes; True when anything of it was running."""
    return stop(record, drain=record.name in _DRAINING_SERVICES)


def _state_file(state_dir: Path) -> StateFile:
    """``<state_dir>/stack.json``: service name -> :class:`~jobbridge.processes.Record`."""
    return StateFile(state_dir / _STATE_FILE)


def _venv_script(name: str) -> str:
    """A console script installed beside this interpreter (the venv's, not whatever is on PATH)."""
    return str(Path(sys.executable).with_name(name))


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How to start one service and how to tell that it is up."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int | None
    check: Callable[[float, float], str | None]  # (started_at, timeout) -> reason or None
    prepare: Callable[[], None] = lambda: None  # run just before the start, never by status


class Stack:
    """The embedded stack of one project (one ``settings.state_dir``)."""

    SERVICES = ("prefect", "moto", "mongo", "worker", "mirror")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.logs_dir = self.state_dir / "logs"
        self._state = _state_file(self.state_dir)

    # -- public ------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The Prefect API of this stack."""
        return f"http://{HOST}:{self.settings.prefect_port}/api"

    def urls(self) -> dict[str, str]:
        """Where a user reaches each service: the Prefect UI, the moto endpoint, a MongoDB URL, the pool."""
        ui = f"http://{HOST}:{self.settings.prefect_port}"
        return {
            "prefect": ui,
            "moto": f"http://{HOST}:{self.settings.moto_port}",
            "mongo": f"mongodb://{HOST}:{self.settings.mongo_port}/",
            "worker": f"{ui}/work-pools/work-pool/{self.settings.work_pool}",
            "mirror": "jobbridge mirror status",
        }

    def up(self) -> list[ServiceStatus]:
        """Start every service that is not already running and healthy; a second call starts nothing.

        When a service fails to start, the services started by this call are stopped again and a
        :class:`StackError` names the service, what was awaited and the tail of its log.
        """
        with locked(self.state_dir / _LOCK_FILE):
            records = self._state.load()
            todo = self._services_to_start(records)
            self._check_ports([n for n in todo if n in _PORT_SETTINGS and not _is_recorded_alive(records, n)])
            started: list[str] = []
            statuses: list[ServiceStatus] = []
            try:
                for name in self.SERVICES:
                    statuses.append(self._bring_up(name, records, todo, started))
            except BaseException:
                self._undo(records, started)
                raise
            return statuses

    def down(self) -> list[str]:
        """Stop the recorded services (last started first); returns the names of those that were running."""
        if not self._state.path.exists():
            return []  # never started here: do not even create the state dir
        with locked(self.state_dir / _LOCK_FILE):
            records = self._state.load()
            stopped: list[str] = []
            for name in reversed(self.SERVICES):
                record = records.get(name)
                if record is None:
                    continue
                if _stop(record):
                    stopped.append(name)
                del records[name]
                self._state.save(records)
            return stopped

    def status(self) -> list[ServiceStatus]:
        """Each service's URL, pid, whether its recorded process runs and whether it answers."""
        records = self._state.load()
        return [self._status_of(name, records.get(name)) for name in self.SERVICES]

    # -- up ----------------------------------------------------------------------------------------

    def _services_to_start(self, records: dict[str, Record]) -> dict[str, str]:
        """Name -> why it must start, for each service not both running and healthy."""
        todo: dict[str, str] = {}
        for name in self.SERVICES:
            record = records.get(name)
            if record is None:
                todo[name] = "not started"
            elif not record.is_ours():
                todo[name] = f"recorded pid {record.pid} is gone"
            elif name in ("worker", "mirror") and "prefect" in todo:
                todo[name] = "restarted with prefect"  # else it shows offline until its next heartbeat
            else:
                reason = self._spec(name).check(record.started_at, 3.0)
                if reason is not None:
                    todo[name] = f"running but unhealthy ({reason})"
        return todo

    def _check_ports(self, names: list[str]) -> None:
        """Fail before starting anything when two services share a port or a port is taken."""
        ports = {name: self._spec(name).port for name in _PORT_SETTINGS}
        for name in names:
            port = ports[name]
            clash = [other for other, value in ports.items() if other != name and value == port]
            if clash:
                raise StackError(
                    f"{name}: port {port} is also configured for {clash[0]}; "
                    f"set {_PORT_SETTINGS[name]} to a different port"
                )
            problem = port_problem(HOST, port) if port is not None else None
            if problem is not None:
                raise StackError(
                    f"{name}: port {port} on {HOST} {problem}; "
                    f"set {_PORT_SETTINGS[name]} to a free port or stop that process"
                )

    def _bring_up(
        self, name: str, records: dict[str, Record], todo: dict[str, str], started: list[str]
    ) -> ServiceStatus:
        url = self.urls()[name]
        if name == "worker" and ("prefect" in todo or "worker" in todo):
            self._ensure_pool_and_deployments()
        if name not in todo:
            record = records[name]
            return ServiceStatus(name, url, record.pid, True, True, "already running")
        stale = records.pop(name, None)
        if stale is not None:
            _stop(stale)  # unhealthy but alive: replace it rather than leave two copies around
            self._state.save(records)
        began = time.monotonic()
        record = self._start(self._spec(name))
        records[name] = record
        started.append(name)
        self._state.save(records)
        self._wait_healthy(record)
        detail = f"started in {time.monotonic() - began:.1f} s"
        if todo[name] != "not started":
            detail += f" ({todo[name]})"
        return ServiceStatus(name, url, record.pid, True, True, detail)

    def _start(self, spec: _Spec) -> Record:
        """Launch a service detached from us: own session, stdin /dev/null, output to its log file."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"{spec.name}.log"
        spec.prepare()
        started_at = time.time()
        with open(log, "ab") as out:
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            out.write(f"--- jobbridge stack: {stamp} starting {' '.join(spec.command)}\n".encode())
            out.flush()
            pid = spawn(spec.command, spec.env, out.fileno())
        return Record.of_spawned(
            spec.name, pid, command=spec.command, port=spec.port, started_at=started_at, log=str(log)
        )

    def _wait_healthy(self, record: Record) -> None:
        """Poll the service's health until its deadline; fail early when its process exits."""
        spec = self._spec(record.name)
        deadline = time.monotonic() + _HEALTH_DEADLINES[record.name]
        reason: str | None = "not checked yet"
        while time.monotonic() < deadline:
            if not record.is_ours():
                raise self._start_error(record, f"the process exited while waiting: {reason}")
            reason = spec.check(record.started_at, 1.0)
            if reason is None:
                return
            time.sleep(_POLL_SECONDS)
        raise self._start_error(
            record, f"not healthy within {_HEALTH_DEADLINES[record.name]:.0f} s: {reason}"
        )

    def _start_error(self, record: Record, what: str) -> StackError:
        tail = log_tail(Path(record.log))
        return StackError(
            f"{record.name} (pid {record.pid}) did not start: {what}\nlast lines of {record.log}:\n{tail}"
        )

    def _undo(self, records: dict[str, Record], started: list[str]) -> None:
        """Stop what this ``up`` call started, newest first, and forget it."""
        for name in reversed(started):
            record = records.pop(name, None)
            if record is not None:
                with contextlib.suppress(StackError):
                    _stop(record)
        self._state.save(records)

    def _ensure_pool_and_deployments(self) -> None:
        """Create the work pool and deployments the worker serves, before the worker polls for them.

        Imported here rather than at the top: ``jobbridge.deployments`` imports Prefect (seconds),
        which ``status`` and :func:`running_api_url` must not pay for.
        """
        try:
            from jobbridge.deployments import ensure_deployments, ensure_work_pool

            ensure_work_pool(self.settings, self.api_url)
            ensure_deployments(self.settings, self.api_url)
        except Exception as exc:
            raise StackError(
                f"worker: could not create work pool {self.settings.work_pool!r} or the "
                f"deployments on {self.api_url}: {exc}"
            ) from exc

    # -- status ------------------------------------------------------------------------------------

    def _status_of(self, name: str, record: Record | None) -> ServiceStatus:
        url = self.urls()[name]
        if record is None:
            return ServiceStatus(name, url, None, False, False, "not started")
        if not record.is_ours():
            return ServiceStatus(name, url, None, False, False, f"recorded pid {record.pid} is gone")
        reason = self._spec(name).check(record.started_at, 1.0)
        return ServiceStatus(name, url, record.pid, True, reason is None, reason or "healthy")

    # -- the services --------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        """The environment of every service: ours, pointed at this stack's Prefect home and ports."""
        env = dict(os.environ)
        # The embedded server is SQLite under PREFECT_HOME, whatever database this shell points at.
        for key in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
            env.pop(key, None)
        s = self.settings
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PREFECT_HOME": str(self.state_dir / "prefect"),
                "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "JOBBRIDGE_HOME": str(self.state_dir),
                "JOBBRIDGE_PREFECT_API_URL": self.api_url,
                "JOBBRIDGE_PREFECT_PORT": str(s.prefect_port),
                "JOBBRIDGE_MOTO_PORT": str(s.moto_port),
                "JOBBRIDGE_MONGO_PORT": str(s.mongo_port),
                "JOBBRIDGE_WORK_POOL": s.work_pool,
                "JOBBRIDGE_WORKER_WARM_PROCESSES": str(s.worker_warm_processes),
                "JOBBRIDGE_WORKER_QUERY_SECONDS": str(s.worker_query_seconds),
            }
        )
        return env

    def _spec(self, name: str) -> _Spec:
        builders: dict[str, Callable[[], _Spec]] = {
            "prefect": self._prefect_spec,
            "moto": self._moto_spec,
            "mongo": self._mongo_spec,
            "worker": self._worker_spec,
            "mirror": self._mirror_spec,
        }
        return builders[name]()

    def _prefect_spec(self) -> _Spec:
        port = self.settings.prefect_port
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port"]
        env = {**self._env(), "PREFECT_SERVER_UI_ENABLED": "true", "PREFECT_UI_ENABLED": "true"}
        health = f"{self.api_url}/health"
        return _Spec("prefect", [*command, str(port)], env, port, lambda _, t: _check_http(health, t))

    def _moto_spec(self) -> _Spec:
        port = self.settings.moto_port
        command = [sys.executable, _venv_script("moto_server"), "-H", HOST, "-p", str(port)]
        health = f"http://{HOST}:{port}/moto-api/"
        return _Spec("moto", command, self._env(), port, lambda _, t: _check_http(health, t))

    def _mongo_spec(self) -> _Spec:
        port = self.settings.mongo_port
        data = self.state_dir / "mongo"
        pid_file = data / "nx-27017.pid"

        def prepare() -> None:
            data.mkdir(parents=True, exist_ok=True)
            # nx-27017 refuses to start while its pid file names a live process, and pids are reused.
            pid_file.unlink(missing_ok=True)

        command = [
            sys.executable, _venv_script("nx-27017"), "--host", HOST, "-p", str(port),
            "--db", str(data / "jobbridge.db"), "--pid-file", str(pid_file),
            "--log-file", os.devnull,  # it logs to stderr too, which goes to logs/mongo.log
        ]  # fmt: skip

        def check(_: float, timeout: float) -> str | None:
            return _check_mongo(port, timeout)

        return _Spec("mongo", command, self._env(), port, check, prepare)

    def _worker_spec(self) -> _Spec:
        s = self.settings
        command = [
            sys.executable, "-m", "jobbridge.deployments.worker", "--pool", s.work_pool,
            "--warm", str(s.worker_warm_processes), "--query-seconds", str(s.worker_query_seconds),
        ]  # fmt: skip
        env = {**self._env(), "PREFECT_WORKER_QUERY_SECONDS": str(s.worker_query_seconds)}
        api, pool = self.api_url, s.work_pool
        return _Spec("worker", command, env, None, lambda since, t: _check_worker(api, pool, since, t))

    def _mirror_spec(self) -> _Spec:
        from jobbridge.mirror.service import heartbeat_problem

        command = [sys.executable, "-m", "jobbridge.mirror.service"]
        settings = self.settings
        return _Spec(
            "mirror", command, self._env(), None, lambda since, _: heartbeat_problem(settings, since)
        )


def running_api_url(settings: Settings) -> str | None:
    """The stack's API URL when its Prefect server is recorded as ours and answers, else None.

    Cheap on purpose (a file read and one GET with a 1 s timeout): commands call it to decide whether to
    talk to the embedded server or to run in-process.
    """
    record = _state_file(settings.state_dir).load().get("prefect")
    if record is None or not record.is_ours():
        return None
    api_url = f"http://{HOST}:{record.port or settings.prefect_port}/api"
    return api_url if _check_http(f"{api_url}/health", 1.0) is None else None
