"""``backup``: copy a dataset to a backup place with a SHA-256 manifest, or restore one and verify it.

ScientistCloud's ``backup_creation``. One job type with ``action: backup | restore`` rather than two:
a restore is the same copy in the other direction plus verification, it is mirrored and listed with the
backups it belongs to, and the legacy system had no restore type to map it onto.

``action=backup`` copies the tree under ``source`` (a local directory or ``s3://bucket/prefix``) to
``destination``, hashing every file in the same pass, and writes ``<destination>.sha256`` (``sha256sum``
format, paths relative to the tree; ``manifest`` overrides the place). ``action=restore`` copies the
backup under ``source`` to ``destination``, hashing as it goes, and publishes it only if every file
matches the manifest; otherwise the job fails listing the missing, extra and changed files, and nothing is
restored. Neither leaves partial output: trees appear whole or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.errors import JobFailedError, JobValidationError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.flows.endpoints import (
    BlockName,
    S3Endpoint,
    check_location,
    location_of,
    manifest_beside,
    s3_for,
)
from jobbridge.registry import job_type
from jobbridge.settings import get_settings
from jobbridge.tasks.checksum import TreeCheck
from jobbridge.tasks.credentials import S3Access
from jobbridge.tasks.fetch import CopiedFile, copy_files, sha256_stream
from jobbridge.tasks.files import field_error, is_empty_directory, relative_inside
from jobbridge.tasks.locations import Location, LocationKind
from jobbridge.tasks.manifests import StagedManifest, load_manifest, manifest_exists, manifest_text
from jobbridge.tasks.progress import Progress, record_result, start_progress
from jobbridge.tasks.sink import open_sink
from jobbridge.tasks.sources import Source, SourceFile, open_source

BACKUP_KINDS: tuple[LocationKind, ...] = ("local", "s3")
#: At most this many paths per difference list go into the result (the counts are complete).
RESULT_LIST_LIMIT = 1000


class BackupParameters(BaseModel):
    """Parameters of a ``backup`` job."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["backup", "restore"] = Field(
        default="backup", description="backup: dataset -> backup; restore: backup -> place, verified."
    )
    source: str = Field(description="backup: the dataset (local dir or s3://); restore: the backup.")
    destination: str = Field(
        description="Where the copy goes (local dir or s3://); must be new or empty unless overwrite."
    )
    manifest: str | None = Field(
        default=None,
        description="The manifest to write (backup) or check against (restore); default: <backup>.sha256.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing destination (and manifest).")
    s3_endpoint: S3Endpoint = Field(default=None, description="S3 endpoint URL for s3:// locations.")
    source_credentials_block: BlockName = Field(
        default=None, description="AwsCredentials block for an s3:// source (default: the settings)."
    )
    destination_credentials_block: BlockName = Field(
        default=None, description="AwsCredentials block for an s3:// destination (and manifest)."
    )

    @field_validator("source", "destination")
    @classmethod
    def _location(cls, value: str) -> str:
        return check_location(value, BACKUP_KINDS)

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, value: str | None) -> str | None:
        return None if value is None else check_location(value, BACKUP_KINDS)

    @model_validator(mode="after")
    def _places_fit(self) -> Self:
        source, destination, manifest = (
            self.source_location,
            self.destination_location,
            self.manifest_location,
        )
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
        if destination.kind == "local":
            path = Path(destination.path)
            if path.is_dir() and not is_empty_directory(path) and not self.overwrite:
                raise field_error(
                    "destination",
                    f"{path} is not empty; choose a new or empty one, or set overwrite=true",
                    self.destination,
                )
        if manifest.kind == "local":
            self._local_manifest_fits(Path(manifest.path))
        return self

    def _local_manifest_fits(self, path: Path) -> None:
        if self.action == "restore":
            if not path.is_file():
                raise field_error(
                    "manifest",
                    f"the backup's manifest {path} does not exist; give it in 'manifest'",
                    str(path),
                )
            return
        destination = self.destination_location
        if destination.kind == "local" and relative_inside(path, Path(destination.path)) is not None:
            raise field_error("manifest", "must not be inside the backup it describes", str(path))
        if path.exists() and not self.overwrite:
            raise field_error("manifest", f"{path} exists; set overwrite=true to replace it", str(path))

    @property
    def source_location(self) -> Location:
        """The parsed source."""
        return location_of(self.source, BACKUP_KINDS)

    @property
    def destination_location(self) -> Location:
        """The parsed destination."""
        return location_of(self.destination, BACKUP_KINDS)

    @property
    def manifest_location(self) -> Location:
        """The manifest: as given, else beside the backup (a backup's destination, a restore's source)."""
        if self.manifest is not None:
            return location_of(self.manifest, BACKUP_KINDS)
        return manifest_beside(self.destination_location if self.action == "backup" else self.source_location)


def _access(
    params: BackupParameters, location: Location, side: Literal["source", "destination"]
) -> S3Access | None:
    block = params.source_credentials_block if side == "source" else params.destination_credentials_block
    return s3_for(location, get_settings(), block=block, endpoint=params.s3_endpoint)


