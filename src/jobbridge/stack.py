"""The embedded local stack: real Prefect, moto and nx-27017 servers plus a worker, on loopback.

``jobbridge stack up`` must leave servers running after the CLI exits, and ``jobbridge stack down``
(a later, different process) must stop exactly those servers and nothing else. So every service runs
in its own session, its pid and kernel start time are recorded in ``<state_dir>/stack.json``, and a
pid is only ever signalled after its start time proves it is still the process we started (pids are
reused). Each service writes one log file under ``<state_dir>/logs/``, whose tail is quoted in every
error about that service.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from jobbridge.errors import StackError
from jobbridge.settings import Settings

__all__ = ["ServiceStatus", "Stack", "running_api_url"]

HOST = "127.0.0.1"
_POLL_SECONDS = 0.2
_LOG_TAIL_LINES = 20
_STATE_FILE = "stack.json"
_HEALTH_DEADLINES = {"prefect": 90.0, "moto": 30.0, "mongo": 30.0, "worker": 60.0}
_PORT_SETTINGS = {
    "prefect": "JOBBRIDGE_PREFECT_PORT",
    "moto": "JOBBRIDGE_MOTO_PORT",
    "mongo": "JOBBRIDGE_MONGO_PORT",
}
# Grace periods of the stop sequence: first signal, second signal, then SIGKILL.
_STOP_GRACE_SECONDS = (10.0, 5.0, 5.0)
_HEARTBEAT_SKEW_SECONDS = 2.0

# Signals a service must start with at their default action. A background job of a non-interactive
# shell inherits an ignored SIGINT, and Prefect's worker "forwards" SIGINT to itself by restoring the
# inherited disposition, so without this reset SIGINT could not stop it. Python ignores SIGPIPE itself.
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ)

# Pids of the services this process spawned, so that ``down`` in the same process can reap them
# (otherwise they linger as zombies until this process exits).
_CHILDREN: set[int] = set()


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
# Processes, read from /proc: identity by (pid, kernel start time, boot id) survives pid reuse.


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    state: str
    start_ticks: int


def _read_proc(pid: int) -> _Proc | None:
    """The process ``pid`` as the kernel sees it, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return _Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]))


def _all_procs() -> list[_Proc]:
    """Every live process on the machine (zombies excluded: they are already dead)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None and _is_live(proc):
                found.append(proc)
    return found


def _is_live(proc: _Proc | None) -> bool:
    """True unless the process is gone or a zombie that only waits to be reaped."""
    return proc is not None and proc.state not in ("Z", "X", "x")


def _boot_id() -> str:
    """This boot's id: start times count from boot, so records of an earlier boot never match."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _same_process(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` is alive and is still the process that started at ``start_ticks``."""
    _reap(pid)
    proc = _read_proc(pid)
    return _is_live(proc) and proc is not None and proc.start_ticks == start_ticks


def _reap(pid: int) -> None:
    """Collect the exit status of a service this process started, so it does not stay a zombie."""
    if pid in _CHILDREN:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                return
        _CHILDREN.discard(pid)


