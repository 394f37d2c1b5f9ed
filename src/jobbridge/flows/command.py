"""``command``: run a command with a timeout, its output streamed into the job log (Delphi's handlers).

Delphi's poller ran each job as a subprocess with a per-job timeout, retried transient failures, logged
``[stdout] ...`` lines and kept the last lines of output. Here that is one retryable task around
:func:`jobbridge.tasks.command.run_command`: the command runs in a process group of its own, watched by a
watchdog, so a timeout, a cancellation or even a SIGKILL of the flow-run process leaves nothing running.

Only exit codes listed in ``retry_exit_codes`` are retried (Prefect task retries): any other failure
would only fail again. The result (exit code, last ``max_output_lines`` lines) is recorded whether the
command succeeded or not, so a failed job still shows what the command printed.
"""

from __future__ import annotations

import logging
import re
import shlex
import threading
from pathlib import Path
from typing import Any, Self

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.tasks.command import (
    CommandError,
    CommandOutcome,
    TransientExitError,
    check_outcome,
    run_command,
    split_command,
)
from jobbridge.tasks.files import field_error, require_path
from jobbridge.tasks.progress import record_result
from jobbridge.tasks.retries import TASK_RETRY_DELAYS

#: Delphi's per-job default (``timeout_seconds`` 14400 in its queue records).
DEFAULT_TIMEOUT_SECONDS = 14400.0
DEFAULT_MAX_OUTPUT_LINES = 1000
DEFAULT_MAX_LOG_LINES = 100_000

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names that usually hold secrets: parameters are stored in plain text in Prefect's database and
# shown in its UI, so secrets belong in the worker's environment or a Prefect Secret block.
_SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY", re.I)


def _invalid(reason: str) -> PydanticCustomError:
    """A field error whose text is ``reason`` as written (no "Value error, " prefix)."""
    return PydanticCustomError("command", "{reason}", {"reason": reason})


class CommandParameters(BaseModel):
    """Parameters of a ``command`` job."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] | str = Field(
        description="The program and its arguments as a list, or one string split like a shell "
        "would (no shell runs unless shell=true)."
    )
    shell: bool = Field(
        default=False, description="Run the command string with /bin/sh -c (pipes, globs, &&)."
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        le=7 * 86400,
        description="Per attempt. Past it the command and everything it started are killed "
        "(SIGTERM, kill_grace_seconds, SIGKILL) and the job fails.",
    )
    cwd: Path | None = Field(default=None, description="Working directory (must exist).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables (non-secret: parameters are stored in plain text). "
        "The command also inherits the worker's environment.",
    )
    max_output_lines: int = Field(
        default=DEFAULT_MAX_OUTPUT_LINES,
        ge=1,
        le=100_000,
        description="How many of the last output lines the result keeps (all lines go to the job log).",
    )
    max_log_lines: int = Field(
        default=DEFAULT_MAX_LOG_LINES,
        ge=0,
        le=10_000_000,
        description="Output lines sent to the job log, per attempt; beyond them lines are only counted "
        "(and the last max_output_lines kept), so an endless printer cannot flood Prefect's database.",
    )
    retry_exit_codes: list[int] = Field(
        default_factory=list,
        description="Exit codes that mean 'try again' (e.g. 75, EX_TEMPFAIL); others fail at once.",
    )
    max_retries: int = Field(
        default=len(TASK_RETRY_DELAYS),
        ge=0,
        le=10,
        description="Attempts after the first, for the exit codes in retry_exit_codes.",
    )
    kill_grace_seconds: float = Field(
        default=5.0, ge=0, le=300, description="Between SIGTERM and SIGKILL when the command is stopped."
    )

    @field_validator("cwd")
    @classmethod
    def _cwd_is_a_directory(cls, value: Path | None) -> Path | None:
        return None if value is None else require_path(value, "dir")

    @field_validator("env")
    @classmethod
    def _env_is_plain(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name):
                raise _invalid(f"'{name}' is not an environment variable name (letters, digits, '_')")
            if _SECRET_NAME.search(name):
                raise _invalid(
                    f"'{name}' looks like a secret; parameters are stored and shown in plain text, so "
                    "set it in the worker's environment or a Prefect Secret block instead"
                )
            if "\0" in text:
                raise _invalid(f"the value of '{name}' holds a NUL character")
        return value

    @field_validator("retry_exit_codes")
    @classmethod
    def _exit_codes(cls, value: list[int]) -> list[int]:
        bad = [code for code in value if not 1 <= code <= 255]
        if bad:
            raise _invalid(f"{bad} are not failure exit codes: use 1..255")
        return sorted(set(value))

    @model_validator(mode="after")
    def _command_runs(self) -> Self:
        try:
            split_command(self.command, shell=self.shell)
        except ValueError as error:
            raise field_error("command", str(error), self.command) from None
        return self

    @property
    def argv(self) -> list[str]:
        """The argv that runs."""
        return split_command(self.command, shell=self.shell)


class LineLogger:
    """Sends output lines to the job log as ``[stdout] ...`` / ``[stderr] ...``, at most ``limit``.

    Why a limit: log lines wait in memory until Prefect's log worker ships them and then live in
    Prefect's database, so a command that prints without end would otherwise grow both without bound.
    """

    def __init__(self, logger: logging.LoggerAdapter[logging.Logger] | logging.Logger, limit: int) -> None:
        self.logger = logger
        self.limit = limit
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, stream: str, line: str) -> None:
        with self._lock:
            number = self.seen
            self.seen += 1
        if number < self.limit:
            self.logger.info("[%s] %s", stream, line)
        elif number == self.limit:
            self.logger.warning(
                "output beyond %d lines is not sent to the job log (max_log_lines); "
                "the result keeps the last lines",
                self.limit,
            )


def retry_transient_exit(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry condition: only an exit code listed in ``retry_exit_codes`` earns another attempt."""
    return isinstance(state.data, TransientExitError)


