"""The upload routes: chunked and resumable uploads, remote sources, status, cancel and listing.

A chunked upload is ``POST /api/upload/initiate`` (file name and size) -> ``PUT
/api/upload/{id}/chunk/{n}`` for every chunk, in any order and in parallel, each with its SHA-256 in
``X-Chunk-SHA256`` -> ``POST /api/upload/{id}/complete``, which checks the whole file's SHA-256 and
submits the ``upload`` job. ``GET /api/upload/{id}`` says which chunks arrived, so an interrupted client
sends only the rest. ``/initiate`` with a ``source_type`` (url, s3, google_drive) submits the job at
once, as ScientistCloud's API did. Status, cancel and listing answer in ScientistCloud's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from jobbridge.api import submission
from jobbridge.api.deps import blocking, get_settings, get_store
from jobbridge.api.errors import ChunkRejectedError
from jobbridge.api.fields import DatasetFields, read_fields, read_sha256
from jobbridge.api.ledger import CANCELLED, RECEIVING, VERIFIED, UploadRecord
from jobbridge.api.names import parse_upload_id
from jobbridge.api.staging import UploadStore
from jobbridge.api.streaming import pump, stream_slots
from jobbridge.errors import JobValidationError
from jobbridge.jobs import JobStatus
from jobbridge.settings import Settings

router = APIRouter(prefix="/api/upload", tags=["upload"])
Store = Annotated[UploadStore, Depends(get_store)]
AppSettings = Annotated[Settings, Depends(get_settings)]
UploadId = Annotated[str, Path(description="The upload id that /initiate returned (a UUID).")]

#: How long one ``complete`` call waits for the whole-file hash before answering 202 (ask again).
COMPLETE_WAIT_SECONDS = 20.0
CHUNK_HEADER = "X-Chunk-SHA256"


class InitiateRequest(BaseModel):
    """``/initiate``: a chunked upload (filename, size) or a remote source (source_type, source_config)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    filename: str | None = Field(default=None, description="Chunked upload: the file's name (no path).")
    size: int | None = Field(default=None, ge=0, validation_alias="file_size", description="Bytes.")
    sha256: str | None = Field(default=None, description="Optional SHA-256 of the whole file (checked).")
    chunk_size: int | None = Field(default=None, description="Optional chunk size (1 MiB - 5 GiB).")
    source_type: str | None = Field(default=None, description="url, s3 or google_drive: a remote source.")
    source_config: dict[str, Any] | None = Field(
        default=None,
        description="{url} / {bucket_name, object_key, access_key_id, secret_access_key} / "
        "{file_id, service_account_file}. S3 keys go into a Prefect block, never into the job.",
    )
    user_email: str
    dataset_name: str
    sensor: str
    convert: bool = True
    is_public: bool = False
    folder: str | None = None
    team_uuid: str | None = None
    dataset_uuid: str | None = None
    dataset_identifier: str | None = None
    add_to_existing: bool = False


class CompleteRequest(BaseModel):
    """``/complete``: optionally the whole file's SHA-256, checked against the assembled file."""

    sha256: str | None = None


def _field_values(body: InitiateRequest) -> dict[str, Any]:
    return body.model_dump(exclude={"source_config"})


# --- initiate ------------------------------------------------------------------------------------


@router.post("/initiate", summary="Start a chunked upload, or an upload from a URL, S3 or Google Drive")
async def initiate(body: InitiateRequest, store: Store, settings: AppSettings) -> dict[str, Any]:
    """Chunked: returns ``upload_id``, ``chunk_size`` and ``chunk_count``. Remote: returns the job."""
    fields = read_fields(_field_values(body))
    if body.source_type and body.source_type.lower() not in ("local", "chunked"):
        return await _remote(body, fields, store, settings)
    if body.filename is None or body.size is None:
        raise JobValidationError(
            "a chunked upload needs filename and size (bytes); "
            "an upload from a URL, S3 or Google Drive needs source_type and source_config"
        )
    expected = read_sha256(body.sha256)
    record = await blocking(
        store.create,
        body.filename,
        body.size,
        fields.as_metadata(),
        chunk_size=body.chunk_size,
        expected_sha256=expected,
    )
    return {
        "upload_id": record.upload_id,
        "status": "initiated",
        "upload_type": "chunked",
        "message": f"Chunked upload initiated: {record.filename}, {record.chunk_count} chunks",
        "filename": record.filename,
        "size": record.size,
        "chunk_size": record.chunk_size,
        "chunk_count": record.chunk_count,
        "total_chunks": record.chunk_count,
        "chunk_header": CHUNK_HEADER,
        "dataset_uuid": fields.dataset_uuid,
        "job_id": None,
        "expires_at": store.describe(record.upload_id)["expires_at"],
    }