def _ignores_signal(pid: int, signum: int) -> bool:
    """True when ``pid`` ignores ``signum`` (background jobs of non-interactive shells ignore SIGINT)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------------------------------
# The state file: one JSON document, replaced atomically, so a reader never sees half a write.


@dataclass
class _Record:
    """One started service, as recorded in the state file."""

    name: str
    pid: int
    start_ticks: int
    boot_id: str
    command: list[str]
    port: int | None
    started_at: float
    log: str

    def is_ours(self) -> bool:
        """True when the recorded process is alive and is the one we started (not a reused pid)."""
        return self.boot_id == _boot_id() and _same_process(self.pid, self.start_ticks)


class _StateFile:
    """``<state_dir>/stack.json``: service name -> :class:`_Record`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / _STATE_FILE

    def load(self) -> dict[str, _Record]:
        """The recorded services; a missing or unreadable file means nothing was started."""
        try:
            data = json.loads(self.path.read_text())
            return {name: _Record(**raw) for name, raw in data.get("services", {}).items()}
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def save(self, records: dict[str, _Record]) -> None:
        """Write all records: a temporary file in the same directory, then an atomic rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": 1, "services": {name: asdict(rec) for name, rec in records.items()}}
        fd, tmp = tempfile.mkstemp(prefix=".stack-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold the stack's lock, so that two ``up``/``down`` calls never interleave starts and stops."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "stack.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Stopping: the service's process group plus every descendant seen while it lived (Prefect starts
# flow runs in sessions of their own, which a signal to the worker's group does not reach).


class _Family:
    """The processes of one service: its group and its descendants, each identified by start time."""

    def __init__(self, record: _Record) -> None:
        self.record = record
        self.members: dict[int, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Add the group members and, while the leader lives, its descendants to the known members.

        A group outlives its leader, and the kernel does not reuse a pid while a group of that id
        exists; so once the leader is gone, the processes of its group are still the service's.
        """
        if self.record.boot_id != _boot_id():
            return  # recorded before a reboot: none of those processes exist any more
        leader_ours = self.record.is_ours()
        if not leader_ours and _is_live(_read_proc(self.record.pid)):
            return  # the pid, hence the group id, now belongs to someone else
        procs = _all_procs()
        for proc in procs:
            if proc.pgrp == self.record.pid:
                self.members.setdefault(proc.pid, proc.start_ticks)
        if leader_ours:
            self._add_descendants(procs)

    def _add_descendants(self, procs: list[_Proc]) -> None:
        children: dict[int, list[_Proc]] = {}
        for proc in procs:
            children.setdefault(proc.ppid, []).append(proc)
        todo = [self.record.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child.pid not in self.members:
                    self.members[child.pid] = child.start_ticks
                    todo.append(child.pid)

    def alive(self) -> list[int]:
        """The members still alive (and still the same processes)."""
        return [pid for pid, ticks in self.members.items() if _same_process(pid, ticks)]

    def signal(self, signum: int, *, everyone: bool) -> None:
        """Signal the group once; with ``everyone``, also each known member outside the group.

        Each process gets the signal once per step: Prefect's worker treats a second signal as
        "stop now" rather than "drain".
        """
        alive = self.alive()
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.record.pid, signum)
        if everyone:
            for pid in alive:
                proc = _read_proc(pid)
                if proc is not None and proc.pgrp != self.record.pid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signum)

    def wait_gone(self, seconds: float) -> bool:
        """Poll until every member is gone; False when the deadline passes first."""
        deadline = time.monotonic() + seconds
        while True:
            self.refresh()
            if not self.alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)


def _stop_signals(record: _Record) -> list[int]:
    """The polite signals for a service, in order; SIGKILL follows them.

    The worker gets SIGINT first (a drain), unless it ignores SIGINT as a background job of a
    non-interactive shell does; the second signal is always SIGTERM, which Prefect's worker obeys.
    """
    if record.name == "worker" and not _ignores_signal(record.pid, signal.SIGINT):
        return [signal.SIGINT, signal.SIGTERM]
    return [signal.SIGTERM, signal.SIGTERM]


def _stop(record: _Record) -> bool:
    """Stop one recorded service and all its processes; True when anything of it was running."""
    family = _Family(record)
    if not family.alive():
        return False
    steps = [*_stop_signals(record), signal.SIGKILL]
    for index, (signum, grace) in enumerate(zip(steps, _STOP_GRACE_SECONDS, strict=True)):
        family.signal(signum, everyone=index > 0)
        if family.wait_gone(grace):
            return True
    raise StackError(
        f"{record.name}: processes {sorted(family.alive())} are still alive after SIGKILL; "
        f"stop them by hand (log: {record.log})"
    )


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


def _is_recorded_alive(records: dict[str, _Record], name: str) -> bool:
    record = records.get(name)
    return record is not None and record.is_ours()


