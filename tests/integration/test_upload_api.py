"""The upload API as users and the legacy ScientistCloud client use it: a real ``jobbridge api`` process
(uvicorn on a free port) in front of the session's real stack (Prefect server, worker, moto, nx-27017).

Each upload becomes a real ``upload`` job that the stack's worker runs, moving the staged file into the
dataset store. API processes that need other settings (expiry, restarts, big chunks) get their own upload
area *inside* the session's one, so the worker, which checks that a moved file comes from the upload
area, accepts their files too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from jobbridge.settings import reload_settings
from tests.support.helpers import free_port, wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")

JOBBRIDGE = str(Path(sys.executable).with_name("jobbridge"))
MiB = 1024 * 1024
FINAL = ("completed", "failed", "cancelled")


# --------------------------------------------------------------------------------------------- helpers


class ApiProcess:
    """``jobbridge api --port P`` as a child process, with its log in a file."""

    def __init__(self, log: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [JOBBRIDGE, "api", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(f"the API on {self.url} (log: {self.log})", self._healthy, 60)
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the API exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def upload_area() -> Path:
    """The session's upload area (the worker's too)."""
    return reload_settings().upload_staging_dir


def own_area(name: str) -> dict[str, str]:
    """Settings for an API with its own upload area inside the session's one."""
    return {"JOBBRIDGE_UPLOAD_DIR": str(upload_area() / f"area-{name}-{uuid.uuid4().hex[:6]}")}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """The module's API: 1 MiB chunks, files above 4 MiB chunked."""
    env = {
        "JOBBRIDGE_UPLOAD_CHUNK_SIZE": str(MiB),
        "JOBBRIDGE_UPLOAD_SINGLE_REQUEST_MAX": str(4 * MiB),
        "JOBBRIDGE_UPLOAD_PATH_ROOTS": str(tmp_path_factory.getbasetemp()),  # /upload-path reads only there
    }
    process = ApiProcess(tmp_path_factory.mktemp("api") / "api.log", env).start()
    yield process
    process.stop()


@pytest.fixture
def http(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=120) as client:
        yield client


def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}@example.edu"


def fields(**extra: Any) -> dict[str, Any]:
    return {"user_email": user(), "dataset_name": "scan 7", "sensor": "TIFF", "convert": False, **extra}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