@task(name="write-backup", cache_policy=NO_CACHE, **RETRYABLE)
def write_backup(params: BackupParameters, artifact_id: UUID | None = None) -> dict[str, Any]:
    """Copy the tree with hashes, stage the manifest, publish the tree, then the manifest.

    Not cached: the effect is the backup itself. A retry starts over (a failed attempt left nothing).
    """
    source_location, destination = params.source_location, params.destination_location
    manifest = params.manifest_location
    destination_s3 = _access(params, destination, "destination")
    manifest_s3 = _access(params, manifest, "destination")
    if not params.overwrite and manifest_exists(manifest, manifest_s3):
        raise JobValidationError(f"manifest {manifest.label()} exists; set overwrite=true to replace it")
    source = open_source(source_location, s3=_access(params, source_location, "source"))
    listing = source.listing()
    tracker = Progress(artifact_id, listing.bytes)
    sink = open_sink(destination, s3=destination_s3, merge=False, overwrite=params.overwrite)
    staged: StagedManifest | None = None
    try:
        copied = copy_files(source, listing.files, sink, progress=tracker.callback())
        staged = StagedManifest(manifest, manifest_s3, manifest_text((c.path, c.sha256) for c in copied))
        sink.commit()
        staged.publish()
    except BaseException:
        sink.abort()
        if staged is not None:
            staged.discard()
        raise
    tracker.finish()
    return {
        "source": source_location.label(),
        "destination": sink.url,
        "manifest": manifest.label(),
        "files": len(copied),
        "bytes": sum(c.size for c in copied),
        "skipped": listing.skipped[:RESULT_LIST_LIMIT],
    }


@task(name="restore-backup", cache_policy=NO_CACHE, **RETRYABLE)
def restore_backup(params: BackupParameters, artifact_id: UUID | None = None) -> TreeCheck:
    """Copy the backup with hashes and publish it only if it matches its manifest.

    Differences are returned, not raised: the flow records them and fails, and this task is not
    retried over them. When the listing alone shows missing or extra files, nothing is written: the
    common files are only hashed, to report the changed ones too.
    """
    source_location, destination = params.source_location, params.destination_location
    manifest = params.manifest_location
    expected = load_manifest(manifest, _access(params, manifest, "source"))
    source = open_source(source_location, s3=_access(params, source_location, "source"))
    present = {item.rel: item for item in source.listing().files}
    check = TreeCheck(path=source_location.label(), manifest=manifest.label())
    check.missing = sorted(rel for rel in expected if rel not in present)
    check.extra = sorted(rel for rel in present if rel not in expected)
    common = [present[rel] for rel in sorted(expected) if rel in present]
    tracker = Progress(artifact_id, sum(item.size for item in common))
    if check.missing or check.extra:
        digests = _hash_only(source, common, tracker)
        _compare(check, digests, expected)
        tracker.finish()
        return check
    sink = open_sink(
        destination, s3=_access(params, destination, "destination"), merge=False, overwrite=params.overwrite
    )
    try:
        _compare(check, copy_files(source, common, sink, progress=tracker.callback()), expected)
        if check.ok:
            sink.commit()
        else:
            sink.abort()
    except BaseException:
        sink.abort()
        raise
    tracker.finish()
    return check


def _hash_only(source: Source, files: list[SourceFile], tracker: Progress) -> list[CopiedFile]:
    digests = []
    for item in files:
        with source.open(item) as reader:
            digest, size = sha256_stream(reader, tracker.callback())
        digests.append(CopiedFile(item.rel, size, digest))
    return digests


def _compare(check: TreeCheck, files: list[CopiedFile], expected: dict[str, str]) -> None:
    for item in files:
        check.files += 1
        check.bytes += item.size
        if item.sha256 != expected[item.path]:
            check.changed.append(item.path)


@job_type("backup", parameters=BackupParameters)
@flow(name="backup", description="Back a dataset up with a SHA-256 manifest, or restore and verify one.")
def backup(
    source: str,
    destination: str,
    action: Literal["backup", "restore"] = "backup",
    manifest: str | None = None,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
    source_credentials_block: str | None = None,
    destination_credentials_block: str | None = None,
) -> dict[str, Any]:
    """Back ``source`` up to ``destination`` (or, with ``action=restore``, restore it from there)."""
    values = {key: value for key, value in locals().items() if value is not None}
    params = begin("backup", BackupParameters, **values)
    source_label, destination_label = params.source_location.label(), params.destination_location.label()
    verb = "Backing up" if params.action == "backup" else "Restoring"
    artifact_id = start_progress(f"{verb} {source_label} to {destination_label}")
    if params.action == "backup":
        result = {"action": "backup", **write_backup(params, artifact_id=artifact_id)}
        record_result(
            result,
            f"Backed up {result['files']} files ({result['bytes']} bytes) from {source_label} to "
            f"{result['destination']}; manifest {result['manifest']}",
        )
        return result
    check = restore_backup(params, artifact_id=artifact_id)
    result = {"action": "restore", "destination": destination_label, **check.as_dict(limit=RESULT_LIST_LIMIT)}
    if not check.ok:
        summary = f"Restore of {source_label} refused, nothing restored: {check.summary()}"
        record_result(result, summary)
        raise JobFailedError(summary)
    record_result(
        result,
        f"Restored {check.files} files ({check.bytes} bytes) to {destination_label}; {check.summary()}",
    )
    return result