def _port_problem(port: int) -> str | None:
    """Why a service could not listen on ``port`` (e.g. another process holds it), or None.

    SO_REUSEADDR as the servers themselves set it, so a port left in TIME_WAIT by our own last
    ``down`` does not count as taken.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use by a process that is not this stack's"
            return f"cannot be bound ({exc.strerror})"
    return None


def _spawn(command: list[str], env: dict[str, str], log_fd: int) -> int:
    """Start ``command`` in a new session, stdin from /dev/null, stdout and stderr to ``log_fd``.

    posix_spawn rather than Popen: it can reset inherited signal dispositions without a preexec_fn
    (unsafe in a threaded process), and the new session keeps the service alive after the CLI exits.
    """
    pid = os.posix_spawn(
        command[0],
        command,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ],
        setsid=True,
        setsigmask=(),
        setsigdef=_RESET_SIGNALS,
    )
    _CHILDREN.add(pid)
    return pid


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _venv_script(name: str) -> str:
    """A console script installed beside this interpreter (the venv's, not whatever is on PATH)."""
    return str(Path(sys.executable).with_name(name))


def _custom_worker_available() -> bool:
    """True once jobbridge's own worker module exists; until then Prefect's process worker stands in."""
    import importlib.util

    try:
        return importlib.util.find_spec("jobbridge.deployments.worker") is not None
    except ImportError:
        return False


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

    SERVICES = ("prefect", "moto", "mongo", "worker")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.logs_dir = self.state_dir / "logs"
        self._state = _StateFile(self.state_dir)

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
        }

    def up(self) -> list[ServiceStatus]:
        """Start every service that is not already running and healthy; a second call starts nothing.

        When a service fails to start, the services started by this call are stopped again and a
        :class:`StackError` names the service, what was awaited and the tail of its log.
        """
        with _locked(self.state_dir):
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
        with _locked(self.state_dir):
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

    def _services_to_start(self, records: dict[str, _Record]) -> dict[str, str]:
        """Name -> why it must start, for each service not both running and healthy."""
        todo: dict[str, str] = {}
        for name in self.SERVICES:
            record = records.get(name)
            if record is None:
                todo[name] = "not started"
            elif not record.is_ours():
                todo[name] = f"recorded pid {record.pid} is gone"
            elif name == "worker" and "prefect" in todo:
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
            problem = _port_problem(port) if port is not None else None
            if problem is not None:
                raise StackError(
                    f"{name}: port {port} on {HOST} {problem}; "
                    f"set {_PORT_SETTINGS[name]} to a free port or stop that process"
                )

    def _bring_up(
        self, name: str, records: dict[str, _Record], todo: dict[str, str], started: list[str]
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

    def _start(self, spec: _Spec) -> _Record:
        """Launch a service detached from us: own session, stdin /dev/null, output to its log file."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"{spec.name}.log"
        spec.prepare()
        started_at = time.time()
        with open(log, "ab") as out:
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            out.write(f"--- jobbridge stack: {stamp} starting {' '.join(spec.command)}\n".encode())
            out.flush()
            pid = _spawn(spec.command, spec.env, out.fileno())
        proc = _read_proc(pid)
        return _Record(
            name=spec.name,
            pid=pid,
            start_ticks=proc.start_ticks if proc is not None else 0,
            boot_id=_boot_id(),
            command=spec.command,
            port=spec.port,
            started_at=started_at,
            log=str(log),
        )

    def _wait_healthy(self, record: _Record) -> None:
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

    def _start_error(self, record: _Record, what: str) -> StackError:
        tail = _log_tail(Path(record.log))
        return StackError(
            f"{record.name} (pid {record.pid}) did not start: {what}\nlast lines of {record.log}:\n{tail}"
        )

    def _undo(self, records: dict[str, _Record], started: list[str]) -> None:
        """Stop what this ``up`` call started, newest first, and forget it."""
        for name in reversed(started):
            record = records.pop(name, None)
            if record is not None:
                with contextlib.suppress(StackError):
                    _stop(record)
        self._state.save(records)

    def _ensure_pool_and_deployments(self) -> None:
        """Create the work pool and deployments the worker serves, before the worker polls for them."""
        try:
            from jobbridge.deployments import (
                ensure_deployments,
                ensure_work_pool,
            )
        except ImportError:
            # TODO(stack): drop this fallback once jobbridge.deployments provides ensure_work_pool and
            # ensure_deployments; until then only the pool is created and no deployments exist.
            _create_process_pool(self.settings.work_pool, self.api_url)
            return
        try:
            ensure_work_pool(self.settings, self.api_url)
            ensure_deployments(self.settings, self.api_url)
        except Exception as exc:
            raise StackError(
                f"worker: could not create work pool {self.settings.work_pool!r} or the "
                f"deployments on {self.api_url}: {exc}"
            ) from exc

    # -- status ------------------------------------------------------------------------------------

    def _status_of(self, name: str, record: _Record | None) -> ServiceStatus:
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
        if _custom_worker_available():
            command = [
                sys.executable, "-m", "jobbridge.deployments.worker", "--pool", s.work_pool,
                "--warm", str(s.worker_warm_processes), "--query-seconds", str(s.worker_query_seconds),
            ]  # fmt: skip
        else:
            command = [
                sys.executable, "-m", "prefect", "worker", "start",
                "--pool", s.work_pool, "--type", "process",
            ]  # fmt: skip
        env = {**self._env(), "PREFECT_WORKER_QUERY_SECONDS": str(s.worker_query_seconds)}
        api, pool = self.api_url, s.work_pool
        return _Spec("worker", command, env, None, lambda since, t: _check_worker(api, pool, since, t))


def _create_process_pool(name: str, api_url: str) -> None:
    """Create a process work pool with Prefect's default job template, unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    pool = WorkPoolCreate(name=name, type="process", base_job_template=template)
    with (
        temporary_settings({PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
        contextlib.suppress(ObjectAlreadyExists),
    ):
        client.create_work_pool(pool)


def running_api_url(settings: Settings) -> str | None:
    """The stack's API URL when its Prefect server is recorded as ours and answers, else None.

    Cheap on purpose (a file read and one GET with a 1 s timeout): commands call it to decide whether to
    talk to the embedded server or to run in-process.
    """
    record = _StateFile(settings.state_dir).load().get("prefect")
    if record is None or not record.is_ours():
        return None
    api_url = f"http://{HOST}:{record.port or settings.prefect_port}/api"
    return api_url if _check_http(f"{api_url}/health", 1.0) is None else None
