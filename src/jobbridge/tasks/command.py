"""Run a command so that it streams its output, keeps a bounded tail, and never outlives its job.

Why each piece is there:

* the command leads a session of its own (``start_new_session``), so one ``killpg`` reaches it and
  everything it started, and a signal Prefect aims at the flow-run process's group does not hit it
  half-way through its own shutdown;
* a *watchdog* process (in a session of its own too) holds the read end of a pipe whose write end only
  this process holds. When this process dies in any way, SIGKILL included, the kernel closes the pipe
  and the watchdog kills the command's group. ``PR_SET_PDEATHSIG`` would not do: it reaches only the
  direct child (not a shell's children), it fires when the spawning *thread* ends rather than the
  process, and setting it needs a ``preexec_fn``, which is unsafe in a threaded process like a flow run;
* stdout and stderr are read line by line by two threads, each line handed on as it arrives and kept in
  a bounded deque, so memory stays flat whatever the output size (over-long lines are cut into pieces);
* on timeout, on normal exit with processes left behind, and on any exception while waiting (Prefect's
  ``TerminationSignal`` when the run is cancelled) the group gets SIGTERM, a grace period, then SIGKILL.

A process that leaves the group on purpose (``setsid``) escapes all of this; containing it needs a
cgroup, which is the worker's infrastructure, not this module.

Prefect-free on purpose: the flow wraps it in a task; tests drive it directly.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jobbridge.errors import JobFailedError
from jobbridge.processes import all_procs

#: Longest piece of a line handed on at once; a longer line arrives as several pieces.
MAX_LINE_BYTES = 64 * 1024
#: How many of the last output lines an error message quotes (the result keeps ``max_lines``).
ERROR_TAIL_LINES = 20
#: Characters of one line quoted in an error message.
ERROR_LINE_CHARS = 500
#: After SIGKILL, how long to wait for the group to be gone before giving up on it.
KILL_WAIT_SECONDS = 5.0
#: How long to wait for the output readers once the group is gone (a process that escaped the group
#: may still hold the pipes open).
READER_JOIN_SECONDS = 5.0
_POLL_SECONDS = 0.05

LineSink = Callable[[str, str], None]

# The watchdog: reads "<pgid> <grace>" then blocks until "done" (the parent finished cleanly) or EOF
# (the parent died), in which case it kills the group. Run with -I -S so it starts in milliseconds.
_WATCHDOG = r"""
import os, signal, sys, time
first = sys.stdin.readline().split()
if len(first) != 2:
    sys.exit(0)
pgid, grace = int(first[0]), float(first[1])
if sys.stdin.read(4) == "done":
    sys.exit(0)

def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False

try:
    os.killpg(pgid, signal.SIGTERM)
except OSError:
    sys.exit(0)
deadline = time.monotonic() + grace
while alive() and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    os.killpg(pgid, signal.SIGKILL)
except OSError:
    pass
