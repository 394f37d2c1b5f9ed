"""The FastAPI app: ScientistCloud's upload API on jobbridge (``jobbridge api``; OpenAPI at /docs).

``create_app(settings)`` builds it. The upload store is opened at start-up (or handed in, already open,
by ``jobbridge api``, which then reports a busy upload area as one line) and closed at shutdown (saving
the whole-file hashes' progress). Expired uploads are removed at start-up and every few seconds after
(:func:`maintenance_pass`). Errors become JSON ``{"detail": ...}`` with the status their kind deserves:
bad input 422, unknown id 404, state conflicts 409, Prefect down 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from jobbridge.api import legacy, submission, uploads
from jobbridge.api.deps import blocking
from jobbridge.api.errors import UploadError
from jobbridge.api.staging import MAX_FILE_SIZE, UploadStore
from jobbridge.errors import (
    IdempotencyConflictError,
    JobbridgeError,
    JobNotFoundError,
    JobValidationError,
    PrefectUnavailableError,
)
from jobbridge.settings import Settings, get_settings

log = logging.getLogger("jobbridge.api")
VERSION = "1.0.0"
#: Run the Prefect-touching part of maintenance (finished jobs' staged files and blocks) every N passes.
_SLOW_EVERY = 12


def open_store(settings: Settings) -> UploadStore:
    """The upload store of ``settings``' upload area, opened (locked, ledger read, hashing resumed)."""
    store = UploadStore(
        settings.upload_staging_dir,
        chunk_size=settings.upload_chunk_size,
        expiry_seconds=settings.upload_expiry_hours * 3600,
    )
    return store.open()


def _job_is_final(settings: Settings) -> Any:
    def probe(job_id: str) -> bool | None:
        try:
            return submission.read_job(job_id, settings).status.is_final
        except JobNotFoundError:
            return True
        except JobbridgeError:
            return None

    return probe


def maintenance_pass(
    store: UploadStore, settings: Settings, *, slow: bool = True, now: float | None = None
) -> list[str]:
    """Save idle hashers' state and remove expired uploads (and, when ``slow``, finished jobs' leftovers).

    Returns the ids of the uploads removed. The API runs it at start-up and every few seconds; tests may
    call it with a ``now`` in the future.
    """
    store.checkpoint_idle()
    removed = store.expire(now=now, job_is_final=_job_is_final(settings) if slow else None)
    if slow:
        try:
            submission.drop_finished_blocks(settings, store.ledger)
        except JobbridgeError as exc:
            log.warning("could not tidy credentials blocks: %s", exc)
    return removed


def maintenance_interval(settings: Settings) -> float:
    """Seconds between passes: a tenth of the expiry, between 0.5 s and 5 s."""
    return min(max(settings.upload_expiry_hours * 360, 0.5), 5.0)


async def _maintenance_loop(store: UploadStore, settings: Settings) -> None:
    passes = 0
    while True:
        await asyncio.sleep(maintenance_interval(settings))
        passes += 1
        try:
            await blocking(maintenance_pass, store, settings, slow=passes % _SLOW_EVERY == 0)
        except Exception:
            log.exception("upload maintenance pass failed")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message, "error": message}, status_code=status)


def _status_of(exc: JobbridgeError) -> int:
    if isinstance(exc, UploadError):
        return exc.http_status
    for kind, status in (
        (JobValidationError, 422),
        (JobNotFoundError, 404),
        (IdempotencyConflictError, 409),
        (PrefectUnavailableError, 503),
    ):
        if isinstance(exc, kind):
            return status
    return 409  # e.g. cancelling a job that is already over


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(JobbridgeError)
    async def jobbridge_error(request: Request, exc: JobbridgeError) -> JSONResponse:
        return _error(_status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The submitted values are not echoed back (a source_config may hold a secret).
        problems = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}
            for error in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"][1:]) or "request"
        return JSONResponse({"detail": problems, "error": f"{where}: {first['msg']}"}, status_code=422)


def create_app(settings: Settings | None = None, store: UploadStore | None = None) -> FastAPI:
    """The API app. ``store``: an already opened store (else one is opened at start-up); either way the
    app closes it at shutdown, which saves the hashers' state (uvicorn re-raises SIGTERM once the app has
    shut down, so nothing after ``server.run()`` is sure to run)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store if store is not None else await blocking(open_store, settings)
        app.state.settings = settings
        app.state.started = time.time()
        removed = await blocking(maintenance_pass, app.state.store, settings)
        if removed:
            log.info("removed %d expired uploads at start-up", len(removed))
        task = asyncio.create_task(_maintenance_loop(app.state.store, settings))
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await blocking(app.state.store.close)

    app = FastAPI(
        title="jobbridge upload API",
        version=VERSION,
        description="ScientistCloud's upload API on jobbridge: chunked, resumable uploads with SHA-256, "
        "uploads from URLs, S3 and Google Drive; every upload becomes an `upload` job (a Prefect flow run).",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.include_router(legacy.router)
    app.include_router(uploads.router)

    @app.get("/", tags=["service"], summary="What this API is")
    async def root() -> dict[str, str]:
        return {
            "message": "jobbridge upload API (ScientistCloud compatible)",
            "version": VERSION,
            "description": "Chunked, resumable uploads with SHA-256; every upload becomes an upload job",
            "docs": "/docs",
            "redoc": "/redoc",
            "large_file_threshold_mb": str(settings.upload_single_request_max // 1024**2),
        }

    @app.get("/health", tags=["service"], summary="Liveness and the upload area's state")
    async def health(request: Request) -> dict[str, str]:
        upload_store: UploadStore = request.app.state.store
        return {
            "status": "healthy",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "upload_type": "unified",
            "large_file_threshold_mb": str(settings.upload_single_request_max // 1024**2),
            "max_file_size_tb": str(MAX_FILE_SIZE // 1024**4),
            "upload_dir": str(upload_store.root),
        }

    return app