async def _remote(
    body: InitiateRequest, fields: DatasetFields, store: UploadStore, settings: Settings
) -> dict[str, Any]:
    """Submit an upload job for a remote source; an S3 secret goes into a block first."""
    config = body.source_config or {}
    source, extra = submission.remote_source(body.source_type or "", config)
    block = None
    key_id, secret = config.get("access_key_id"), config.get("secret_access_key")
    if source.startswith("s3://") and key_id and secret:
        block = await blocking(
            submission.store_s3_credentials,
            settings,
            str(key_id),
            str(secret),
            config.get("region_name"),
            store.ledger,
        )
    job = submission.upload_job(fields, source, source_credentials_block=block, **extra)
    try:
        job = await blocking(submission.submit, job, settings)
    except BaseException:
        if block:
            await blocking(submission.delete_block, settings, block)
            store.ledger.drop_credential_block(block)
        raise
    if block:
        store.ledger.add_credential_block(block, job.id)
    response = submission.submitted_response(job, "standard", f"Upload job initiated for {body.source_type}")
    return {**response, "source_type": body.source_type}


# --- chunks --------------------------------------------------------------------------------------


@router.put(
    "/{upload_id}/chunk/{n}",
    summary="Send one chunk (raw body; its SHA-256 in X-Chunk-SHA256)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_chunk(
    upload_id: UploadId,
    n: Annotated[int, Path(ge=0, description="Chunk number, from 0.")],
    request: Request,
    store: Store,
    chunk_sha256: Annotated[str | None, Header(alias=CHUNK_HEADER)] = None,
    content_length: Annotated[int | None, Header()] = None,
) -> Any:
    """Streams the chunk to its place in the staged file; counts it only if whole and matching."""
    upload_id = parse_upload_id(upload_id)
    expected = read_sha256(chunk_sha256, CHUNK_HEADER)
    if expected is None:
        raise ChunkRejectedError(f"the {CHUNK_HEADER} header (the chunk's SHA-256, hex) is required")
    writer = await blocking(store.begin_chunk, upload_id, n, content_length)
    try:
        async with stream_slots():
            await pump(request.stream(), writer)
        return await blocking(writer.finish, expected)
    except ClientDisconnect:
        return JSONResponse({"detail": f"chunk {n}: the client went away; nothing was kept"}, status_code=400)
    finally:
        await blocking(writer.close)


@router.post("/{upload_id}/complete", summary="Check the file's SHA-256 and submit its upload job")
async def complete(
    upload_id: UploadId,
    store: Store,
    settings: AppSettings,
    body: Annotated[CompleteRequest | None, Body()] = None,
) -> Any:
    """200 with the job once verified (repeating it returns the same job); 202 while still hashing."""
    declared = read_sha256(body.sha256 if body else None)
    outcome = await blocking(store.verify, upload_id, declared, COMPLETE_WAIT_SECONDS)
    if isinstance(outcome, dict):
        left = outcome["size"] - outcome["hashed_bytes"]
        message = f"still hashing ({left} bytes to go): call complete again"
        return JSONResponse({**outcome, "status": "verifying", "message": message}, status_code=202)
    return await submit_staged(outcome, store, settings, "chunked")


async def submit_staged(
    record: UploadRecord, store: UploadStore, settings: Settings, upload_type: str
) -> dict[str, Any]:
    """Submit (once: the upload id is the idempotency key) the job that moves a verified staged file.

    Asked again once the job exists, it answers with that job: the staged file may be gone by then.
    """
    if record.job_id:
        job = await blocking(submission.read_job, record.job_id, settings)
    else:
        fields = DatasetFields.from_metadata(record.metadata)
        job = submission.upload_job(
            fields, str(store.data_path(record)), expected_sha256=record.sha256, move_source=True
        )
        job = await blocking(submission.submit, job, settings, f"jobbridge-upload-{record.upload_id}")
        await blocking(store.attach_job, record.upload_id, job.id)
    response = submission.submitted_response(
        job, upload_type, f"Upload of {record.filename} verified; job submitted", record.size
    )
    return {**response, "upload_id": record.upload_id, "sha256": record.sha256, "size": record.size}


# --- status, cancel, list -----------------------------------------------------------------------


def _upload_status(info: dict[str, Any]) -> dict[str, Any]:
    """An upload that has no job yet, in the shape of a job's status."""
    state = info["state"]
    status = {RECEIVING: "uploading" if info["chunks_received"] else "queued", VERIFIED: "verifying"}.get(
        state, state
    )
    size = info["size"] or 0
    progress = 100.0 * info["bytes_received"] / size if size else 0.0
    return {
        "job_id": info["upload_id"],
        "status": status,
        "job_status": None,
        "progress_percentage": round(progress, 2),
        "bytes_uploaded": info["bytes_received"],
        "bytes_total": size,
        "speed_mbps": info["speed_mbps"],
        "eta_seconds": info["eta_seconds"],
        "current_file": info["filename"],
        "message": f"received {info['chunks_received']} of {info['chunk_count']} chunks",
        "error": None,
        "created_at": info["created_at"],
        "updated_at": info["updated_at"],
        "upload_id": info["upload_id"],
        "dataset_uuid": None,
        "sha256": info["sha256"],
        "result": None,
    }