def wait_final(base_url: str, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """Poll /status as the legacy client does: progress is a number every time; stop on a final status."""
    seen: list[dict[str, Any]] = []

    def probe() -> dict[str, Any] | None:
        status = requests.get(f"{base_url}/api/upload/status/{job_id}", timeout=30)
        status.raise_for_status()
        data = status.json()
        assert isinstance(data["progress_percentage"], float), data
        f"{data['progress_percentage']:.1f}"  # what the legacy client does with it
        seen.append(data)
        return data if data["status"] in FINAL else None

    return wait_for(f"job {job_id} to end", probe, timeout, interval=0.25)


def put_chunk(
    http: httpx.Client, upload_id: str, n: int, body: bytes, digest: str | None = None
) -> httpx.Response:
    return http.put(
        f"/api/upload/{upload_id}/chunk/{n}", content=body, headers={"X-Chunk-SHA256": digest or sha(body)}
    )


def dataset_file(status: dict[str, Any]) -> Path:
    result = status["result"]
    return Path(result["destination"]) / result["files"][0]["path"]


# ---------------------------------------------------------------------------------- chunked uploads


def test_parallel_out_of_order_chunks_and_a_corrupt_one(http: httpx.Client, api: ApiProcess) -> None:
    data = random.Random(11).randbytes(12 * MiB + 5)
    started = http.post(
        "/api/upload/initiate",
        json={"filename": "frames.tif", "size": len(data), "sha256": sha(data), **fields()},
    )
    assert started.status_code == 200, started.text
    upload = started.json()
    upload_id, count = upload["upload_id"], upload["chunk_count"]
    assert (upload["chunk_size"], count, upload["upload_type"]) == (MiB, 13, "chunked")
    parts = [data[n * MiB : (n + 1) * MiB] for n in range(count)]

    corrupt = bytearray(parts[7])
    corrupt[1000] ^= 0xFF
    refused = put_chunk(http, upload_id, 7, bytes(corrupt), sha(parts[7]))
    assert refused.status_code == 400 and "SHA-256" in refused.json()["detail"]
    assert "nothing was kept" in refused.json()["detail"]
    assert (
        http.put(
            f"/api/upload/{upload_id}/chunk/7", content=parts[7], headers={"X-Chunk-SHA256": "xyz"}
        ).status_code
        == 422
    )
    assert http.put(f"/api/upload/{upload_id}/chunk/7", content=parts[7]).status_code == 400  # no checksum
    assert [7, 7] not in http.get(f"/api/upload/{upload_id}").json()["received_ranges"]

    order = list(range(count))
    random.Random(12).shuffle(order)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda n: put_chunk(http, upload_id, n, parts[n]), order))
    assert all(answer.status_code == 200 for answer in answers), [
        a.text for a in answers if a.status_code != 200
    ]
    state = http.get(f"/api/upload/{upload_id}").json()
    assert (
        state["chunks_received"] == count
        and state["missing_ranges"] == []
        and state["bytes_received"] == len(data)
    )

    done = http.post(f"/api/upload/{upload_id}/complete")
    assert done.status_code == 200, done.text
    job = done.json()
    assert job["sha256"] == sha(data) and job["upload_type"] == "chunked" and job["status"] == "queued"
    assert http.post(f"/api/upload/{upload_id}/complete").json()["job_id"] == job["job_id"]  # idempotent

    final = wait_final(api.url, job["job_id"])
    assert final["status"] == "completed", final
    again = http.post(f"/api/upload/{upload_id}/complete")  # after the job moved the file: the same job
    assert again.status_code == 200 and again.json()["job_id"] == job["job_id"], again.text
    assert final["progress_percentage"] == 100.0 and final["bytes_total"] == len(data)
    assert final["sha256"] == sha(data) and final["upload_id"] == upload_id
    stored = dataset_file(final)
    assert stored.name == "frames.tif" and file_sha256(stored) == sha(data)
    assert not (upload_area() / upload_id / "frames.tif").exists()  # moved, not copied
    by_upload = http.get(f"/api/upload/status/{upload_id}").json()  # an upload id finds its job
    assert by_upload["job_id"] == job["job_id"] and by_upload["status"] == "completed"


def _sparse_file(path: Path, size: int) -> None:
    rng = random.Random(13)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in (0, 1024**3 + 12345, 2 * 1024**3 + 7, size - MiB):
            handle.seek(offset)
            handle.write(rng.randbytes(MiB))


@pytest.mark.slow
def test_a_3_gib_sparse_file_interrupted_midway_resumes(tmp_path: Path) -> None:
    size = 3 * 1024**3
    free = shutil.disk_usage(upload_area().parent).free
    if free < 2 * 1024**3:
        pytest.skip(f"needs 2 GiB free for the sparse file and its copies, {free} bytes free")
    source = tmp_path / "volume.raw"
    _sparse_file(source, size)
    expected = file_sha256(source)
    api = ApiProcess(tmp_path / "api.log", own_area("big")).start()  # default 64 MiB chunks: 48 of them
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    command = [
        JOBBRIDGE,
        "upload",
        str(source),
        "--user-email",
        user(),
        "--dataset-name",
        "volume",
        "--sensor",
        "OTHER",
        "--api",
        api.url,
        "--json",
    ]
    try:
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        resume = wait_for(
            "the resume file", lambda: next(iter((cache / "jobbridge" / "uploads").glob("*.json")), None), 60
        )
        upload_id = json.loads(resume.read_text())["upload_id"]

        def received() -> int:
            return int(httpx.get(f"{api.url}/api/upload/{upload_id}", timeout=30).json()["chunks_received"])

        wait_for("a few chunks to arrive", lambda: received() >= 6, 120)
        first.kill()  # the client dies mid-upload
        first.wait(30)
        state = httpx.get(f"{api.url}/api/upload/{upload_id}", timeout=30).json()
        assert 6 <= state["chunks_received"] < state["chunk_count"] == 48, state
        assert state["state"] == "receiving"

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        result = json.loads(again.stdout)
        assert result["upload_id"] == upload_id  # resumed, not started over
        assert result["sha256"] == expected and result["size"] == size and result["upload_type"] == "chunked"
        assert not list((cache / "jobbridge" / "uploads").glob("*.json"))  # resume file gone

        final = wait_final(api.url, result["job_id"], timeout=300)
        assert final["status"] == "completed", final
        stored = dataset_file(final)
        assert final["result"]["sha256"] == expected and stored.stat().st_size == size
        assert stored.stat().st_blocks * 512 < 256 * MiB  # still sparse: zero blocks were never written
    finally:
        api.stop()


