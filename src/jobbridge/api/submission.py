"""From an upload request to an ``upload`` job, and from a job back to what the legacy client reads.

The API never runs an upload itself: every upload ends as one ``upload`` job (see
:mod:`jobbridge.flows.upload`, whose parameter names are the contract) submitted through
:func:`jobbridge.control.submit`, so it gets the same retries, progress, mirrors and UI as every job.

Secrets never become job parameters: job parameters are stored by Prefect, mirrored into DynamoDB and
MongoDB and shown in the UI. An S3 secret sent by a legacy client is put into a Prefect ``AwsCredentials``
block, whose *name* the job gets; the block is deleted once the job is over (:func:`drop_finished_blocks`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from datetime import datetime
from typing import Any

from jobbridge.api.fields import DatasetFields
from jobbridge.api.ledger import Ledger
from jobbridge.errors import JobNotFoundError, JobValidationError
from jobbridge.jobs import Job, JobStatus, utcnow
from jobbridge.settings import Settings

log = logging.getLogger("jobbridge.api.submission")

JOB_TYPE = "upload"

#: canonical status -> the upload vocabulary of ScientistCloud's API (UploadStatus), lower case.
LEGACY_STATUS: dict[JobStatus, str] = {
    JobStatus.PENDING: "queued",
    JobStatus.QUEUED: "queued",
    JobStatus.RETRYING: "queued",
    JobStatus.RUNNING: "uploading",
    JobStatus.PAUSED: "paused",
    JobStatus.CANCELLING: "cancelling",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CRASHED: "failed",
    JobStatus.CANCELLED: "cancelled",
}

#: Statuses after which a legacy client stops waiting.
FINAL_LEGACY_STATUSES = frozenset({"completed", "failed", "cancelled"})


def upload_job(fields: DatasetFields, source: str, **extra: Any) -> Job:
    """The upload job for ``source`` (None-valued extras are left out, so defaults apply)."""
    parameters = {**fields.parameters(), "source": source}
    parameters.update({key: value for key, value in extra.items() if value is not None})
    return Job(
        name=fields.dataset_name[:200],
        type=JOB_TYPE,
        parameters=parameters,
        owner=fields.user_email,
    )


def submit(job: Job, settings: Settings, idempotency_key: str | None = None) -> Job:
    """Submit through :mod:`jobbridge.control` (blocking: call it from a worker thread)."""
    from jobbridge import control

    return control.submit(job, idempotency_key=idempotency_key, settings=settings)


def estimated_duration(size: int | None) -> int:
    """ScientistCloud's estimate, which its clients show: 2 s per MB, at least a minute."""
    return max(60, int((size or 0) / 1024**2 * 2))


def submitted_response(job: Job, upload_type: str, message: str, size: int | None = None) -> dict[str, Any]:
    """What every legacy submit route returns (``upload_type`` is required by the legacy client)."""
    return {
        "job_id": job.id,
        "status": LEGACY_STATUS[job.status],
        "message": message,
        "upload_type": upload_type,
        "estimated_duration": estimated_duration(size),
        "dataset_uuid": job.parameters.get("dataset_uuid"),
    }


# --- status -----------------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def job_status(job: Job, size_hint: int | None = None, upload_id: str | None = None) -> dict[str, Any]:
    """A job as ScientistCloud's ``/api/upload/status`` returned it (``progress_percentage`` never null)."""
    result = job.result if isinstance(job.result, Mapping) else {}
    total = result.get("bytes") if job.status is JobStatus.COMPLETED else size_hint
    progress = 100.0 if job.status is JobStatus.COMPLETED else float(job.progress or 0.0)
    done = int(total * progress / 100) if isinstance(total, int) else 0
    elapsed = (utcnow() - job.started_at).total_seconds() if job.started_at else 0.0
    if job.finished_at and job.started_at:
        elapsed = (job.finished_at - job.started_at).total_seconds()
    speed = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) if isinstance(total, int) else None
    status = LEGACY_STATUS[job.status]
    eta = (
        0.0
        if status in FINAL_LEGACY_STATUSES
        else (round(remaining / speed, 1) if remaining and speed else None)
    )
    files = result.get("files") or []
    current = files[0].get("path") if files and isinstance(files[0], Mapping) else None
    moments = [m for m in (job.created_at, job.started_at, job.finished_at) if m is not None]
    return {
        "job_id": job.id,
        "status": status,
        "job_status": job.status.value,
        "progress_percentage": round(progress, 2),
        "bytes_uploaded": done,
        "bytes_total": total if isinstance(total, int) else None,
        "speed_mbps": round(speed / 1e6, 3),
        "eta_seconds": eta,
        "current_file": current or _source_name(job),
        "message": _message(job, status),
        "error": job.error,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(max(moments)),
        "upload_id": upload_id,
        "dataset_uuid": job.parameters.get("dataset_uuid"),
        "sha256": result.get("sha256"),
        "result": job.result if job.status is JobStatus.COMPLETED else None,
    }


def _source_name(job: Job) -> str | None:
    source = job.parameters.get("source")
    return str(source).rstrip("/").rsplit("/", 1)[-1] if source else None


