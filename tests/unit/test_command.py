"""The command job's pure parts: the output tail, the command line, judging an exit, its parameters."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
from prefect.states import Failed

from jobbridge.errors import JobValidationError
from jobbridge.flows.command import LineLogger, retry_transient_exit
from jobbridge.registry import get_spec
from jobbridge.tasks.command import (
    CommandError,
    CommandOutcome,
    CommandTimeoutError,
    OutputTail,
    TransientExitError,
    _decode,
    check_outcome,
    split_command,
)

# --------------------------------------------------------------------------------------------------
# Output tail


def test_tail_keeps_the_last_lines_and_counts_them_all() -> None:
    tail = OutputTail(3)
    for number in range(100_000):
        tail.add(f"line {number}")
    assert tail.lines() == ["line 99997", "line 99998", "line 99999"]
    assert tail.total == 100_000 and tail.truncated
    assert len(tail._lines) == 3  # the memory bound: never more than max_lines kept


def test_short_output_is_kept_whole() -> None:
    tail = OutputTail(5)
    tail.add("only")
    assert tail.lines() == ["only"] and tail.total == 1 and not tail.truncated


def test_a_tail_needs_room_for_one_line() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        OutputTail(0)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain\n", "plain"),
        (b"dos\r\n", "dos"),
        (b"no newline", "no newline"),
        (b"bad \xff byte\n", "bad \ufffd byte"),
    ],
)
def test_lines_are_decoded_without_their_line_ending(raw: bytes, text: str) -> None:
    assert _decode(raw) == text


def test_the_job_log_gets_at_most_max_log_lines_then_one_notice(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("jobbridge.test.command-lines")
    sink = LineLogger(logger, 3)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for number in range(10):
            sink("stdout" if number % 2 else "stderr", f"line {number}")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:3] == ["[stderr] line 0", "[stdout] line 1", "[stderr] line 2"]
    assert len(messages) == 4 and "beyond 3 lines is not sent to the job log" in messages[3]
    assert sink.seen == 10


# --------------------------------------------------------------------------------------------------
# The command line


def test_a_string_is_split_like_a_shell_would_without_running_one() -> None:
    assert split_command("grep -c 'two words' file.txt") == ["grep", "-c", "two words", "file.txt"]
    assert split_command(["echo", "a b"]) == ["echo", "a b"]


def test_shell_runs_the_string_with_sh() -> None:
    assert split_command("ls | wc -l", shell=True) == ["/bin/sh", "-c", "ls | wc -l"]
    with pytest.raises(ValueError, match="one string"):
        split_command(["ls", "|", "wc"], shell=True)


@pytest.mark.parametrize("empty", ["", "   ", []])
def test_an_empty_command_is_refused(empty: str | list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        split_command(empty)


# --------------------------------------------------------------------------------------------------
# Judging the exit


def outcome(**fields: object) -> CommandOutcome:
    base = CommandOutcome(argv=["job.sh", "--fast"], output=[f"line {n}" for n in range(30)], output_lines=30)
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_exit_zero_is_success() -> None:
    check_outcome(outcome(exit_code=0), timeout=10, retry_exit_codes=[75])


def test_a_listed_exit_code_is_transient_and_others_are_final() -> None:
    with pytest.raises(TransientExitError, match="exited with code 75"):
        check_outcome(outcome(exit_code=75), timeout=10, retry_exit_codes=[75])
    with pytest.raises(CommandError, match="exited with code 3") as caught:
        check_outcome(outcome(exit_code=3), timeout=10, retry_exit_codes=[75])
    assert not isinstance(caught.value, TransientExitError)
    message = str(caught.value)
    assert "line 29" in message and "line 10" in message and "line 9\n" not in message  # the last 20


def test_timeout_and_signals_are_described() -> None:
    with pytest.raises(
        CommandTimeoutError, match=r"timed out after 2 s and was killed with its process group"
    ):
        check_outcome(outcome(timed_out=True), timeout=2, retry_exit_codes=[])
    with pytest.raises(CommandError, match="killed by signal SIGKILL"):
        check_outcome(outcome(exit_code=-9), timeout=2, retry_exit_codes=[9])
    with pytest.raises(CommandError, match="could not be started: nope: No such file"):
        check_outcome(outcome(start_error="nope: No such file or directory"), timeout=2, retry_exit_codes=[])


def test_command_errors_survive_pickling_with_their_outcome() -> None:
    error = TransientExitError("command exited with code 75", outcome(exit_code=75))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TransientExitError and copy.outcome.exit_code == 75 and str(copy) == str(error)


def test_only_transient_exits_are_retried() -> None:
    transient = Failed(data=TransientExitError("x", outcome(exit_code=75)))
    final = Failed(data=CommandError("x", outcome(exit_code=3)))
    timeout = Failed(data=CommandTimeoutError("x", outcome(timed_out=True)))
    assert retry_transient_exit(None, None, transient)  # type: ignore[arg-type]
    assert not retry_transient_exit(None, None, final)  # type: ignore[arg-type]
    assert not retry_transient_exit(None, None, timeout)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Parameters, checked at submission


def test_command_parameters_name_the_field_at_fault(tmp_path: Path) -> None:
    spec = get_spec("command")
    cases = [
        (
            {"command": ["ls"], "shell": True},
            "parameter 'command' with shell=true, give the command as one string",
        ),
        ({"command": "ls", "cwd": str(tmp_path / "nope")}, "parameter 'cwd' must be an existing directory"),
        ({"command": "ls", "env": {"DB_PASSWORD": "x"}}, "parameter 'env' 'DB_PASSWORD' looks like a secret"),
        ({"command": "ls", "env": {"BAD-NAME": "x"}}, "parameter 'env' 'BAD-NAME' is not an environment"),
        (
            {"command": "ls", "retry_exit_codes": [0, 75]},
            r"parameter 'retry_exit_codes' \[0\] are not failure",
        ),
        ({"command": "ls", "timeout_seconds": 0}, "parameter 'timeout_seconds'"),
        ({"command": "ls", "bogus": 1}, "parameter 'bogus' is not a parameter"),
    ]
    for parameters, message in cases:
        with pytest.raises(JobValidationError, match=message):
            spec.validate_parameters(parameters)


def test_valid_command_parameters_make_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    checked = get_spec("command").validate_parameters(
        {"command": "make all", "cwd": "work", "env": {"MODE": "fast"}, "retry_exit_codes": [75, 75]}
    )
    assert checked == {
        "command": "make all",
        "cwd": str(tmp_path / "work"),
        "env": {"MODE": "fast"},
        "retry_exit_codes": [75],
    }
