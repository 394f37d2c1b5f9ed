"""Managed background processes: spawn them detached, know them again later, stop a whole family.

Why this exists: ``jobbridge stack up`` must leave servers running after the CLI exits, and ``jobbridge
stack down`` (a later, different process) must stop exactly those processes and nothing else. So:

* :func:`spawn` starts each one in a session of its own (it survives the CLI, and a terminal's Ctrl-C
  does not reach it) with stdin from /dev/null and its output in a log file;
* a :class:`Record` of its pid, kernel start time and boot id goes into a :class:`StateFile`, and a
  pid is only ever signalled after :func:`same_process` proves it is still the process that was
  started (pids are reused; start times count from boot, so records of an earlier boot never match);
* :func:`stop` signals the :class:`Family` of a record: its process group plus every descendant seen
  while the leader lived (Prefect starts flow runs in sessions of their own, which a signal to the
  worker's group does not reach), escalating to SIGKILL.

Everything is read from ``/proc``: Linux only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from jobbridge.errors import StackError

__all__ = [
    "LOG_TAIL_LINES",
    "STOP_GRACE_SECONDS",
    "Family",
    "Proc",
    "Record",
    "StateFile",
    "all_procs",
    "boot_id",
    "ignores_signal",
    "infrastructure_id",
    "is_live",
    "local_pid_of",
    "locked",
    "log_tail",
    "port_problem",
    "read_proc",
    "reap",
    "same_process",
    "spawn",
    "stop",
    "stop_signals",
]

#: How often :meth:`Family.wait_gone` looks again whether the processes are gone.
_POLL_SECONDS = 0.2
#: How many lines of a log file :func:`log_tail` quotes by default.
LOG_TAIL_LINES = 20
#: Grace periods of the stop sequence: first signal, second signal, then SIGKILL.
STOP_GRACE_SECONDS = (10.0, 5.0, 5.0)

# Signals a spawned process must start with at their default action. A background job of a
# non-interactive shell inherits an ignored SIGINT, and Prefect's worker "forwards" SIGINT to itself by
# restoring the inherited disposition, so without this reset SIGINT could not stop it. Python ignores
# SIGPIPE itself.
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ)

# Pids of the processes this process spawned, so that a stop in the same process can reap them
# (otherwise they linger as zombies until this process exits).
_CHILDREN: set[int] = set()


# --------------------------------------------------------------------------------------------------
# Processes, read from /proc: identity by (pid, kernel start time, boot id) survives pid reuse.


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/<pid>/stat`` shows it: enough to tell families and pid reuse apart."""

    pid: int
    ppid: int
    pgrp: int
    state: str
    start_ticks: int


def read_proc(pid: int) -> Proc | None:
    """The process ``pid`` as the kernel sees it, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]))


def all_procs() -> list[Proc]:
    """Every live process on the machine (zombies excluded: they are already dead)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = read_proc(int(entry))
            if proc is not None and is_live(proc):
                found.append(proc)
    return found


def is_live(proc: Proc | None) -> bool:
    """True unless the process is gone or a zombie that only waits to be reaped."""
    return proc is not None and proc.state not in ("Z", "X", "x")


def boot_id() -> str:
    """This boot's id: start times count from boot, so records of an earlier boot never match."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def same_process(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` is alive and is still the process that started at ``start_ticks``."""
    reap(pid)
    proc = read_proc(pid)
    return is_live(proc) and proc is not None and proc.start_ticks == start_ticks


def reap(pid: int) -> None:
    """Collect the exit status of a process this process spawned, so it does not stay a zombie."""
    if pid in _CHILDREN:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                return
        _CHILDREN.discard(pid)