"""


# --------------------------------------------------------------------------------------------------
# The command line


def split_command(command: str | Sequence[str], *, shell: bool = False) -> list[str]:
    """The argv to execute: a list as given, a string split like a shell would (no shell runs),
    or with ``shell`` the string run by ``/bin/sh -c`` (pipes, globs, ``&&``)."""
    if shell:
        if not isinstance(command, str):
            raise ValueError("with shell=true, give the command as one string (it is run by /bin/sh -c)")
        return ["/bin/sh", "-c", command]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv or not argv[0]:
        raise ValueError("the command is empty")
    return argv


# --------------------------------------------------------------------------------------------------
# Output


class OutputTail:
    """The last ``max_lines`` lines of a command's output, and how many there were in all.

    A deque with a fixed length: a command that prints gigabytes costs the same memory as one that
    prints a page. Thread-safe (stdout and stderr are read by two threads).
    """

    def __init__(self, max_lines: int) -> None:
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, line: str) -> None:
        """Keep ``line`` (the oldest kept line drops out when the tail is full)."""
        with self._lock:
            self._lines.append(line)
            self.total += 1

    def lines(self) -> list[str]:
        """The kept lines, oldest first."""
        with self._lock:
            return list(self._lines)

    @property
    def truncated(self) -> bool:
        """True when earlier lines were dropped."""
        return self.total > len(self._lines)


def _decode(raw: bytes) -> str:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", errors="replace")


def _pump(pipe: IO[bytes], stream: str, sink: LineSink) -> None:
    """Hand on each line of ``pipe`` as soon as it is complete (or MAX_LINE_BYTES long)."""
    with pipe:
        for raw in iter(lambda: pipe.readline(MAX_LINE_BYTES), b""):
            sink(stream, _decode(raw))


# --------------------------------------------------------------------------------------------------
# Process groups


def group_members(pgid: int) -> list[int]:
    """Live processes of group ``pgid`` (zombies excluded: they are dead, only not yet reaped)."""
    return [proc.pid for proc in all_procs() if proc.pgrp == pgid]


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _wait_group_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def kill_group(pgid: int, grace: float) -> int:
    """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL what is left.

    Returns how many processes were alive when it started (0: nothing to do); a group that is
    already gone is not an error.
    """
    alive = len(group_members(pgid))
    if not alive:
        return 0
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group_gone(pgid, grace):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, KILL_WAIT_SECONDS)
    return alive


class Watchdog:
    """A separate process that kills the command's group if this process dies first.

    Armed with the group id once the command runs; :meth:`release` tells it all is well. If this
    process dies (or :meth:`abandon` closes the pipe without "done"), the watchdog kills the group.
    """

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()  # non-inheritable: no other child keeps it open
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int:
        """The watchdog's pid (tests check that it goes away)."""
        return self._process.pid

    def arm(self, pgid: int, grace: float) -> None:
        """Watch group ``pgid``; on this process's death it gets SIGTERM, ``grace`` s, SIGKILL."""
        os.write(self._write_end, f"{pgid} {grace}\n".encode())

    def release(self) -> None:
        """The group is gone: let the watchdog exit without killing anything."""
        self._close(b"done")

    def abandon(self) -> None:
        """Close the pipe without "done": the watchdog kills the group (what a crash would do)."""
        self._close(b"")

    def _close(self, message: bytes) -> None:
        if self._write_end < 0:
            return
        try:
            if message:
                os.write(self._write_end, message)
        finally:
            os.close(self._write_end)
            self._write_end = -1
        self._process.wait()


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class CommandOutcome:
    """What happened to one run of a command."""

    argv: list[str]
    exit_code: int | None = None
    timed_out: bool = False
    duration_seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    output_lines: int = 0
    leftover_processes: int = 0
    start_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the command ran to its end and exited 0."""
        return self.exit_code == 0 and not self.timed_out and self.start_error is None

    def describe_exit(self) -> str:
        """``exited with code 3`` / ``was killed by signal SIGSEGV`` / ``timed out`` / ``could not start``."""
        if self.start_error is not None:
            return f"could not be started: {self.start_error}"
        if self.timed_out:
            return "timed out and was killed with its process group"
        if self.exit_code is not None and self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = str(-self.exit_code)
            return f"was killed by signal {name}"
        return f"exited with code {self.exit_code}"

    def last_lines(self, count: int = ERROR_TAIL_LINES) -> str:
        """The last ``count`` output lines, each cut to a readable length, for an error message."""
        lines = [line[:ERROR_LINE_CHARS] for line in self.output[-count:]]
        return "\n".join(lines) if lines else "(no output)"

    def as_dict(self) -> dict[str, Any]:
        """The JSON result of a command job."""
        return {
            "command": self.argv,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_seconds": round(self.duration_seconds, 3),
            "output": self.output,
            "output_lines": self.output_lines,
            "output_truncated": self.output_lines > len(self.output),
            "leftover_processes": self.leftover_processes,
        }


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``; Python children write unbuffered unless told not to,
    so their lines reach the job log as they are printed rather than when a buffer fills."""
    env = {"PYTHONUNBUFFERED": "1", **os.environ}
    env.update(extra)
    return env