def test_the_api_restarted_mid_upload_resumes(tmp_path: Path) -> None:
    from jobbridge.client import UploadClient

    env = {**own_area("restart"), "JOBBRIDGE_UPLOAD_CHUNK_SIZE": str(MiB)}
    data = random.Random(14).randbytes(10 * MiB + 99)
    source = tmp_path / "cells.h5"
    source.write_bytes(data)
    parts = [data[n * MiB : (n + 1) * MiB] for n in range(11)]
    api = ApiProcess(tmp_path / "api.log", env).start()
    try:
        upload_id = httpx.post(
            f"{api.url}/api/upload/initiate",
            json={"filename": "cells.h5", "size": len(data), **fields(sensor="HDF5")},
        ).json()["upload_id"]
        with httpx.Client(base_url=api.url, timeout=60) as http:
            for n in range(5):
                assert put_chunk(http, upload_id, n, parts[n]).status_code == 200
            wait_for(
                "the hash to reach chunk 5",
                lambda: http.get(f"/api/upload/{upload_id}").json()["hashed_bytes"] == 5 * MiB,
                30,
            )
        api.stop(signal.SIGTERM)  # a clean stop saves the hash state
        ledger = Path(env["JOBBRIDGE_UPLOAD_DIR"]) / "uploads.sqlite3"
        with sqlite3.connect(ledger) as db:
            hashed, state = db.execute(
                "SELECT hashed_chunks, hash_state FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
        assert hashed == 5 and state is not None

        api = ApiProcess(tmp_path / "api.log", env).start()
        with httpx.Client(base_url=api.url, timeout=60) as http:
            assert http.get(f"/api/upload/{upload_id}").json()["received_ranges"] == [[0, 4]]
            for n in (5, 6, 7):
                assert put_chunk(http, upload_id, n, parts[n]).status_code == 200
        api.stop(signal.SIGKILL)  # a crash: no chance to save anything more

        api = ApiProcess(tmp_path / "api.log", env).start()
        state = httpx.get(f"{api.url}/api/upload/{upload_id}").json()
        assert state["received_ranges"] == [[0, 7]] and state["missing_ranges"] == [[8, 10]]
        with UploadClient(api.url) as client:
            result = client.upload(source, upload_id=upload_id, **fields(sensor="HDF5"))
        assert result.upload_id == upload_id and result.sha256 == sha(data)
        final = wait_final(api.url, result.job_id)
        assert final["status"] == "completed" and file_sha256(dataset_file(final)) == sha(data)
    finally:
        api.stop()


def test_idle_uploads_expire_while_running_and_across_a_restart(tmp_path: Path) -> None:
    area = {**own_area("expiry"), "JOBBRIDGE_UPLOAD_CHUNK_SIZE": str(MiB)}
    api = ApiProcess(tmp_path / "a.log", {**area, "JOBBRIDGE_UPLOAD_EXPIRY_HOURS": "0.002"}).start()  # 7.2 s
    try:
        upload_id = httpx.post(
            f"{api.url}/api/upload/initiate", json={"filename": "x.bin", "size": 2 * MiB, **fields()}
        ).json()["upload_id"]
        assert put_chunk(httpx.Client(base_url=api.url), upload_id, 0, bytes(MiB)).status_code == 200
        staged = Path(area["JOBBRIDGE_UPLOAD_DIR"]) / upload_id
        assert staged.exists()
        wait_for(
            "the idle upload to be removed",
            lambda: httpx.get(f"{api.url}/api/upload/{upload_id}").status_code == 404,
            30,
        )
        assert not staged.exists()
        gone = httpx.put(
            f"{api.url}/api/upload/{upload_id}/chunk/1",
            content=bytes(MiB),
            headers={"X-Chunk-SHA256": sha(bytes(MiB))},
        )
        assert gone.status_code == 404 and "expire" in gone.json()["detail"]
    finally:
        api.stop()

    api = ApiProcess(tmp_path / "b.log", {**area, "JOBBRIDGE_UPLOAD_EXPIRY_HOURS": "24"}).start()
    try:
        upload_id = httpx.post(
            f"{api.url}/api/upload/initiate", json={"filename": "y.bin", "size": 2 * MiB, **fields()}
        ).json()["upload_id"]
    finally:
        api.stop()
    short = {**area, "JOBBRIDGE_UPLOAD_EXPIRY_HOURS": "0.00001"}  # 36 ms: far less than an API takes to start
    api = ApiProcess(tmp_path / "c.log", short).start()
    try:
        assert httpx.get(f"{api.url}/api/upload/{upload_id}").status_code == 404
        assert not (Path(area["JOBBRIDGE_UPLOAD_DIR"]) / upload_id).exists()
    finally:
        api.stop()


# -------------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize(
    "filename",
    [
        "../../evil.txt",
        "/etc/passwd",
        "..\\..\\evil.txt",
        "%2e%2e%2fevil.txt",
        "a\x00b",
        "\uff0e\uff0e",
        "..",
    ],
)
def test_traversal_file_names_are_refused_at_initiate(http: httpx.Client, filename: str) -> None:
    refused = http.post("/api/upload/initiate", json={"filename": filename, "size": 10, **fields()})
    assert refused.status_code == 422 and "filename" in refused.json()["detail"], refused.text


