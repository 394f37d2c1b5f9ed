"""``sync``: copy or mirror a tree between local disks, S3, Google Drive and SFTP, through rclone.

ScientistCloud's ``google_sync`` and ``rsync_transfer``. rclone does the moving (parallel transfers,
retries, multipart uploads, resuming by skipping what is already there); this flow adds what a job
needs around it: parameters checked at submission, credentials that never appear in parameters or logs
(remotes are defined in rclone's environment only), live bytes / speed / ETA in the job's progress, and,
after the transfer, ``rclone check`` so that COMPLETED means the destination holds the same content
(by hash, or by downloading both sides when they share no hash).

Mode ``copy`` adds and updates files; ``sync`` also deletes destination files that the source does not
have. ``dry_run`` lists what would be copied or deleted and changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.errors import JobFailedError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.flows.endpoints import (
    BlockName,
    S3Endpoint,
    WorkerFile,
    check_location,
    invalid,
    location_of,
    s3_for,
)
from jobbridge.registry import job_type
from jobbridge.settings import get_settings
from jobbridge.tasks.credentials import drive_access
from jobbridge.tasks.files import field_error, relative_inside
from jobbridge.tasks.locations import Location, LocationKind
from jobbridge.tasks.progress import Progress, record_result, start_progress
from jobbridge.tasks.transfer import (
    CheckResult,
    RcloneEndpoint,
    RcloneStats,
    SftpAccess,
    TransferMode,
    filter_args,
    raise_for_outcome,
    rclone_binary,
    rclone_endpoint,
    rclone_environment,
    run_check,
    run_rclone,
    transfer_argv,
)

SYNC_KINDS: tuple[LocationKind, ...] = ("local", "s3", "gdrive", "sftp")
#: Share of the job's progress bar that the transfer takes when a check follows it.
TRANSFER_SHARE = 90.0


class SyncParameters(BaseModel):
    """Parameters of a ``sync`` job."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="What to copy: a local directory, s3://bucket/prefix, gdrive://path, sftp://user@host/path."
    )
    destination: str = Field(description="Where to copy to (same forms as source).")
    mode: Literal["copy", "sync"] = Field(
        default="copy",
        description="copy: add and update files; sync: also delete destination files the source lacks.",
    )
    dry_run: bool = Field(default=False, description="List what would change; change nothing.")
    include: list[str] = Field(
        default_factory=list, description="rclone glob patterns to transfer (e.g. '*.tif', 'raw/**')."
    )
    exclude: list[str] = Field(default_factory=list, description="rclone glob patterns to skip.")
    checksum: bool = Field(
        default=True, description="After the transfer, compare source and destination file by file."
    )
    transfers: int = Field(default=4, ge=1, le=64, description="Files transferred in parallel.")
    s3_endpoint: S3Endpoint = Field(
        default=None, description="S3 endpoint URL for s3:// locations (default: JOBBRIDGE_AWS_ENDPOINT_URL)."
    )
    source_credentials_block: BlockName = Field(
        default=None,
        description="Name of an AwsCredentials block (s3://) or Secret block (gdrive://: a token or "
        "service-account JSON) for the source; default: the JOBBRIDGE_AWS_* settings.",
    )
    destination_credentials_block: BlockName = Field(
        default=None, description="The same, for the destination."
    )
    gdrive_service_account_file: WorkerFile = Field(
        default=None, description="Google service-account key file on the worker, for gdrive:// sides."
    )
    gdrive_root_folder_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_\-]{5,200}$",
        description="Drive folder id that gdrive:// paths start from.",
    )
    sftp_key_file: WorkerFile = Field(
        default=None, description="Private key file on the worker, for sftp:// sides."
    )
    sftp_known_hosts_file: WorkerFile = Field(
        default=None, description="known_hosts file to check SFTP host keys against."
    )

    @field_validator("source", "destination")
    @classmethod
    def _location(cls, value: str) -> str:
        return check_location(value, SYNC_KINDS)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or any(char in pattern for char in "\x00\n\r"):
                raise invalid(f"holds an unusable pattern {pattern!r}: give rclone globs such as '*.tif'")
        return value

    @model_validator(mode="after")
    def _sides_fit(self) -> Self:
        source, destination = self.source_location, self.destination_location
        if source.kind == "local" and not Path(source.path).is_dir():
            raise field_error("source", f"must be an existing directory: {source.path} is not", self.source)
        if source.label() == destination.label():
            raise field_error("destination", "must differ from the source", self.destination)
        if source.kind == destination.kind == "local":
            a, b = Path(source.path), Path(destination.path)
            if relative_inside(b, a) is not None or relative_inside(a, b) is not None:
                raise field_error(
                    "destination", "must not be inside the source, nor contain it", self.destination
                )
        for field, location, block in (
            ("source", source, self.source_credentials_block),
            ("destination", destination, self.destination_credentials_block),
        ):
            self._side_has_access(field, location, block)
        return self

    def _side_has_access(self, field: str, location: Location, block: str | None) -> None:
        if location.kind == "gdrive" and self.gdrive_service_account_file is None and block is None:
            raise field_error(
                field,
                "is on Google Drive, which needs credentials: set gdrive_service_account_file or "
                f"{field}_credentials_block (a Secret block holding a token or service-account JSON)",
                getattr(self, field),
            )
        if location.kind == "sftp" and self.sftp_key_file is None:
            raise field_error(field, "is an sftp:// location: set sftp_key_file", getattr(self, field))
        if block is not None and location.kind not in ("s3", "gdrive"):
            raise field_error(
                f"{field}_credentials_block", f"only applies to an s3:// or gdrive:// {field}", block
            )

    @property
    def source_location(self) -> Location:
        """The parsed source."""
        return location_of(self.source, SYNC_KINDS)

    @property
    def destination_location(self) -> Location:
        """The parsed destination."""
        return location_of(self.destination, SYNC_KINDS)