def _message(job: Job, status: str) -> str:
    if job.status is JobStatus.COMPLETED:
        result = job.result if isinstance(job.result, Mapping) else {}
        return f"Upload completed: {result.get('file_count', 1)} file(s), {result.get('bytes', 0)} bytes"
    if job.error:
        return f"Upload {status}: {job.error}"
    return f"Upload {status} ({job.progress:.0f}%)"


def read_job(job_id: str, settings: Settings) -> Job:
    """An upload job by id; any other job type is 'not found' here."""
    from jobbridge import control

    job = control.get_job(job_id, settings=settings)
    if job.type != JOB_TYPE:
        raise JobNotFoundError(f"job {job_id} is a {job.type} job, not an upload")
    return job


def cancel_job(job_id: str, settings: Settings) -> Job:
    """Cancel an upload job (harmless when it is already cancelled)."""
    from jobbridge import control

    read_job(job_id, settings)
    return control.cancel(job_id, settings=settings)


def list_upload_jobs(
    settings: Settings, owner: str | None, status: JobStatus | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    """Upload jobs newest first, of one owner when given; the page at ``offset`` and how many were seen.

    Owner is a tag the server cannot filter on through :func:`jobbridge.control.list_jobs`, so pages of
    upload jobs are read and filtered here; ``total`` counts the matches seen up to the end of the page
    (the whole history only on the last page).
    """
    from jobbridge import control

    matches: list[Job] = []
    cursor: str | None = None
    while len(matches) < offset + limit:
        page = control.list_jobs(type=JOB_TYPE, status=status, limit=200, cursor=cursor, settings=settings)
        matches += [job for job in page if owner is None or job.owner == owner]
        cursor = page.next_cursor
        if cursor is None:
            return matches[offset : offset + limit], len(matches)
    return matches[offset : offset + limit], len(matches)


# --- secrets ----------------------------------------------------------------------------------------


def new_block_name() -> str:
    """A fresh Prefect block document name for one job's source credentials."""
    return f"jobbridge-upload-src-{uuid.uuid4().hex[:16]}"


def store_s3_credentials(
    settings: Settings, key_id: str, secret: str, region: str | None, ledger: Ledger
) -> str:
    """Save the keys as an ``AwsCredentials`` block; returns its name (the job gets only the name)."""
    from prefect_aws import AwsCredentials

    from jobbridge.runtime import prefect_api

    name = new_block_name()
    block = AwsCredentials(
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name=region or settings.aws_region,
    )
    with prefect_api(settings):
        block.save(name, overwrite=False, _sync=True)  # type: ignore[call-arg]
    ledger.add_credential_block(name, None)
    return name


def delete_block(settings: Settings, name: str) -> None:
    """Delete a credentials block (missing is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from jobbridge.runtime import prefect_api

    with prefect_api(settings), get_client(sync_client=True) as client, suppress(ObjectNotFound):
        client.delete_block_document(client.read_block_document_by_name(name, "aws-credentials").id)


def drop_job_blocks(settings: Settings, ledger: Ledger, job_id: str) -> None:
    """Delete the credentials blocks made for ``job_id`` (called once the job is seen to be over)."""
    for name, owner, _ in ledger.credential_blocks():
        if owner == job_id:
            delete_block(settings, name)
            ledger.drop_credential_block(name)


def drop_finished_blocks(settings: Settings, ledger: Ledger, grace_seconds: float = 3600.0) -> list[str]:
    """Delete the credentials blocks of jobs that are over (or that never became a job after an hour)."""
    dropped = []
    for name, job_id, created in ledger.credential_blocks():
        if job_id is None:
            if time.time() - created < grace_seconds:
                continue
        else:
            try:
                if not read_job(job_id, settings).status.is_final:
                    continue
            except JobNotFoundError:
                pass
        delete_block(settings, name)
        ledger.drop_credential_block(name)
        dropped.append(name)
    return dropped


def remote_source(source_type: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A legacy ``source_type`` + ``source_config`` as the job's ``source`` and its other parameters.

    The S3 keys are *not* returned: the caller moves them into a block first.
    """
    kind = source_type.strip().lower()
    if kind == "url":
        url = _config_text(config, "url", kind)
        if not url.lower().startswith(("http://", "https://")):
            raise JobValidationError(f"source_config.url must be an http(s) URL, got {url!r}")
        return url, {}
    if kind == "s3":
        bucket = _config_text(config, "bucket_name", kind)
        key = str(config.get("object_key") or "").lstrip("/")
        extra = {"s3_endpoint": config.get("endpoint_url") or None}
        return f"s3://{bucket}/{key}", extra
    if kind in ("google_drive", "gdrive"):
        file_id = _config_text(config, "file_id", kind)
        account = config.get("service_account_file")
        return f"gdrive://{file_id}", {"gdrive_service_account_file": account or None}
    raise JobValidationError(
        f"source_type {source_type!r} is not supported: use url, s3 or google_drive "
        "(local files go through /api/upload/upload or a chunked upload)"
    )


def _config_text(config: Mapping[str, Any], name: str, kind: str) -> str:
    value = config.get(name)
    if not isinstance(value, str) or not value.strip():
        raise JobValidationError(f"source_config.{name} is required for source_type '{kind}'")
    return value.strip()