def _retry_delays(retries: int) -> list[float]:
    """jobbridge's usual delays (1 s, then 5 s), the last one repeated for further retries."""
    return [float(TASK_RETRY_DELAYS[min(i, len(TASK_RETRY_DELAYS) - 1)]) for i in range(retries)]


@task(name="run-command", cache_policy=NO_CACHE, **{**RETRYABLE, "retry_condition_fn": retry_transient_exit})
def run_step(
    argv: list[str],
    timeout_seconds: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    max_output_lines: int = DEFAULT_MAX_OUTPUT_LINES,
    retry_exit_codes: list[int] | None = None,
    kill_grace_seconds: float = 5.0,
    max_log_lines: int = DEFAULT_MAX_LOG_LINES,
) -> CommandOutcome:
    """One attempt: run the command, log every line as ``[stdout] ...``/``[stderr] ...``, judge the exit.

    Not cached: running a command is the side effect.
    """
    logger = get_run_logger()
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context else 1
    logger.info("Executing command: %s (attempt %d)", shlex.join(argv), attempt)
    outcome = run_command(
        argv,
        timeout=timeout_seconds,
        max_lines=max_output_lines,
        cwd=cwd,
        env=env,
        grace=kill_grace_seconds,
        on_line=LineLogger(logger, max_log_lines),
    )
    logger.info("command %s after %.1f s", outcome.describe_exit(), outcome.duration_seconds)
    if outcome.leftover_processes:
        logger.warning("the command left %d processes running; they were stopped", outcome.leftover_processes)
    check_outcome(outcome, timeout=timeout_seconds, retry_exit_codes=retry_exit_codes or [])
    return outcome


@job_type("command", parameters=CommandParameters)
@flow(name="command", description="Run a command with a timeout; its output streams into the job log.")
def command(
    command: list[str] | str,
    shell: bool = False,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    max_output_lines: int = DEFAULT_MAX_OUTPUT_LINES,
    max_log_lines: int = DEFAULT_MAX_LOG_LINES,
    retry_exit_codes: list[int] | None = None,
    max_retries: int = len(TASK_RETRY_DELAYS),
    kill_grace_seconds: float = 5.0,
) -> dict[str, Any]:
    """Run the command; returns its exit code and last output lines (recorded on failure too)."""
    params = begin(
        "command",
        CommandParameters,
        command=command,
        shell=shell,
        timeout_seconds=timeout_seconds,
        cwd=cwd,
        env=env or {},
        max_output_lines=max_output_lines,
        max_log_lines=max_log_lines,
        retry_exit_codes=retry_exit_codes or [],
        max_retries=max_retries,
        kill_grace_seconds=kill_grace_seconds,
    )
    step = run_step.with_options(
        retries=params.max_retries, retry_delay_seconds=_retry_delays(params.max_retries)
    )
    try:
        outcome = step(
            params.argv,
            params.timeout_seconds,
            cwd=params.cwd,
            env=params.env,
            max_output_lines=params.max_output_lines,
            retry_exit_codes=params.retry_exit_codes,
            kill_grace_seconds=params.kill_grace_seconds,
            max_log_lines=params.max_log_lines,
        )
    except CommandError as error:
        record_result(error.outcome.as_dict(), str(error).splitlines()[0])
        raise
    result = outcome.as_dict()
    record_result(result, f"command {outcome.describe_exit()} after {outcome.duration_seconds:.1f} s")
    return result
