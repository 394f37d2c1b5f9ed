"""Driving rclone: remotes from environment variables, copy/sync with live stats, and ``rclone check``.

Why a subprocess of our own and not rclone-python's functions (0.1.25, read from its installed source):
they build one shell string (``shell=True``) from the paths, so a user's path holding ``"$(...)"`` would
run in a shell; they take no environment, so remote credentials would have to go into this process's
``os.environ`` (visible to every thread and child) or into a config file; ``copy``/``sync`` always run
``rclone`` from PATH, ignoring ``set_executable_file``; and their stats parser drops the stats of a dry
run (logged at NOTICE, not INFO). Here rclone runs from an argv list, with the remotes defined only in the
child's environment (``RCLONE_CONFIG_<NAME>_<OPTION>``), so no secret ever appears in argv, job
parameters or logs, and the user's own rclone config file is not read (``RCLONE_CONFIG=/dev/null``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.tasks.credentials import DriveAccess, S3Access
from jobbridge.tasks.locations import Location

TransferMode = Literal["copy", "sync"]

#: Error lines kept for the job's message (rclone repeats each failure once per attempt).
MAX_ERRORS = 20
#: rclone's exit codes that retrying cannot fix: usage, directory/file not found, fatal.
USER_ERROR_CODES = {1: "usage error", 3: "directory not found", 4: "file not found", 7: "fatal error"}
_RETRY_NOISE = re.compile(r"^(Attempt \d+/\d+ failed with|Failed to [a-z]+:)")
_PLAIN_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*: )?")


class RcloneError(JobbridgeError):
    """rclone failed (a transient error: network, throttling, a server error)."""


class RcloneInputError(JobValidationError):
    """rclone refused the transfer for a reason retrying cannot fix (missing source, bad remote)."""


# --------------------------------------------------------------------------------------------------
# Remotes


@dataclass(frozen=True)
class SftpAccess:
    """How to log in to an SFTP host: a private key file (and optionally a known_hosts file)."""

    key_file: Path
    known_hosts_file: Path | None = None


@dataclass(frozen=True)
class RcloneEndpoint:
    """One side of an rclone command: its path argument and the remote's environment variables.

    ``env`` may hold secrets: it only ever goes into the child's environment (``repr`` hides it).
    """

    path: str
    label: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[str]:
        """Values that must never reach a message (keys, tokens), for :func:`scrub`."""
        return [
            value
            for name, value in self.env.items()
            if any(word in name for word in ("SECRET", "TOKEN", "CREDENTIALS")) and len(value) >= 6
        ]


def remote_env(name: str, options: Mapping[str, str]) -> dict[str, str]:
    """``RCLONE_CONFIG_<NAME>_<OPTION>`` variables that define remote ``name`` for one rclone process."""
    prefix = f"RCLONE_CONFIG_{name.upper()}_"
    return {prefix + key.upper(): value for key, value in options.items()}


def rclone_endpoint(
    location: Location,
    name: str,
    *,
    s3: S3Access | None = None,
    drive: DriveAccess | None = None,
    sftp: SftpAccess | None = None,
) -> RcloneEndpoint:
    """The rclone endpoint of ``location``; remote kinds need their access (else a clear error)."""
    label = location.label()
    if location.kind == "local":
        return RcloneEndpoint(location.path, label)
    if location.kind == "s3" and s3 is not None:
        return RcloneEndpoint(f"{name}:{location.path}", label, remote_env(name, s3.rclone_options()))
    if location.kind == "gdrive" and drive is not None:
        return RcloneEndpoint(f"{name}:{location.path}", label, remote_env(name, drive.rclone_options()))
    if location.kind == "sftp" and sftp is not None:
        options = {"type": "sftp", "host": location.host, "key_file": str(sftp.key_file)}
        if location.user:
            options["user"] = location.user
        if location.port:
            options["port"] = str(location.port)
        if sftp.known_hosts_file is not None:
            options["known_hosts_file"] = str(sftp.known_hosts_file)
        return RcloneEndpoint(f"{name}:{location.path}", label, remote_env(name, options))
    raise JobValidationError(f"{label}: no access configured for a {location.kind} location")


def rclone_environment(
    endpoints: Iterable[RcloneEndpoint], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's environment: ours, minus what breaks rclone, plus the remotes' definitions.

    ``AWS_CA_BUNDLE`` makes rclone's S3 backend fail (``LoadCustomCABundleError``) whatever its value;
    inherited ``RCLONE_CONFIG_*`` remote definitions could shadow ours, and a user's rclone.conf could
    add options to them, so neither is passed on.
    """
    env = {
        key: value
        for key, value in (os.environ if base is None else base).items()
        if key != "AWS_CA_BUNDLE" and not key.startswith("RCLONE_CONFIG")
    }
    env["RCLONE_CONFIG"] = os.devnull
    for endpoint in endpoints:
        env.update(endpoint.env)
    return env