def run_command(
    argv: Sequence[str],
    *,
    timeout: float | None,
    max_lines: int = 1000,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = 5.0,
    on_line: LineSink | None = None,
) -> CommandOutcome:
    """Run ``argv`` in its own process group and wait for it, at most ``timeout`` seconds.

    Every output line goes to ``on_line(stream, line)`` as it arrives (``stream`` is "stdout" or
    "stderr") and into the tail kept in the outcome. Whatever happens, including an exception raised
    in this thread while waiting, the process group is gone when this returns or raises.
    """
    tail = OutputTail(max_lines)

    def sink(stream: str, line: str) -> None:
        tail.add(line)
        if on_line is not None:
            on_line(stream, line)

    outcome = CommandOutcome(argv=list(argv))
    started = time.monotonic()
    watchdog = Watchdog()
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_environment(env or {}),
            start_new_session=True,
        )
    except OSError as exc:
        watchdog.release()
        outcome.start_error = f"{argv[0]}: {exc.strerror or exc}"
        return outcome
    watchdog.arm(process.pid, grace)
    clean = False
    try:
        readers = _start_readers(process, sink)
        outcome.exit_code, outcome.timed_out = _wait(process, timeout)
        outcome.leftover_processes = _finish(process, grace, readers, timed_out=outcome.timed_out)
        clean = True
    finally:
        if clean:
            watchdog.release()
        else:
            # Interrupted (cancellation, Ctrl-C): kill the group here, and if even that is
            # interrupted the watchdog, left without "done", finishes the job.
            try:
                kill_group(process.pid, grace)
                process.wait()
            finally:
                watchdog.abandon()
    outcome.duration_seconds = time.monotonic() - started
    outcome.output = tail.lines()
    outcome.output_lines = tail.total
    return outcome


def _start_readers(process: subprocess.Popen[bytes], sink: LineSink) -> list[threading.Thread]:
    readers = []
    for stream, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
        assert pipe is not None  # both are PIPE
        reader = threading.Thread(
            target=_pump, args=(pipe, stream, sink), name=f"command-{stream}-{process.pid}", daemon=True
        )
        reader.start()
        readers.append(reader)
    return readers


def _wait(process: subprocess.Popen[bytes], timeout: float | None) -> tuple[int | None, bool]:
    """The exit code, or (None, True) when ``timeout`` passed first."""
    try:
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        return None, True


def _finish(
    process: subprocess.Popen[bytes], grace: float, readers: list[threading.Thread], *, timed_out: bool
) -> int:
    """Kill what is left of the group, reap the leader, drain the readers.

    Returns how many processes were still running after the leader exited (0 after a timeout:
    then the whole group was killed on purpose).
    """
    left = kill_group(process.pid, grace)
    process.wait()
    for reader in readers:
        reader.join(READER_JOIN_SECONDS)
    return 0 if timed_out else left


# --------------------------------------------------------------------------------------------------
# Judging the outcome


class CommandError(JobFailedError):
    """The command did not succeed."""

    def __init__(self, message: str, outcome: CommandOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.outcome))


class CommandTimeoutError(CommandError):
    """The command ran past its timeout and was killed with its process group."""


class TransientExitError(CommandError):
    """The command exited with a code listed as transient; another attempt may succeed."""


def check_outcome(outcome: CommandOutcome, *, timeout: float | None, retry_exit_codes: Sequence[int]) -> None:
    """Raise the error that ``outcome`` deserves, with the exit and the last lines; None when ok."""
    if outcome.ok:
        return
    what = outcome.describe_exit()
    if outcome.timed_out:
        what = f"timed out after {timeout:g} s and was killed with its process group"
    message = f"command {shlex.join(outcome.argv)[:300]} {what}; last output:\n{outcome.last_lines()}"
    if outcome.timed_out:
        raise CommandTimeoutError(message, outcome)
    if outcome.exit_code is not None and outcome.exit_code in retry_exit_codes:
        raise TransientExitError(message, outcome)
    raise CommandError(message, outcome)


__all__ = [
    "CommandError",
    "CommandOutcome",
    "CommandTimeoutError",
    "OutputTail",
    "TransientExitError",
    "Watchdog",
    "check_outcome",
    "child_environment",
    "group_members",
    "kill_group",
    "run_command",
    "split_command",
]