def endpoints(params: SyncParameters) -> tuple[RcloneEndpoint, RcloneEndpoint]:
    """Both rclone endpoints, with their credentials resolved now (blocks are read in the job)."""
    settings = get_settings()
    sides = (
        ("jbsrc", params.source_location, params.source_credentials_block, True),
        ("jbdst", params.destination_location, params.destination_credentials_block, False),
    )
    built = []
    for name, location, block, read_only in sides:
        drive = None
        if location.kind == "gdrive":
            drive = drive_access(
                service_account_file=params.gdrive_service_account_file,
                block=block,
                root_folder_id=params.gdrive_root_folder_id,
                read_only=read_only,
            )
        sftp = (
            SftpAccess(params.sftp_key_file, params.sftp_known_hosts_file) if params.sftp_key_file else None
        )
        s3 = s3_for(location, settings, block=block, endpoint=params.s3_endpoint)
        built.append(rclone_endpoint(location, name, s3=s3, drive=drive, sftp=sftp))
    return built[0], built[1]


class RcloneProgress(Progress):
    """Progress fed with rclone's own totals, speed and ETA (rclone discovers the total as it goes)."""

    speed: float = 0.0
    eta: float | None = None

    def update(self, stats: RcloneStats) -> None:
        """Take one stats report."""
        self.total = max(stats.total_bytes, 0)
        self.speed, self.eta = stats.speed, stats.eta
        self.advance(stats.bytes - self.done)

    def describe(self) -> str:
        """Bytes done of total, rclone's speed and ETA."""
        done, total = _human(self.done), _human(self.total)
        eta = f"ETA {self.eta:.0f} s" if self.eta is not None else "ETA -"
        return f"{done} / {total}, {_human(self.speed)}/s, {eta}"