def _status(job_id: str, store: UploadStore, settings: Settings) -> dict[str, Any]:
    record = _record_of(store, job_id)
    if record is not None and record.job_id is None:
        return _upload_status(store.describe(record.upload_id))
    if record is not None and record.job_id:
        job_id = record.job_id
    job = submission.read_job(job_id, settings)
    if job.status.is_final:
        submission.drop_job_blocks(settings, store.ledger, job.id)
    record = record or store.by_job(job.id)
    return submission.job_status(job, record.size if record else None, record.upload_id if record else None)


def _record_of(store: UploadStore, some_id: str) -> UploadRecord | None:
    """The upload whose id this is, if it is an upload id the store knows."""
    try:
        return store.ledger.get(parse_upload_id(some_id))
    except JobValidationError:
        return None


@router.get("/status/{job_id}", summary="An upload job's status (ScientistCloud's shape)")
async def status(
    job_id: Annotated[str, Path(description="A job id, or an upload id.")],
    store: Store,
    settings: AppSettings,
) -> dict[str, Any]:
    """``status`` lower case (completed, failed, cancelled end a wait); ``progress_percentage`` never null."""
    return await blocking(_status, job_id, store, settings)


def _cancel(some_id: str, store: UploadStore, settings: Settings) -> dict[str, Any]:
    record = _record_of(store, some_id)
    if record is not None:
        record = store.cancel(record.upload_id)
        if record.job_id:
            job = submission.cancel_job(record.job_id, settings)
            return {
                "message": f"Upload job {job.id} cancelled",
                "job_id": job.id,
                "upload_id": record.upload_id,
                "status": submission.LEGACY_STATUS[job.status],
            }
        return {
            "message": f"Upload {record.upload_id} cancelled and its data removed",
            "job_id": record.upload_id,
            "upload_id": record.upload_id,
            "status": CANCELLED,
        }
    job = submission.cancel_job(some_id, settings)
    return {
        "message": f"Job {job.id} cancelled",
        "job_id": job.id,
        "status": submission.LEGACY_STATUS[job.status],
    }


@router.post("/cancel/{job_id}", summary="Cancel an upload (its staged data is removed) or an upload job")
async def cancel(
    job_id: Annotated[str, Path(description="An upload id or a job id.")], store: Store, settings: AppSettings
) -> dict[str, Any]:
    """Cancel by upload id or job id; cancelling twice is harmless."""
    return await blocking(_cancel, job_id, store, settings)


_STATUS_FILTERS: dict[str, JobStatus] = {
    "queued": JobStatus.QUEUED,
    "initializing": JobStatus.RUNNING,
    "uploading": JobStatus.RUNNING,
    "processing": JobStatus.RUNNING,
    "verifying": JobStatus.RUNNING,
    "paused": JobStatus.PAUSED,
    "cancelling": JobStatus.CANCELLING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "cancelled": JobStatus.CANCELLED,
}


def _status_filter(value: str | None) -> JobStatus | None:
    if not value:
        return None
    key = value.strip().lower()
    if key in _STATUS_FILTERS:
        return _STATUS_FILTERS[key]
    try:
        return JobStatus(value.strip().upper())
    except ValueError:
        raise JobValidationError(f"status {value!r} is not one of {', '.join(_STATUS_FILTERS)}") from None


@router.get("/jobs", summary="Upload jobs, newest first (of one user with user_id)")
async def jobs(
    store: Store,
    settings: AppSettings,
    user_id: Annotated[str | None, Query(description="The user's e-mail (the jobs' owner).")] = None,
    status: Annotated[str | None, Query(description="completed, failed, cancelled, queued, ...")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """ScientistCloud's listing: ``{jobs, total, limit, offset}``."""
    wanted = _status_filter(status)
    found, total = await blocking(submission.list_upload_jobs, settings, user_id, wanted, limit, offset)
    listed = [submission.job_status(job) for job in found]
    return {"jobs": listed, "total": total, "limit": limit, "offset": offset}


# Declared last: a one-segment path would otherwise shadow /jobs (and the legacy router's routes).
@router.get("/{upload_id}", summary="Which chunks arrived, bytes received, speed and ETA (to resume)")
async def upload_state(upload_id: UploadId, store: Store) -> dict[str, Any]:
    """The upload's progress: received and missing chunk ranges, hashed bytes, speed, ETA, its job."""
    return await blocking(store.describe, upload_id)
