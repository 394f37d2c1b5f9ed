"""``compress``: pack a directory or file into tar.zst or tar.gz with a SHA-256 manifest.

ScientistCloud's ``data_compression``. One pass over the data: every file is read once, hashed while it
is archived, and ``<archive>.sha256`` (``sha256sum`` format) is written beside the archive, so after
unpacking, ``sha256sum -c <archive>.sha256`` (or a ``validate`` job) checks the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.errors import JobValidationError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.tasks.files import field_error, require_path
from jobbridge.tasks.pack import (
    COMPRESS_LEVELS,
    CompressFormat,
    CompressResult,
    compress_destination_problem,
    resolve_level,
    scan_source,
    write_archive,
)
from jobbridge.tasks.progress import Progress, record_result, start_progress


class CompressParameters(BaseModel):
    """Parameters of a ``compress`` job."""

    model_config = ConfigDict(extra="forbid")

    source: Path = Field(description="Directory (packed with paths relative to it) or file to pack.")
    destination: Path = Field(
        description="Archive file to write; its directory must exist, it must not be inside the "
        "source. The manifest goes beside it as <destination>.sha256."
    )
    format: CompressFormat = Field(
        default="tar.zst", description="Archive format: tar.zst (fast, multi-threaded) or tar.gz."
    )
    level: int | None = Field(
        default=None,
        description="Compression level: "
        + "; ".join(f"{fmt} {lo}..{hi} (default {d})" for fmt, (d, lo, hi) in COMPRESS_LEVELS.items()),
    )
    overwrite: bool = Field(
        default=False, description="Replace an existing archive and manifest at the destination."
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: Path) -> Path:
        return require_path(value, "any")

    @model_validator(mode="after")
    def _destination_and_level(self) -> Self:
        problem = compress_destination_problem(self.source, self.destination, overwrite=self.overwrite)
        if problem is not None:
            raise field_error("destination", problem, str(self.destination))
        try:
            resolve_level(self.format, self.level)
        except JobValidationError as error:
            raise field_error("level", str(error), self.level) from None
        return self


@task(name="pack-archive", cache_policy=NO_CACHE, **RETRYABLE)
def pack_archive(
    source: Path,
    destination: Path,
    fmt: CompressFormat = "tar.zst",
    level: int | None = None,
    overwrite: bool = False,
    artifact_id: UUID | None = None,
) -> CompressResult:
    """Scan, then pack with the manifest in one pass; progress counts the source's bytes.

    Not cached (the archive is a side effect); a retry rewrites the ``.partial`` files from scratch.
    """
    tree = scan_source(source)
    tracker = Progress(artifact_id, tree.bytes)
    result = write_archive(
        tree, destination, fmt=fmt, level=level, overwrite=overwrite, progress=tracker.callback()
    )
    tracker.finish()
    return result


@job_type("compress", parameters=CompressParameters)
@flow(name="compress", description="Pack a directory into tar.zst/tar.gz with a SHA-256 manifest.")
def compress(
    source: Path,
    destination: Path,
    format: CompressFormat = "tar.zst",
    level: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pack ``source`` into ``destination``; returns the archive, manifest, sizes and SHA-256."""
    params = begin(
        "compress",
        CompressParameters,
        source=source,
        destination=destination,
        format=format,
        level=level,
        overwrite=overwrite,
    )
    artifact_id = start_progress(f"Packing {params.source} into {params.destination}")
    packed = pack_archive(
        params.source,
        params.destination,
        fmt=params.format,
        level=params.level,
        overwrite=params.overwrite,
        artifact_id=artifact_id,
    )
    result = packed.as_dict()
    record_result(
        result,
        f"Packed {packed.files} files ({packed.bytes} bytes) into {packed.destination} "
        f"({packed.archive_bytes} bytes, sha256 {packed.archive_sha256}); "
        f"manifest {packed.manifest}",
    )
    return result
