"""``extract``: unpack an archive into a directory, safely (ScientistCloud's ``file_extraction``).

Formats are recognised by content (zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst). Members that would escape
the destination, special files and archives past the size or member caps fail the job without retries and
without leaving partial output. Run it with ``prefect deployment run extract/jobbridge --param
source=... --param destination=...`` or ``jobbridge submit extract --param source=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.tasks.files import field_error, require_path
from jobbridge.tasks.progress import Progress, record_result, start_progress
from jobbridge.tasks.unpack import (
    ARCHIVE_FORMATS,
    ExtractResult,
    detect_format,
    extract_archive,
    extract_destination_problem,
)


class ExtractParameters(BaseModel):
    """Parameters of an ``extract`` job."""

    model_config = ConfigDict(extra="forbid")

    source: Path = Field(
        description=f"The archive to unpack; one of {', '.join(ARCHIVE_FORMATS)}, recognised by "
        "its content, not its name. It is only read."
    )
    destination: Path = Field(
        description="Directory to unpack into. It must not exist or be empty (unless overwrite); "
        "its parent must exist. It appears only once the whole archive has unpacked."
    )
    overwrite: bool = Field(
        default=False,
        description="Replace a non-empty destination directory (after the archive has unpacked).",
    )
    max_total_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Refuse archives that unpack to more bytes than this "
        "(default: JOBBRIDGE_EXTRACT_MAX_TOTAL_BYTES, 64 GiB).",
    )
    max_members: int | None = Field(
        default=None,
        gt=0,
        description="Refuse archives with more members than this "
        "(default: JOBBRIDGE_EXTRACT_MAX_MEMBERS, 1,000,000).",
    )

    @field_validator("source")
    @classmethod
    def _source_is_a_file(cls, value: Path) -> Path:
        return require_path(value, "file")

    @model_validator(mode="after")
    def _destination_can_receive(self) -> Self:
        problem = extract_destination_problem(self.destination, overwrite=self.overwrite)
        if problem is not None:
            raise field_error("destination", problem, str(self.destination))
        return self


# Tasks are not cached: their effect is on the filesystem, which a cached result would not recreate.


@task(name="detect-archive-format", cache_policy=NO_CACHE, **RETRYABLE)
def detect_archive_format(source: Path) -> str:
    """Read the archive's first bytes: an unknown format fails the job before anything is written."""
    return detect_format(source)


@task(name="unpack-archive", cache_policy=NO_CACHE, **RETRYABLE)
def unpack_archive(
    source: Path,
    destination: Path,
    overwrite: bool = False,
    max_total_bytes: int | None = None,
    max_members: int | None = None,
    artifact_id: UUID | None = None,
) -> ExtractResult:
    """Unpack into a staging directory renamed into place: safe to retry, nothing is half-written."""
    tracker = Progress(artifact_id, source.stat().st_size)
    result = extract_archive(
        source,
        destination,
        max_total_bytes=max_total_bytes,
        max_members=max_members,
        overwrite=overwrite,
        progress=tracker.callback(),
    )
    tracker.finish()
    return result


@job_type("extract", parameters=ExtractParameters)
@flow(name="extract", description="Unpack an archive (zip, tar, tar.gz/bz2/xz/zst) safely.")
def extract(
    source: Path,
    destination: Path,
    overwrite: bool = False,
    max_total_bytes: int | None = None,
    max_members: int | None = None,
) -> dict[str, Any]:
    """Unpack ``source`` into ``destination``; returns destination, format, members and bytes."""
    params = begin(
        "extract",
        ExtractParameters,
        source=source,
        destination=destination,
        overwrite=overwrite,
        max_total_bytes=max_total_bytes,
        max_members=max_members,
    )
    artifact_id = start_progress(f"Unpacking {params.source.name} into {params.destination}")
    archive_format = detect_archive_format(params.source)
    unpacked = unpack_archive(
        params.source,
        params.destination,
        overwrite=params.overwrite,
        max_total_bytes=params.max_total_bytes,
        max_members=params.max_members,
        artifact_id=artifact_id,
    )
    result = unpacked.as_dict()
    record_result(
        result,
        f"Unpacked {unpacked.members} members ({unpacked.bytes} bytes) from {archive_format} "
        f"archive {params.source} into {unpacked.destination}",
    )
    return result