def _human(amount: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(amount) < 1024 or unit == "TB":
            return f"{amount:.1f} {unit}" if unit != "B" else f"{int(amount)} B"
        amount /= 1024
    return f"{amount:.1f} TB"  # pragma: no cover


@task(name="rclone-transfer", cache_policy=NO_CACHE, **RETRYABLE)
def rclone_transfer(params: SyncParameters, artifact_id: UUID | None = None) -> dict[str, Any]:
    """Run ``rclone copy|sync``; a retry runs it again, which skips what already arrived.

    Not cached: the effect is on the destination, which a cached result would not recreate.
    """
    settings = get_settings()
    source, destination = endpoints(params)
    share = TRANSFER_SHARE if params.checksum and not params.dry_run else 100.0
    tracker = RcloneProgress(artifact_id, 0, high=share)
    mode: TransferMode = params.mode
    argv = transfer_argv(
        rclone_binary(settings.rclone_binary),
        mode,
        source,
        destination,
        dry_run=params.dry_run,
        filters=filter_args(params.include, params.exclude),
        transfers=params.transfers,
        stats_seconds=settings.progress_interval_seconds,
    )
    outcome = run_rclone(
        argv,
        rclone_environment([source, destination]),
        on_stats=tracker.update,
        secrets=source.secrets() + destination.secrets(),
    )
    raise_for_outcome(outcome, f"rclone {mode} {source.label} -> {destination.label}")
    tracker.finish()
    stats = outcome.stats
    result: dict[str, Any] = {
        "files": stats.transfers,
        "bytes": stats.bytes,
        "deleted": stats.deletes,
        "checked": stats.checks,
        "elapsed_seconds": round(stats.elapsed, 3),
        "bytes_per_second": round(stats.bytes / stats.elapsed) if stats.elapsed > 0 else None,
    }
    if params.dry_run:
        result["would_copy"] = [item for item in outcome.skipped if item["action"] != "delete"]
        result["would_delete"] = [item["path"] for item in outcome.skipped if item["action"] == "delete"]
        result["files"], result["bytes"] = 0, 0
        result["deleted"] = 0
    return result


@task(name="rclone-check", cache_policy=NO_CACHE, **RETRYABLE)
def rclone_check(params: SyncParameters, artifact_id: UUID | None = None) -> CheckResult:
    """Compare source and destination; differences are returned for the flow to record and fail on."""
    settings = get_settings()
    source, destination = endpoints(params)
    tracker = Progress(artifact_id, 0, unit="files", low=TRANSFER_SHARE, high=100.0)

    def on_stats(stats: RcloneStats) -> None:
        tracker.total = stats.total_checks
        tracker.advance(stats.checks - tracker.done)

    check = run_check(
        rclone_binary(settings.rclone_binary),
        source,
        destination,
        one_way=params.mode == "copy",
        filters=filter_args(params.include, params.exclude),
        on_stats=on_stats,
        stats_seconds=settings.progress_interval_seconds,
    )
    tracker.finish()
    return check


@job_type("sync", parameters=SyncParameters)
@flow(name="sync", description="Copy or sync a tree between local, S3, Google Drive and SFTP (rclone).")
def sync(
    source: str,
    destination: str,
    mode: Literal["copy", "sync"] = "copy",
    dry_run: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    checksum: bool = True,
    transfers: int = 4,
    s3_endpoint: str | None = None,
    source_credentials_block: str | None = None,
    destination_credentials_block: str | None = None,
    gdrive_service_account_file: Path | None = None,
    gdrive_root_folder_id: str | None = None,
    sftp_key_file: Path | None = None,
    sftp_known_hosts_file: Path | None = None,
) -> dict[str, Any]:
    """Transfer ``source`` to ``destination``, then (unless ``checksum=false``) verify it."""
    values = {key: value for key, value in locals().items() if value is not None}
    params = begin("sync", SyncParameters, **values)
    source_label, destination_label = params.source_location.label(), params.destination_location.label()
    verb = "Dry run of" if params.dry_run else params.mode.capitalize()
    artifact_id = start_progress(f"{verb} {source_label} -> {destination_label}")
    result: dict[str, Any] = {
        "source": source_label,
        "destination": destination_label,
        "mode": params.mode,
        "dry_run": params.dry_run,
        **rclone_transfer(params, artifact_id=artifact_id),
    }
    summary = _summary(result)
    if params.checksum and not params.dry_run:
        check = rclone_check(params, artifact_id=artifact_id)
        result["check"] = check.as_dict()
        summary = f"{summary}; {check.summary()}"
        if not check.ok:
            record_result(result, summary)
            raise JobFailedError(summary)
    record_result(result, summary)
    return result


def _summary(result: dict[str, Any]) -> str:
    if result["dry_run"]:
        return (
            f"Dry run {result['source']} -> {result['destination']}: would copy "
            f"{len(result['would_copy'])} files, delete {len(result['would_delete'])}"
        )
    return (
        f"{result['mode'].capitalize()} {result['source']} -> {result['destination']}: "
        f"{result['files']} files, {result['bytes']} bytes, {result['deleted']} deleted"
    )