def _multipart(filename: bytes, content: bytes = b"payload", **form: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in form.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + content
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_traversal_in_multipart_names_and_ids_writes_nothing(http: httpx.Client) -> None:
    area = upload_area()
    before = {entry.name for entry in area.iterdir()}
    form = {"user_email": user(), "dataset_name": "evil", "sensor": "OTHER", "convert": "false"}
    for name, complaint in [
        (b"../../evil.txt", "without '/'"),
        (b"..\\..\\evil.txt", "without '/'"),
        (b"\xc0\xae\xc0\xae/evil.txt", "not valid UTF-8"),  # overlong '..'
        (b"%2e%2e%2fevil.txt", "without '/'"),
    ]:
        body, content_type = _multipart(name, **form)
        refused = http.post("/api/upload/upload", content=body, headers={"Content-Type": content_type})
        assert refused.status_code == 422 and complaint in refused.json()["detail"], refused.text
    assert {entry.name for entry in area.iterdir()} == before  # nothing staged
    assert not list(area.parent.rglob("evil.txt")) and not list(Path("/tmp").glob("evil.txt"))

    assert (
        http.get("/api/upload/..%2F..%2Fetc%2Fpasswd").status_code == 404
    )  # decoded: no route has that shape
    for path in ["/api/upload/not-an-id", f"/api/upload/{uuid.uuid1()}", "/api/upload/%2e%2e"]:
        answer = http.get(path)
        assert answer.status_code in (404, 422) and "upload id" in answer.json()["detail"], (
            path,
            answer.text,
        )
    assert http.put(
        "/api/upload/..%2Fx/chunk/0", content=b"x", headers={"X-Chunk-SHA256": sha(b"x")}
    ).status_code in (404, 422)
    folder = http.post(
        "/api/upload/initiate", json={"filename": "ok.bin", "size": 1, **fields(folder="../../x")}
    )
    assert folder.status_code == 422 and "folder" in folder.json()["detail"]


# ----------------------------------------------------------------------------- the legacy client


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory; ``/stall`` sends a few bytes and then waits (a download to cancel)."""

    release = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", str(100 * MiB))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
            self.wfile.flush()
            self.release.wait(120)
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    _Files.release.set()
    server.shutdown()
    server.server_close()


def test_the_legacy_client_requests_work_unchanged(
    api: ApiProcess, tmp_path: Path, file_server: tuple[str, Path]
) -> None:
    """The exact requests of ScientistCloudUploadClient (requests.Session), and what it reads back."""
    base = api.url
    session = requests.Session()
    session.headers.update({"User-Agent": "ScientistCloud-Upload-Client-Unified/2.0.0"})
    email = user()
    small = tmp_path / "small.tif"
    small.write_bytes(random.Random(15).randbytes(300_000))
    big = tmp_path / "big.nc"
    big.write_bytes(random.Random(16).randbytes(5 * MiB))
    jobs: dict[str, str] = {}

    for path, kind in ((small, "standard"), (big, "chunked")):  # upload_file()
        form_data = {
            "user_email": email,
            "dataset_name": path.stem,
            "sensor": "TIFF",
            "convert": "false",
            "is_public": "true",
            "folder": "raw/day1",
            "team_uuid": "team-7",
            "original_file_path": str(path),
            "add_to_existing": "false",
        }
        with open(path, "rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            response = session.post(f"{base}/api/upload/upload", data=form_data, files=files, timeout=300)
        response.raise_for_status()
        data = response.json()
        assert {"job_id", "status", "message", "upload_type"} <= set(data) and data["upload_type"] == kind
        assert isinstance(data["estimated_duration"], int) and data["sha256"] == sha(path.read_bytes())
        jobs[path.name] = data["job_id"]

    form = {
        "file_path": str(small),
        "user_email": email,
        "dataset_name": "by path",
        "sensor": "TIFF",
        "convert": False,
        "is_public": True,
    }  # requests sends str(bool): "False", "True"
    response = session.post(f"{base}/api/upload/upload-path", data=form, timeout=300)
    response.raise_for_status()
    assert response.json()["upload_type"] == "path"
    jobs["path"] = response.json()["job_id"]
    escape = tmp_path / "escape.tif"
    escape.symlink_to("/etc/hostname")  # inside the allowed root, pointing out of it
    for outside in ("/etc/hostname", str(escape)):
        refused = session.post(
            f"{base}/api/upload/upload-path", data={**form, "file_path": outside}, timeout=60
        )
        assert 400 <= refused.status_code < 500 and "outside the allowed directories" in refused.text

    url, served = file_server
    (served / "remote.h5").write_bytes(random.Random(17).randbytes(2 * MiB))
    for name, address in (("remote.h5", f"{url}/remote.h5"), ("missing", f"{url}/missing.h5")):
        body = {
            "source_type": "url",
            "source_config": {"url": address},
            "user_email": email,
            "dataset_name": name,
            "sensor": "HDF5",
            "convert": False,
            "is_public": False,
        }
        response = session.post(f"{base}/api/upload/initiate", json=body, timeout=300)
        response.raise_for_status()
        assert {"job_id", "status", "message", "upload_type"} <= set(response.json())
        jobs[name] = response.json()["job_id"]

    finals = {name: wait_final(base, job_id) for name, job_id in jobs.items()}
    for name in ("small.tif", "big.nc", "path", "remote.h5"):
        assert finals[name]["status"] == "completed", finals[name]
    assert (
        finals["small.tif"]["bytes_total"] == 300_000
        and finals["small.tif"]["result"]["folder"] == "raw/day1"
    )
    assert (
        finals["small.tif"]["result"]["is_public"] is True and finals["path"]["result"]["is_public"] is True
    )
    assert file_sha256(dataset_file(finals["path"])) == sha(small.read_bytes())  # copied, the original stays
    assert small.exists()
    assert finals["remote.h5"]["sha256"] == sha((served / "remote.h5").read_bytes())
    assert finals["missing"]["status"] == "failed" and "404" in finals["missing"]["error"]

    stalled = session.post(
        f"{base}/api/upload/initiate",
        timeout=300,
        json={
            "source_type": "url",
            "source_config": {"url": f"{url}/stall"},
            "user_email": email,
            "dataset_name": "stalled",
            "sensor": "OTHER",
            "convert": False,
            "is_public": False,
        },
    ).json()["job_id"]
    session.post(f"{base}/api/upload/cancel/{stalled}", timeout=60).raise_for_status()
    assert wait_final(base, stalled)["status"] == "cancelled"

    listed = session.get(
        f"{base}/api/upload/jobs", params={"user_id": email, "limit": 50, "offset": 0}
    ).json()
    assert {job["job_id"] for job in listed["jobs"]} == {*jobs.values(), stalled}
    assert listed["total"] == len(jobs) + 1 and (listed["limit"], listed["offset"]) == (50, 0)
    failed = session.get(f"{base}/api/upload/jobs", params={"user_id": email, "status": "failed"}).json()
    assert [job["job_id"] for job in failed["jobs"]] == [jobs["missing"]]

    sources = session.get(f"{base}/api/upload/supported-sources").json()
    assert "s3" in sources["source_types"] and "TIFF RGB" in sources["sensor_types"]
    assert sources["required_parameters"]["s3"] == [
        "bucket_name",
        "object_key",
        "access_key_id",
        "secret_access_key",
    ]
    limits = session.get(f"{base}/api/upload/limits").json()
    assert limits["single_request_max"] == 4 * MiB and limits["chunk_size"] == MiB
    estimate = session.get(
        f"{base}/api/upload/estimate-time", params={"source_type": "local", "file_size_mb": 100}
    ).json()
    assert estimate == {
        "source_type": "local",
        "estimated_seconds": 260,
        "estimated_minutes": 4.3,
        "file_size_mb": 100,
    }
    assert session.get(f"{base}/health").json()["status"] == "healthy"
    assert session.get(f"{base}/").json()["docs"] == "/docs"
    assert "/api/upload/{upload_id}/chunk/{n}" in session.get(f"{base}/openapi.json").json()["paths"]


def test_a_cancelled_chunked_upload_reads_cancelled(http: httpx.Client) -> None:
    upload_id = http.post(
        "/api/upload/initiate", json={"filename": "c.bin", "size": 3 * MiB, **fields()}
    ).json()["upload_id"]
    assert put_chunk(http, upload_id, 0, bytes(MiB)).status_code == 200
    assert http.get(f"/api/upload/status/{upload_id}").json()["status"] == "uploading"
    assert http.post(f"/api/upload/cancel/{upload_id}").json()["status"] == "cancelled"
    assert http.get(f"/api/upload/status/{upload_id}").json()["status"] == "cancelled"
    assert not (upload_area() / upload_id).exists()
    assert put_chunk(http, upload_id, 1, bytes(MiB)).status_code == 410


# ------------------------------------------------------------------------------------ S3 secrets


def test_an_s3_secret_goes_into_a_block_never_into_the_job(api: ApiProcess, http: httpx.Client) -> None:
    import boto3
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from pymongo import MongoClient

    from jobbridge import control

    settings = reload_settings()
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    bucket = f"legacy-{uuid.uuid4().hex[:8]}"
    payload = random.Random(18).randbytes(3 * MiB)
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="runs/run7.h5", Body=payload)
    body = {
        "source_type": "s3",
        "user_email": user(),
        "dataset_name": "from s3",
        "sensor": "HDF5",
        "convert": False,
        "is_public": False,
        "folder": None,
        "team_uuid": None,
        "source_config": {
            "bucket_name": bucket,
            "object_key": "runs/run7.h5",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": secret,
        },
    }
    answer = http.post("/api/upload/initiate", json=body)
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["job_id"]
    parameters = control.get_job(job_id).parameters
    block = parameters["source_credentials_block"]
    assert parameters["source"] == f"s3://{bucket}/runs/run7.h5"
    assert secret not in json.dumps(parameters)
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(block, "aws-credentials")
        assert stored.data["aws_access_key_id"] == "AKIAEXAMPLE"

    final = wait_final(api.url, job_id)
    assert final["status"] == "completed", final
    assert final["sha256"] == sha(payload)
    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_block_document_by_name(block, "aws-credentials")  # deleted once the job was over

    mongo = MongoClient(settings.mongodb_uri)
    try:
        mirrored = wait_for(
            "the job's mirror document",
            lambda: mongo[settings.mirror_database]["jobs"].find_one({"_id": job_id}),
            60,
        )
        assert secret not in json.dumps(mirrored, default=str)
        legacy = list(mongo[settings.mirror_scientistcloud_database]["jobs"].find({}))
        assert secret not in json.dumps(legacy, default=str)
    finally:
        mongo.close()
    assert secret not in api.log.read_text()


# -------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JOBBRIDGE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_upload_waits_for_the_job_and_fails_in_one_line(api: ApiProcess, tmp_path: Path) -> None:
    small = tmp_path / "note.txt"
    small.write_text("hello\n" * 1000)
    base = ["--user-email", user(), "--dataset-name", "notes", "--sensor", "OTHER"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = _cli("upload", str(small), *base, "--api", api.url, "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["upload_type"] == "standard" and result["job"]["status"] == "completed"
    assert result["sha256"] == sha(small.read_bytes())

    chunked = tmp_path / "chunked.bin"
    chunked.write_bytes(random.Random(19).randbytes(6 * MiB))
    done = _cli("upload", str(chunked), *base, "--api", api.url, "--wait", "--public", env=env)
    assert done.returncode == 0, done.stderr
    job_id, status = done.stdout.split()
    assert status == "completed" and "chunked.bin" in done.stderr  # the progress bar
    assert httpx.get(f"{api.url}/api/upload/status/{job_id}").json()["result"]["is_public"] is True

    _one_line_error(_cli("upload", str(tmp_path / "nope.bin"), *base, "--api", api.url), 2, "no file at")
    _one_line_error(_cli("upload", str(small), *base[:-1], "XRAY", "--api", api.url), 2, "sensor 'XRAY'")
    _one_line_error(
        _cli("upload", str(small), *base, "--api", f"http://127.0.0.1:{free_port()}"), 5, "cannot be reached"
    )
    _one_line_error(_cli("api", "--port", str(api.port)), 5, f"port {api.port}", "--port")


def test_remote_sources_are_checked_before_any_job_exists(http: httpx.Client) -> None:
    from prefect.client.orchestration import get_client

    def initiate(source_type: str, config: dict[str, Any]) -> httpx.Response:
        return http.post(
            "/api/upload/initiate", json={"source_type": source_type, "source_config": config, **fields()}
        )

    def credential_blocks() -> set[str]:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents_by_type("aws-credentials", include_secrets=False)
        return {doc.name for doc in documents if doc.name and doc.name.startswith("jobbridge-upload-src-")}

    drive = initiate(
        "google_drive", {"file_id": "1AbCdEfGhIjKlMnOp", "service_account_file": "/nowhere/key.json"}
    )
    assert drive.status_code == 422 and "gdrive_service_account_file" in drive.json()["detail"], drive.text
    assert "not supported" in initiate("dropbox", {"path": "/x"}).json()["detail"]
    assert "http(s) URL" in initiate("url", {"url": "ftp://example.org/x"}).json()["detail"]
    assert "source_config.bucket_name is required" in initiate("s3", {"object_key": "k"}).json()["detail"]
    before = credential_blocks()
    refused = initiate(
        "s3",
        {
            "bucket_name": "b",
            "object_key": "k",
            "access_key_id": "AKIAX",
            "secret_access_key": "never-kept",
            "endpoint_url": "not a url",
        },
    )
    assert refused.status_code == 422 and "s3_endpoint" in refused.json()["detail"], refused.text
    assert "never-kept" not in refused.text
    assert credential_blocks() == before  # the block made for it was deleted with the refusal
