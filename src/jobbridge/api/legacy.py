"""Routes that exist for ScientistCloud's upload clients, served as they expect (HTTP-CONTRACTS.md).

``/upload`` and ``/local/upload`` take a whole file as multipart (streamed to the upload area, hashed on
the way, never spooled in ``/tmp``); ``/upload-path`` takes a path on this server; the rest describe the
service. Every submit route answers ``job_id``, ``status``, ``message`` and ``upload_type`` (which the
legacy client requires) plus ``estimated_duration``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request

from jobbridge.api import submission
from jobbridge.api.deps import blocking, get_settings, get_store
from jobbridge.api.fields import read_fields
from jobbridge.api.forms import receive_form
from jobbridge.api.names import SENSORS, safe_filename
from jobbridge.api.staging import MAX_FILE_SIZE, UploadStore
from jobbridge.api.uploads import submit_staged
from jobbridge.errors import JobValidationError
from jobbridge.settings import Settings

router = APIRouter(prefix="/api/upload", tags=["legacy (ScientistCloud)"])
Store = Annotated[UploadStore, Depends(get_store)]
AppSettings = Annotated[Settings, Depends(get_settings)]

SOURCE_TYPES = ("local", "google_drive", "s3", "url")
_REQUIRED = {
    "google_drive": ["file_id", "service_account_file"],
    "s3": ["bucket_name", "object_key", "access_key_id", "secret_access_key"],
    "url": ["url"],
    "local": ["file"],
}
_BASE_SECONDS = {"local": 60, "google_drive": 300, "s3": 180, "url": 120}

_FORM_FIELDS = {
    "file": {"type": "string", "format": "binary"},
    "user_email": {"type": "string"},
    "dataset_name": {"type": "string"},
    "sensor": {"type": "string", "enum": list(SENSORS)},
    "convert": {"type": "string", "description": "true or false"},
    "is_public": {"type": "string", "description": "true or false"},
    "folder": {"type": "string"},
    "team_uuid": {"type": "string"},
    "dataset_uuid": {"type": "string"},
    "dataset_identifier": {"type": "string"},
    "add_to_existing": {"type": "string", "description": "true or false"},
    "original_file_path": {"type": "string"},
}
_MULTIPART_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": _FORM_FIELDS,
                    "required": ["file", "user_email", "dataset_name", "sensor"],
                }
            }
        },
    }
}


async def _form_upload(
    request: Request, store: UploadStore, settings: Settings, max_size: int, upload_type: str | None
) -> dict[str, Any]:
    """Stage the multipart ``file``, then submit the job that moves it into the dataset store."""
    received = await receive_form(request, store, max_size)
    record = received.upload
    try:
        if record is None:
            raise JobValidationError("the multipart body has no 'file' part")
        fields = read_fields(received.fields)
        await blocking(store.ledger.update, record.upload_id, metadata=fields.as_metadata())
        record.metadata = fields.as_metadata()
        kind = upload_type or ("chunked" if record.size > settings.upload_single_request_max else "standard")
        return await submit_staged(record, store, settings, kind)
    except BaseException:
        if record is not None and record.job_id is None:
            await blocking(store.discard, record.upload_id)
        raise


@router.post(
    "/upload", summary="Upload a file in one multipart request (ScientistCloud)", openapi_extra=_MULTIPART_DOC
)
async def upload(request: Request, store: Store, settings: AppSettings) -> dict[str, Any]:
    """Any size (streamed to disk); ``upload_type`` is ``chunked`` above the single-request limit."""
    return await _form_upload(request, store, settings, MAX_FILE_SIZE, None)


@router.post(
    "/local/upload", summary="Upload a small file in one multipart request", openapi_extra=_MULTIPART_DOC
)
async def local_upload(request: Request, store: Store, settings: AppSettings) -> dict[str, Any]:
    """At most ``upload_single_request_max`` bytes; larger files go through a chunked upload."""
    return await _form_upload(request, store, settings, settings.upload_single_request_max, "standard")


def _server_path(file_path: str, roots: list[Path]) -> str:
    """A path on this server given by ``/upload-path``: absolute, existing, no NUL, inside an allowed root.

    Without the roots check any API client could make the server ingest any file it can read (its keys,
    other users' data); symlinks are resolved first so that a link inside a root cannot point out of it.
    """
    if not roots:
        raise JobValidationError(
            "file_path: uploads by server path are turned off; set JOBBRIDGE_UPLOAD_PATH_ROOTS to the "
            "directories they may read from"
        )
    if "\x00" in file_path:
        raise JobValidationError("file_path holds a NUL byte")
    path = Path(file_path)
    if not path.is_absolute():
        raise JobValidationError(f"file_path {file_path!r} must be an absolute path on the server")
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(root)) for root in roots]
    if not any(real == root or real.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(root) for root in roots)
        raise JobValidationError(f"file_path {file_path!r} is outside the allowed directories ({shown})")
    if not os.path.exists(real):
        raise JobValidationError(f"file_path {file_path!r} does not exist on the server")
    return str(real)


@router.post("/upload-path", summary="Upload a file already on this server, by path (ScientistCloud)")
async def upload_path(
    settings: AppSettings,
    file_path: Annotated[str, Form(description="Absolute path of a file or directory on this server.")],
    user_email: Annotated[str, Form()],
    dataset_name: Annotated[str, Form()],
    sensor: Annotated[str, Form()],
    convert: Annotated[str, Form(description="true/false (also True/False)")] = "true",
    is_public: Annotated[str, Form(description="true/false (also True/False)")] = "false",
    folder: Annotated[str | None, Form()] = None,
    team_uuid: Annotated[str | None, Form()] = None,
    dataset_uuid: Annotated[str | None, Form()] = None,
    dataset_identifier: Annotated[str | None, Form()] = None,
    add_to_existing: Annotated[str, Form()] = "false",
    original_filename: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    """The file is copied (never moved: it is not ours) into the dataset store by the upload job."""
    fields = read_fields(
        {
            "user_email": user_email,
            "dataset_name": dataset_name,
            "sensor": sensor,
            "convert": convert,
            "is_public": is_public,
            "folder": folder,
            "team_uuid": team_uuid,
            "dataset_uuid": dataset_uuid,
            "dataset_identifier": dataset_identifier,
            "add_to_existing": add_to_existing,
        }
    )
    source = _server_path(file_path, settings.upload_path_roots)
    name = safe_filename(original_filename, "original_filename") if original_filename else Path(source).name
    job = await blocking(submission.submit, submission.upload_job(fields, source), settings)
    size = os.path.getsize(source) if os.path.isfile(source) else None
    return submission.submitted_response(job, "path", f"File path upload initiated: {name}", size)


@router.get("/supported-sources", summary="Source types, sensors and the parameters each source needs")
async def supported_sources(settings: AppSettings) -> dict[str, Any]:
    """ScientistCloud's shape, plus how to send a chunked upload."""
    return {
        "source_types": list(SOURCE_TYPES),
        "sensor_types": list(SENSORS),
        "required_parameters": _REQUIRED,
        "optional_parameters": {kind: ["folder", "team_uuid"] for kind in SOURCE_TYPES},
        "large_file_threshold_mb": settings.upload_single_request_max // 1024**2,
    }


@router.get("/limits", summary="Upload limits: sizes, chunking, expiry")
async def limits(settings: AppSettings, store: Store) -> dict[str, Any]:
    """What a client needs to choose one request or chunks (``single_request_max``, ``chunk_size``)."""
    single, chunk = settings.upload_single_request_max, settings.upload_chunk_size
    return {
        "max_file_size_bytes": MAX_FILE_SIZE,
        "max_file_size_tb": MAX_FILE_SIZE / 1024**4,
        "single_request_max": single,
        "large_file_threshold_bytes": single,
        "large_file_threshold_mb": single / 1024**2,
        "chunk_size": chunk,
        "chunk_size_bytes": chunk,
        "chunk_size_mb": chunk / 1024**2,
        "chunk_header": "X-Chunk-SHA256",
        "resumable_upload_timeout_days": settings.upload_expiry_hours / 24,
        "upload_expiry_hours": settings.upload_expiry_hours,
        "supported_source_types": list(SOURCE_TYPES),
        "temp_directory": str(store.root),
    }


@router.get("/estimate-time", summary="A rough duration estimate (ScientistCloud's formula)")
async def estimate_time(
    source_type: Annotated[str, Query(description="local, google_drive, s3 or url")],
    file_size_mb: Annotated[float | None, Query(ge=0)] = None,
) -> dict[str, Any]:
    """Base time per source plus 2 s per MB, as ScientistCloud computed it."""
    kind = source_type.strip().lower()
    if kind not in _BASE_SECONDS:
        raise JobValidationError(f"source_type {source_type!r} is not one of {', '.join(SOURCE_TYPES)}")
    seconds = _BASE_SECONDS[kind] + (file_size_mb or 0) * 2
    return {
        "source_type": kind,
        "estimated_seconds": int(seconds),
        "estimated_minutes": round(seconds / 60, 1),
        "file_size_mb": file_size_mb,
    }
