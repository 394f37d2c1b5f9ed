"""Python client of the jobbridge upload API: one call uploads a file of any size and returns its job.

    from jobbridge.client import UploadClient

    with UploadClient("http://127.0.0.1:8000") as client:
        job_id = client.upload_file("scan.h5", user_email="amy@example.edu", dataset_name="scan 7",
                                    sensor="HDF5")
        final = client.wait_for_completion(job_id, timeout=3600)   # {"status": "completed", ...}

A file up to the server's ``single_request_max`` goes in one multipart request; a larger one in chunks,
``parallel`` at a time, each with its SHA-256, read from disk as it is sent (memory stays flat). An
interrupted upload resumes: the client asks the server which chunks arrived and sends only the others.
It finds the upload again through a small resume file in the user's cache directory
(``$XDG_CACHE_HOME/jobbridge/uploads``, keyed by the file's path, size and mtime and the API URL), or
through ``upload_id=`` given explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from jobbridge.errors import JobbridgeError, JobValidationError

#: ``progress_callback(bytes_done, bytes_total)``; called from worker threads.
ProgressCallback = Callable[[int, int], None]
READ_SIZE = 1024 * 1024
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
CHUNK_HEADER = "X-Chunk-SHA256"
_RESUME_MAX_AGE = 14 * 24 * 3600


class UploadError(JobbridgeError):
    """The upload API refused or failed the request."""


class UploadAPIUnavailableError(UploadError):
    """The upload API cannot be reached."""

    exit_code = 5


class UploadInterruptedError(UploadError):
    """The upload was interrupted; running it again resumes it."""

    exit_code = 130


class UploadTimeoutError(UploadError):
    """The job did not finish in time."""


class _HTTPError(UploadError):
    """A non-2xx answer, with its status code (and the CLI's exit code for it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        if status in (400, 409, 413, 422):
            self.exit_code = 2  # bad input
        elif status in (404, 410):
            self.exit_code = 3  # no such upload or job
        elif status == 503:
            self.exit_code = 5  # the API cannot reach Prefect


@dataclass(frozen=True)
class UploadResult:
    """What an upload gave: its job, how it was sent, and the file's SHA-256 as the server computed it."""

    job_id: str
    upload_type: str
    size: int
    sha256: str | None
    upload_id: str | None
    dataset_uuid: str | None
    status: str

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (for ``--json``)."""
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------- resume files


def cache_dir() -> Path:
    """Where resume files live: ``$XDG_CACHE_HOME/jobbridge/uploads`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jobbridge" / "uploads"


class ResumeFiles:
    """One small JSON file per unfinished upload, keyed by the file's path, size, mtime and the API."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or cache_dir()

    def _file(self, path: Path, stat: os.stat_result, api: str) -> Path:
        key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{api}"
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def load(self, path: Path, stat: os.stat_result, api: str) -> str | None:
        """The upload id remembered for this file (unchanged since) on this API, if any."""
        try:
            data = json.loads(self._file(path, stat, api).read_text())
        except (OSError, ValueError):
            return None
        upload_id = data.get("upload_id") if isinstance(data, dict) else None
        return upload_id if isinstance(upload_id, str) else None

    def save(self, path: Path, stat: os.stat_result, api: str, upload_id: str) -> None:
        """Remember ``upload_id`` for this file (written atomically; stale files are pruned)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self._file(path, stat, api)
        record = {
            "upload_id": upload_id,
            "path": str(path.resolve()),
            "size": stat.st_size,
            "api": api,
            "mtime_ns": stat.st_mtime_ns,
            "saved_at": time.time(),
        }
        partial = target.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, target)
        self._prune()

    def forget(self, path: Path, stat: os.stat_result, api: str) -> None:
        """Drop the resume file (the upload finished or is gone)."""
        self._file(path, stat, api).unlink(missing_ok=True)

    def _prune(self) -> None:
        cutoff = time.time() - _RESUME_MAX_AGE
        for entry in self.directory.glob("*.json"):
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
            except OSError:
                continue


# ------------------------------------------------------------------------------------------- reading


def _file_range(path: Path, offset: int, length: int) -> Iterator[bytes]:
    """The bytes ``[offset, offset + length)`` of a file, 1 MiB at a time."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        left = length
        while left:
            piece = handle.read(min(READ_SIZE, left))
            if not piece:
                raise UploadError(f"{path} became shorter while it was being uploaded")
            left -= len(piece)
            yield piece


def _range_sha256(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for piece in _file_range(path, offset, length):
        digest.update(piece)
    return digest.hexdigest()


class _CountingReader:
    """A file wrapper that reports how much was read (httpx reads multipart files through it)."""

    def __init__(self, handle: Any, report: Callable[[int], None]) -> None:
        self._handle, self._report = handle, report

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._handle.read(size)
        self._report(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        result: int = self._handle.seek(offset, whence)
        return result

    def tell(self) -> int:
        result: int = self._handle.tell()
        return result

    def fileno(self) -> int:
        result: int = self._handle.fileno()
        return result


class _Progress:
    """Thread-safe byte counter that forwards absolute totals to the user's callback."""

    def __init__(self, total: int, callback: ProgressCallback | None, done: int = 0) -> None:
        self.total, self.done, self._callback = total, done, callback
        self._lock = threading.Lock()
        self.add(0)

    def add(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            done = self.done
        if self._callback is not None:
            self._callback(done, self.total)


# -------------------------------------------------------------------------------------------- client


class UploadClient:
    """Uploads files to a jobbridge upload API and follows the jobs they become."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 300.0,
        retries: int = 5,
        resume_files: ResumeFiles | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.resume_files = resume_files or ResumeFiles()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> UploadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise UploadAPIUnavailableError(
                f"the upload API at {self.base_url} cannot be reached ({type(exc).__name__}: {exc}); "
                "start it with `jobbridge api` or point --api at it"
            ) from None
        if response.status_code >= 400:
            raise _HTTPError(response.status_code, _detail(response))
        return response

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._request(method, url, **kwargs).json()

    def limits(self) -> dict[str, Any]:
        """The server's limits (``single_request_max``, ``chunk_size``, ...)."""
        result: dict[str, Any] = self._json("GET", "/api/upload/limits")
        return result

    def status(self, job_id: str) -> dict[str, Any]:
        """A job's (or an unfinished upload's) status, as ``/api/upload/status`` returns it."""
        result: dict[str, Any] = self._json("GET", f"/api/upload/status/{job_id}")
        return result

    def upload_state(self, upload_id: str) -> dict[str, Any]:
        """Which chunks of an upload arrived (``GET /api/upload/{id}``)."""
        result: dict[str, Any] = self._json("GET", f"/api/upload/{upload_id}")
        return result

    def cancel(self, some_id: str) -> dict[str, Any]:
        """Cancel an upload (by upload id) or an upload job (by job id)."""
        result: dict[str, Any] = self._json("POST", f"/api/upload/cancel/{some_id}")
        return result

    def wait_for_completion(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 1.0,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is completed, failed or cancelled; returns its last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.status(job_id)
            if on_status is not None:
                on_status(current)
            if current.get("status") in FINAL_STATUSES:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise UploadTimeoutError(
                    f"job {job_id} is still {current.get('status')} after {timeout:.0f} s"
                )
            time.sleep(poll)

    # --- uploading ---------------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        user_email: str,
        dataset_name: str,
        sensor: str,
        convert: bool = False,
        is_public: bool = False,
        folder: str | None = None,
        team_uuid: str | None = None,
        progress_callback: ProgressCallback | None = None,
        parallel: int = 4,
        dataset_uuid: str | None = None,
        upload_id: str | None = None,
        sha256: str | None = None,
    ) -> str:
        """Upload ``path`` (one request or resumable chunks) and return the id of its upload job."""
        return self.upload(
            path,
            user_email=user_email,
            dataset_name=dataset_name,
            sensor=sensor,
            convert=convert,
            is_public=is_public,
            folder=folder,
            team_uuid=team_uuid,
            progress_callback=progress_callback,
            parallel=parallel,
            dataset_uuid=dataset_uuid,
            upload_id=upload_id,
            sha256=sha256,
        ).job_id

    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        user_email: str,
        dataset_name: str,
        sensor: str,
        convert: bool = False,
        is_public: bool = False,
        folder: str | None = None,
        team_uuid: str | None = None,
        progress_callback: ProgressCallback | None = None,
        parallel: int = 4,
        dataset_uuid: str | None = None,
        upload_id: str | None = None,
        sha256: str | None = None,
    ) -> UploadResult:
        """Like :meth:`upload_file`, returning the whole :class:`UploadResult`."""
        file = Path(path)
        if not file.is_file():
            raise JobValidationError(f"no file at {file}" + (" (it is a directory)" if file.is_dir() else ""))
        if parallel < 1:
            raise JobValidationError(f"parallel must be at least 1, got {parallel}")
        fields: dict[str, Any] = {
            "user_email": user_email,
            "dataset_name": dataset_name,
            "sensor": sensor,
            "convert": convert,
            "is_public": is_public,
            "folder": folder,
            "team_uuid": team_uuid,
            "dataset_uuid": dataset_uuid,
        }
        fields = {key: value for key, value in fields.items() if value is not None}
        stat = file.stat()
        if upload_id is None and stat.st_size <= int(self.limits()["single_request_max"]):
            return self._single(file, stat.st_size, fields, progress_callback)
        return _ChunkedUpload(self, file, stat, fields, parallel, progress_callback).run(upload_id, sha256)

    def _single(
        self, file: Path, size: int, fields: dict[str, Any], callback: ProgressCallback | None
    ) -> UploadResult:
        """One multipart request to ``/api/upload/local/upload``."""
        progress = _Progress(size, callback)
        form = {
            key: (str(value).lower() if isinstance(value, bool) else str(value))
            for key, value in fields.items()
        }
        with open(file, "rb") as handle:
            reader = _CountingReader(handle, progress.add)
            answer = self._json(
                "POST",
                "/api/upload/local/upload",
                data=form,
                files={"file": (file.name, reader, "application/octet-stream")},
            )
        return _result(answer, size)

    # --- chunk transport (used by _ChunkedUpload) ---------------------------------------------------

    def _put_chunk(self, upload_id: str, n: int, body: Iterator[bytes], length: int, sha256: str) -> None:
        headers = {
            CHUNK_HEADER: sha256,
            "Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        }
        self._request("PUT", f"/api/upload/{upload_id}/chunk/{n}", content=body, headers=headers)


def _detail(response: httpx.Response) -> str:
    """The server's one-line reason (its ``detail``), else the status line."""
    try:
        data = response.json()
    except ValueError:
        return f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"
    if isinstance(data, dict):
        error = data.get("error") or data.get("detail")
        if isinstance(error, str):
            return error
        return f"{response.status_code}: {json.dumps(error)[:300]}"
    return f"{response.status_code} {response.reason_phrase}"


def _result(answer: dict[str, Any], size: int) -> UploadResult:
    return UploadResult(
        job_id=answer["job_id"],
        upload_type=answer.get("upload_type", "standard"),
        size=int(answer.get("size") or size),
        sha256=answer.get("sha256"),
        upload_id=answer.get("upload_id"),
        dataset_uuid=answer.get("dataset_uuid"),
        status=answer.get("status", ""),
    )


def _expand(runs: list[list[int]]) -> list[int]:
    return [n for first, last in runs for n in range(first, last + 1)]


class _ChunkedUpload:
    """One chunked upload: find or start it, send the missing chunks in parallel, complete it."""

    def __init__(
        self,
        client: UploadClient,
        file: Path,
        stat: os.stat_result,
        fields: dict[str, Any],
        parallel: int,
        callback: ProgressCallback | None,
    ) -> None:
        self.client, self.file, self.stat, self.fields = client, file, stat, fields
        self.parallel, self.callback = parallel, callback
        self.size = stat.st_size
        self.stop = threading.Event()
        self.resume = client.resume_files
        self.api = client.base_url

    def run(self, upload_id: str | None, sha256: str | None) -> UploadResult:
        state = self._find(upload_id)
        if state is None:
            state = self._start(sha256)
        upload_id = state["upload_id"]
        if state["state"] == "completed" and state.get("job_id"):
            self.resume.forget(self.file, self.stat, self.api)
            return self._finished(state)
        progress = _Progress(self.size, self.callback, done=int(state["bytes_received"]))
        try:
            for _ in range(4):  # a chunk found torn at completion is asked for again
                missing = _expand(state["missing_ranges"])
                if missing:
                    self._send(upload_id, state, missing, progress)
                answer = self._complete(upload_id, sha256)
                if answer is not None:
                    self.resume.forget(self.file, self.stat, self.api)
                    return _result(answer, self.size)
                state = self.client.upload_state(upload_id)
        except KeyboardInterrupt:
            self.stop.set()
            raise UploadInterruptedError(
                f"upload {upload_id} of {self.file} interrupted after {progress.done} of {self.size} bytes: "
                f"run the same command again to resume (or pass upload_id={upload_id})"
            ) from None
        raise UploadError(f"upload {upload_id} still misses chunks after several rounds; see the API's log")

    def _find(self, upload_id: str | None) -> dict[str, Any] | None:
        """The server's state of the given or remembered upload of this file, if it still has it."""
        explicit = upload_id is not None
        upload_id = upload_id or self.resume.load(self.file, self.stat, self.api)
        if upload_id is None:
            return None
        try:
            state = self.client.upload_state(upload_id)
        except _HTTPError as exc:
            if exc.status in (404, 410, 422) and not explicit:
                self.resume.forget(self.file, self.stat, self.api)
                return None
            raise
        if state["state"] == "cancelled" and not explicit:
            self.resume.forget(self.file, self.stat, self.api)
            return None
        if state["size"] != self.size or state["filename"] != self.file.name:
            raise UploadError(
                f"upload {upload_id} is of {state['filename']} ({state['size']} bytes), "
                f"not of {self.file.name} ({self.size} bytes)"
            )
        if state["state"] == "cancelled":
            raise UploadError(f"upload {upload_id} was cancelled; start a new one")
        return state

    def _start(self, sha256: str | None) -> dict[str, Any]:
        body = {"filename": self.file.name, "size": self.size, **self.fields}
        if sha256:
            body["sha256"] = sha256
        started = self.client._json("POST", "/api/upload/initiate", json=body)
        self.resume.save(self.file, self.stat, self.api, started["upload_id"])
        return self.client.upload_state(started["upload_id"])

    def _finished(self, state: dict[str, Any]) -> UploadResult:
        status = self.client.status(state["job_id"])
        return UploadResult(
            state["job_id"],
            "chunked",
            self.size,
            state.get("sha256"),
            state["upload_id"],
            status.get("dataset_uuid"),
            status.get("status", ""),
        )

    def _send(self, upload_id: str, state: dict[str, Any], missing: list[int], progress: _Progress) -> None:
        chunk_size = int(state["chunk_size"])
        queue = iter(missing)
        lock = threading.Lock()

        def next_chunk() -> int | None:
            with lock:
                return next(queue, None)

        def worker() -> None:
            while not self.stop.is_set():
                n = next_chunk()
                if n is None:
                    return
                offset = n * chunk_size
                self._send_chunk(upload_id, n, offset, min(chunk_size, self.size - offset), progress)

        with ThreadPoolExecutor(self.parallel, thread_name_prefix="jobbridge-upload") as pool:
            futures = [pool.submit(worker) for _ in range(min(self.parallel, len(missing)))]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:
                self.stop.set()
                raise
            for future in done:
                if future.exception() is not None:
                    self.stop.set()
                    raise future.exception()  # type: ignore[misc]

    def _send_chunk(self, upload_id: str, n: int, offset: int, length: int, progress: _Progress) -> None:
        """Hash the chunk, then send it; retry what can succeed on a second try (network, busy, bad bytes)."""
        for attempt in range(self.client.retries + 1):
            if self.stop.is_set():
                return
            sent = 0

            def body() -> Iterator[bytes]:
                nonlocal sent
                for piece in _file_range(self.file, offset, length):
                    sent += len(piece)
                    progress.add(len(piece))
                    yield piece

            try:
                digest = _range_sha256(self.file, offset, length)
                self.client._put_chunk(upload_id, n, body(), length, digest)
                return
            except (UploadAPIUnavailableError, _HTTPError) as exc:
                progress.add(-sent)
                retryable = not isinstance(exc, _HTTPError) or exc.status in (400, 409, 500, 502, 503, 504)
                if not retryable or attempt == self.client.retries:
                    raise
                time.sleep(min(0.5 * 2**attempt, 10.0))

    def _complete(self, upload_id: str, sha256: str | None) -> dict[str, Any] | None:
        """The job once the server has verified the file; None when chunks are missing after all."""
        body = {"sha256": sha256} if sha256 else None
        while True:
            try:
                response = self.client._request("POST", f"/api/upload/{upload_id}/complete", json=body)
            except _HTTPError as exc:
                if exc.status == 409 and "missing chunks" in str(exc):
                    return None
                raise
            if response.status_code == 200:
                result: dict[str, Any] = response.json()
                return result
            # 202: the server is still hashing the tail; it waited before answering, so ask again now.