def ignores_signal(pid: int, signum: int) -> bool:
    """True when ``pid`` ignores ``signum`` (background jobs of non-interactive shells ignore SIGINT)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------------------------------
# Starting: detached from the caller, so the process outlives it.


def spawn(command: list[str], env: dict[str, str], log_fd: int) -> int:
    """Start ``command`` in a new session, stdin from /dev/null, stdout and stderr to ``log_fd``.

    posix_spawn rather than Popen: it can reset inherited signal dispositions without a preexec_fn
    (unsafe in a threaded process), and the new session keeps the process alive after the CLI exits.
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


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` (e.g. another process holds it), or None.

    SO_REUSEADDR as the servers themselves set it, so a port left in TIME_WAIT by our own last stop
    does not count as taken.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use by a process that is not this stack's"
            return f"cannot be bound ({exc.strerror})"
    return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, quoted in errors about the process that wrote it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# --------------------------------------------------------------------------------------------------
# The state file: one JSON document, replaced atomically, so a reader never sees half a write.


@dataclass
class Record:
    """One started process, as recorded in the state file, so a later process can find it again."""

    name: str
    pid: int
    start_ticks: int
    boot_id: str
    command: list[str]
    port: int | None
    started_at: float
    log: str

    @classmethod
    def of_spawned(
        cls, name: str, pid: int, *, command: list[str], port: int | None, started_at: float, log: str
    ) -> Record:
        """The record of ``pid`` just returned by :func:`spawn`: its start time pins its identity."""
        proc = read_proc(pid)
        return cls(
            name=name,
            pid=pid,
            start_ticks=proc.start_ticks if proc is not None else 0,
            boot_id=boot_id(),
            command=command,
            port=port,
            started_at=started_at,
            log=log,
        )

    def is_ours(self) -> bool:
        """True when the recorded process is alive and is the one we started (not a reused pid)."""
        return self.boot_id == boot_id() and same_process(self.pid, self.start_ticks)


class StateFile:
    """A JSON file of name -> :class:`Record` (``<state_dir>/stack.json`` for the stack)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Record]:
        """The recorded processes; a missing or unreadable file means nothing was started."""
        try:
            data = json.loads(self.path.read_text())
            return {name: Record(**raw) for name, raw in data.get("services", {}).items()}
        except (FileNotFoundError, ValueError, TypeError):
            return {}

    def save(self, records: dict[str, Record]) -> None:
        """Write all records: a temporary file in the same directory, then an atomic rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": 1, "services": {name: asdict(rec) for name, rec in records.items()}}
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.stem}-", suffix=self.path.suffix, dir=self.path.parent
        )
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
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path``, so that two starts or stops never interleave."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Stopping: the process group plus every descendant seen while the leader lived (Prefect starts flow
# runs in sessions of their own, which a signal to the worker's group does not reach).


class Family:
    """The processes of one record: its group and its descendants, each identified by start time."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.members: dict[int, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Add the group members and, while the leader lives, its descendants to the known members.

        A group outlives its leader, and the kernel does not reuse a pid while a group of that id
        exists; so once the leader is gone, the processes of its group are still the record's.
        """
        if self.record.boot_id != boot_id():
            return  # recorded before a reboot: none of those processes exist any more
        leader_ours = self.record.is_ours()
        if not leader_ours and is_live(read_proc(self.record.pid)):
            return  # the pid, hence the group id, now belongs to someone else
        procs = all_procs()
        for proc in procs:
            if proc.pgrp == self.record.pid:
                self.members.setdefault(proc.pid, proc.start_ticks)
        if leader_ours:
            self._add_descendants(procs)

    def _add_descendants(self, procs: list[Proc]) -> None:
        children: dict[int, list[Proc]] = {}
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
        return [pid for pid, ticks in self.members.items() if same_process(pid, ticks)]

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
                proc = read_proc(pid)
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


def stop_signals(record: Record, *, drain: bool = False) -> list[int]:
    """The polite signals for a recorded process, in order; SIGKILL follows them.

    A process that ``drain``s on SIGINT (a worker finishing its running work) gets SIGINT first,
    unless it ignores SIGINT as a background job of a non-interactive shell does; the second signal
    is always SIGTERM, which Prefect's worker obeys.
    """
    if drain and not ignores_signal(record.pid, signal.SIGINT):
        return [signal.SIGINT, signal.SIGTERM]
    return [signal.SIGTERM, signal.SIGTERM]


def stop(record: Record, *, drain: bool = False) -> bool:
    """Stop one recorded process and its whole family; True when anything of it was running.

    Raises :class:`StackError` when members survive SIGKILL (e.g. stuck in uninterruptible sleep).
    """
    family = Family(record)
    if not family.alive():
        return False
    steps = [*stop_signals(record, drain=drain), signal.SIGKILL]
    for index, (signum, grace) in enumerate(zip(steps, STOP_GRACE_SECONDS, strict=True)):
        family.signal(signum, everyone=index > 0)
        if family.wait_gone(grace):
            return True
    raise StackError(
        f"{record.name}: processes {sorted(family.alive())} are still alive after SIGKILL; "
        f"stop them by hand (log: {record.log})"
    )


def infrastructure_id(pid: int) -> str:
    """What our worker records as a flow run's ``infrastructure_pid``: ``{hostname}:{pid}``.

    The host makes a pid meaningful to a reader on another machine (the mirror's stale sweep only judges
    runs of its own host).
    """
    return f"{socket.gethostname()}:{pid}"


def local_pid_of(infrastructure: str | None) -> int | None:
    """The pid of an ``infrastructure_pid`` written by :func:`infrastructure_id` on this host, else None.

    A bare pid (a stock Prefect worker) says nothing about its host, so it is not judged either.
    """
    host, _, pid = (infrastructure or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return int(pid)
