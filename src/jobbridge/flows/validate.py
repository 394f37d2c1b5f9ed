"""``validate``: check a directory tree against a SHA-256 manifest, or write one.

ScientistCloud's ``data_validation``. The manifest is ``sha256sum`` format with paths relative to the
tree, so it can come from ``sha256sum``, from a ``compress`` job, or from this job with ``create=true``.
Differences fail the job (:class:`~jobbridge.errors.JobFailedError`, not retried: hashing again would
find the same), after the result listing them has been recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.errors import JobFailedError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.tasks.checksum import (
    ManifestWritten,
    TreeCheck,
    TreeFile,
    compare_tree,
    create_manifest,
    list_files,
    manifest_exclusions,
    read_manifest,
)
from jobbridge.tasks.files import field_error, path_problem, require_new_path, require_path
from jobbridge.tasks.progress import Progress, record_result, start_progress

#: At most this many paths per list (missing, extra, changed) go into the job's result; the
#: ``differences`` counts are always complete.
RESULT_LIST_LIMIT = 1000


class ValidateParameters(BaseModel):
    """Parameters of a ``validate`` job."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="Root directory of the tree to check (or to describe).")
    manifest: Path = Field(
        description="Manifest in sha256sum format ('<hex>  <relative path>' lines). It may live "
        "inside the tree; it is then not counted as an extra file."
    )
    create: bool = Field(
        default=False,
        description="Write a manifest of the tree to 'manifest' instead of checking against it.",
    )
    overwrite: bool = Field(default=False, description="With create: replace an existing manifest.")

    @field_validator("path")
    @classmethod
    def _path_is_a_directory(cls, value: Path) -> Path:
        return require_path(value, "dir")

    @model_validator(mode="after")
    def _manifest_fits_the_mode(self) -> Self:
        if self.create:
            require_new_path(self.manifest, overwrite=self.overwrite, field="manifest")
        else:
            problem = path_problem(self.manifest, "file")
            if problem is not None:
                raise field_error("manifest", f"must be an existing file: {problem}", str(self.manifest))
        return self


def _bytes_of(files: Mapping[str, TreeFile]) -> int:
    return sum(info.size for info in files.values())


@task(name="check-tree", cache_policy=NO_CACHE, **RETRYABLE)
def check_tree(path: Path, manifest: Path, artifact_id: UUID | None = None) -> TreeCheck:
    """Compare the tree with its manifest. Differences are returned, not raised: the flow records
    them and then fails, so this task never retries a comparison that would only find them again.

    Not cached: the answer depends on the files' content now, not on the arguments.
    """
    expected = read_manifest(manifest)
    present = list_files(path, exclude=manifest_exclusions(path, manifest))
    tracker = Progress(artifact_id, _bytes_of({r: present[r] for r in expected if r in present}))
    check = compare_tree(path, manifest, expected, present, progress=tracker.callback())
    tracker.finish()
    return check


@task(name="write-tree-manifest", cache_policy=NO_CACHE, **RETRYABLE)
def write_tree_manifest(
    path: Path, manifest: Path, overwrite: bool = False, artifact_id: UUID | None = None
) -> ManifestWritten:
    """Hash every file of the tree and write its manifest (atomically: ``.partial`` + rename)."""
    present = list_files(path, exclude=manifest_exclusions(path, manifest))
    tracker = Progress(artifact_id, _bytes_of(present))
    written = create_manifest(
        path, manifest, overwrite=overwrite, progress=tracker.callback(), present=present
    )
    tracker.finish()
    return written


@job_type("validate", parameters=ValidateParameters)
@flow(name="validate", description="Check a tree against a SHA-256 manifest, or write one.")
def validate(path: Path, manifest: Path, create: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Verify (or with ``create``, write) the manifest of the tree under ``path``."""
    params = begin(
        "validate",
        ValidateParameters,
        path=path,
        manifest=manifest,
        create=create,
        overwrite=overwrite,
    )
    action = "Writing the manifest of" if params.create else "Checking"
    artifact_id = start_progress(f"{action} {params.path} ({params.manifest})")
    if params.create:
        return _create(params, artifact_id)
    check = check_tree(params.path, params.manifest, artifact_id=artifact_id)
    result = {"mode": "verify", **check.as_dict(limit=RESULT_LIST_LIMIT)}
    record_result(result, check.summary())
    if not check.ok:
        raise JobFailedError(check.summary())
    return result


def _create(params: ValidateParameters, artifact_id: UUID) -> dict[str, Any]:
    written = write_tree_manifest(
        params.path, params.manifest, overwrite=params.overwrite, artifact_id=artifact_id
    )
    result = {"mode": "create", **written.as_dict(), "ok": True}
    record_result(
        result,
        f"Wrote {written.manifest}: {written.files} files, {written.bytes} bytes under {params.path}",
    )
    return result