def rclone_binary(configured: str) -> str:
    """The rclone executable to run; missing is an operator's problem, named with the fix."""
    found = shutil.which(configured)
    if found is None:
        raise RcloneInputError(
            f"rclone executable '{configured}' not found: install rclone (Debian: apt-get install rclone) "
            "or set JOBBRIDGE_RCLONE_BINARY"
        )
    return found


# --------------------------------------------------------------------------------------------------
# Command lines


def filter_args(include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """rclone ``--filter`` rules: excludes win, then includes; with any include, the rest is excluded.

    One ordered rule list instead of ``--include``/``--exclude``, which rclone warns against mixing.
    """
    args: list[str] = []
    for pattern in exclude:
        args += ["--filter", f"- {pattern}"]
    for pattern in include:
        args += ["--filter", f"+ {pattern}"]
    if include:
        args += ["--filter", "- **"]
    return args


def transfer_argv(
    binary: str,
    mode: TransferMode,
    source: RcloneEndpoint,
    destination: RcloneEndpoint,
    *,
    dry_run: bool = False,
    filters: Sequence[str] = (),
    transfers: int | None = None,
    stats_seconds: float = 0.5,
) -> list[str]:
    """``rclone copy|sync SRC DST`` with JSON logs and stats at NOTICE (no per-file INFO lines)."""
    argv = [binary, mode, source.path, destination.path, *_log_args(stats_seconds), *filters]
    if dry_run:
        argv.append("--dry-run")
    if transfers:
        argv += ["--transfers", str(transfers)]
    return argv


def check_argv(
    binary: str,
    source: RcloneEndpoint,
    destination: RcloneEndpoint,
    combined: Path,
    *,
    one_way: bool,
    download: bool = False,
    filters: Sequence[str] = (),
    stats_seconds: float = 0.5,
) -> list[str]:
    """``rclone check``, writing one ``<symbol> <path>`` line per file to ``combined``."""
    argv = [binary, "check", source.path, destination.path, "--combined", str(combined)]
    argv += [*_log_args(stats_seconds), *filters]
    if one_way:
        argv.append("--one-way")
    if download:
        argv.append("--download")
    return argv


def _log_args(stats_seconds: float) -> list[str]:
    return ["--use-json-log", "--stats", f"{stats_seconds}s", "--stats-log-level", "NOTICE"]


# --------------------------------------------------------------------------------------------------
# Reading rclone's log


@dataclass(frozen=True)
class RcloneStats:
    """One stats report: bytes done and to do, speed (bytes/s) and ETA (s), file counts."""

    bytes: int = 0
    total_bytes: int = 0
    speed: float = 0.0
    eta: float | None = None
    transfers: int = 0
    total_transfers: int = 0
    checks: int = 0
    total_checks: int = 0
    deletes: int = 0
    errors: int = 0
    elapsed: float = 0.0

    @classmethod
    def from_json(cls, stats: Mapping[str, Any]) -> RcloneStats:
        """Read rclone's ``stats`` object (missing fields are 0)."""
        eta = stats.get("eta")
        return cls(
            bytes=int(stats.get("bytes") or 0),
            total_bytes=int(stats.get("totalBytes") or 0),
            speed=float(stats.get("speed") or 0.0),
            eta=float(eta) if isinstance(eta, int | float) else None,
            transfers=int(stats.get("transfers") or 0),
            total_transfers=int(stats.get("totalTransfers") or 0),
            checks=int(stats.get("checks") or 0),
            total_checks=int(stats.get("totalChecks") or 0),
            deletes=int(stats.get("deletes") or 0),
            errors=int(stats.get("errors") or 0),
            elapsed=float(stats.get("elapsedTime") or 0.0),
        )


@dataclass(frozen=True)
class LogEvent:
    """What one line of rclone's stderr says: ``kind`` is stats, skipped, error, notice or other."""

    kind: Literal["stats", "skipped", "error", "notice", "other"]
    message: str = ""
    object: str = ""
    stats: RcloneStats | None = None
    action: str = ""
    size: int = 0


def parse_log_line(line: str) -> LogEvent:
    """Classify one stderr line. JSON lines carry level and fields; plain lines are rclone's fatal
    messages (printed before exiting, outside the JSON logger) and count as errors."""
    text = line.strip()
    if not text:
        return LogEvent("other")
    try:
        item = json.loads(text)
    except ValueError:
        return LogEvent("error", _PLAIN_LOG.sub("", text))
    if not isinstance(item, dict):
        return LogEvent("other", text)
    message = str(item.get("msg", "")).strip()
    obj = str(item.get("object", ""))
    if isinstance(item.get("stats"), dict):
        return LogEvent("stats", message, obj, stats=RcloneStats.from_json(item["stats"]))
    if item.get("skipped"):
        size = item.get("size")
        return LogEvent("skipped", message, obj, action=str(item["skipped"]), size=int(size or 0))
    level = item.get("level")
    if level in ("error", "critical"):
        return LogEvent("error", message, obj)
    if level in ("warning", "notice"):
        return LogEvent("notice", message, obj)
    return LogEvent("other", message, obj)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***`` (defence in depth for error messages)."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class RcloneOutcome:
    """What an rclone run did: final stats, the dry run's would-be actions, notices and errors."""

    returncode: int
    stats: RcloneStats = field(default_factory=RcloneStats)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def error_text(self) -> str:
        """The distinct causes, without rclone's retry bookkeeping ("Attempt 2/3 failed with ...") and
        its closing summary ("Failed to copy: ..."), which only repeat them."""
        unique = list(dict.fromkeys(self.errors))
        causes = [text for text in unique if not _RETRY_NOISE.match(text)] or unique
        return "; ".join(causes[-5:]) or f"rclone exited with code {self.returncode}"


def run_rclone(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    on_stats: Callable[[RcloneStats], None] = lambda stats: None,
    secrets: Iterable[str] = (),
    keep_skipped: int = 1000,
) -> RcloneOutcome:
    """Run rclone, feeding each stats report to ``on_stats`` as it arrives; never raises on exit code.

    The child is killed if this thread is interrupted (a cancelled job raises here), so no rclone
    outlives its job.
    """
    hidden = list(secrets)
    outcome = RcloneOutcome(returncode=-1)
    process = subprocess.Popen(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            _take(parse_log_line(line), outcome, on_stats, hidden, keep_skipped)
        outcome.returncode = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return outcome


def _take(
    event: LogEvent,
    outcome: RcloneOutcome,
    on_stats: Callable[[RcloneStats], None],
    secrets: list[str],
    keep_skipped: int,
) -> None:
    if event.kind == "stats" and event.stats is not None:
        outcome.stats = event.stats
        on_stats(event.stats)
    elif event.kind == "skipped":
        if len(outcome.skipped) < keep_skipped:
            outcome.skipped.append({"action": event.action, "path": event.object, "size": event.size})
    elif event.kind == "error":
        text = f"{event.object}: {event.message}" if event.object else event.message
        if len(outcome.errors) < MAX_ERRORS * 5:
            outcome.errors.append(scrub(text, secrets))
    elif event.kind == "notice" and len(outcome.notices) < MAX_ERRORS:
        outcome.notices.append(scrub(event.message, secrets))


def raise_for_outcome(outcome: RcloneOutcome, what: str) -> None:
    """Raise when rclone failed: user errors (missing source...) are not retried, others are."""
    if outcome.returncode == 0:
        return
    message = f"{what} failed: {outcome.error_text()}"
    if outcome.returncode in USER_ERROR_CODES:
        meaning = USER_ERROR_CODES[outcome.returncode]
        raise RcloneInputError(message if meaning in message else f"{message} ({meaning})")
    raise RcloneError(message)


# --------------------------------------------------------------------------------------------------
# Checking


@dataclass
class CheckResult:
    """``rclone check`` per file: matching, only in the source, only in the destination, different."""

    method: str
    matched: int = 0
    missing_on_destination: list[str] = field(default_factory=list)
    missing_on_source: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every file matched."""
        return not (self.missing_on_destination or self.missing_on_source or self.changed or self.errors)

    def summary(self) -> str:
        """One line for the UI and the job's error."""
        if self.ok:
            return f"check ({self.method}): all {self.matched} files match"
        return (
            f"check ({self.method}) found differences: {len(self.missing_on_destination)} missing on the "
            f"destination, {len(self.missing_on_source)} only on the destination, {len(self.changed)} "
            f"changed, {len(self.errors)} unreadable"
        )

    def as_dict(self, limit: int = 1000) -> dict[str, Any]:
        """JSON form, each list cut to ``limit`` paths."""
        lists = {
            "missing_on_destination": self.missing_on_destination,
            "missing_on_source": self.missing_on_source,
            "changed": self.changed,
            "errors": self.errors,
        }
        return {
            "ok": self.ok,
            "method": self.method,
            "matched": self.matched,
            **{name: values[:limit] for name, values in lists.items()},
            "truncated": any(len(values) > limit for values in lists.values()),
        }


def parse_combined(text: str, method: str) -> CheckResult:
    """Read ``rclone check --combined`` output: ``= path``, ``+`` source only, ``-`` destination
    only, ``*`` different, ``!`` unreadable."""
    result = CheckResult(method)
    targets = {
        "+": result.missing_on_destination,
        "-": result.missing_on_source,
        "*": result.changed,
        "!": result.errors,
    }
    for line in text.splitlines():
        symbol, _, path = line.partition(" ")
        if symbol == "=":
            result.matched += 1
        elif symbol in targets:
            targets[symbol].append(path)
    return result


def run_check(
    binary: str,
    source: RcloneEndpoint,
    destination: RcloneEndpoint,
    *,
    one_way: bool,
    filters: Sequence[str] = (),
    on_stats: Callable[[RcloneStats], None] = lambda stats: None,
    stats_seconds: float = 0.5,
) -> CheckResult:
    """Compare source and destination by hash; when they share no hash (say local and SFTP without
    md5sum), compare by downloading both, so that a "match" always means the content matched."""
    env = rclone_environment([source, destination])
    secrets = source.secrets() + destination.secrets()
    for download in (False, True):
        with tempfile.TemporaryDirectory(prefix="jobbridge-check-") as scratch:
            combined = Path(scratch) / "combined"
            argv = check_argv(
                binary,
                source,
                destination,
                combined,
                one_way=one_way,
                download=download,
                filters=filters,
                stats_seconds=stats_seconds,
            )
            outcome = run_rclone(argv, env, on_stats=on_stats, secrets=secrets)
            text = combined.read_text(errors="replace") if combined.exists() else None
        if text is None or (outcome.returncode != 0 and not _has_differences(text)):
            raise_for_outcome(outcome, "rclone check")
            raise RcloneError(f"rclone check failed: {outcome.error_text()}")
        no_common_hash = any("No common hash" in notice for notice in outcome.notices)
        if download or not no_common_hash:
            return parse_combined(text, "download" if download else "hash")
    raise AssertionError("unreachable")  # pragma: no cover


def _has_differences(combined: str) -> bool:
    return any(line[:1] in "+-*!" for line in combined.splitlines() if line)
