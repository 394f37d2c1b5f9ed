"""The sync, upload and backup jobs against real components: the session's Prefect server and worker, its
moto_server (S3), the rclone binary, an SFTP server (``rclone serve sftp``) and an HTTP server with Range
support (tests/support/range_server.py) that can drop a connection mid-download.

Main paths go through the work pool (``control.submit`` + ``wait_for``: the job runs in a worker's
process); the rest run in this process through ``control.submit(..., wait=True)`` with in-process
execution, which validates and records them the same way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pydantic import BaseModel, ConfigDict

from jobbridge import control, registry
from jobbridge.errors import JobValidationError
from jobbridge.jobs import Job, JobStatus
from jobbridge.settings import Settings, get_settings, reload_settings
from jobbridge.tasks.transfer import RcloneEndpoint, run_check
from tests.support.helpers import free_port, wait_for
from tests.support.range_server import random_file, serving

pytestmark = pytest.mark.usefixtures("prefect_api")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def pool_settings() -> Settings:
    """Every job through the work pool: the session's worker runs it in its own process."""
    return reload_settings().model_copy(update={"execution": "pool"})


@pytest.fixture
def local_settings() -> Settings:
    """Every job in this process."""
    return reload_settings().model_copy(update={"execution": "inprocess"})


@pytest.fixture(scope="module")
def s3(prefect_api: str) -> Any:
    """A boto3 client of the stack's moto_server (the endpoint the jobs use by default)."""
    return boto3.client(
        "s3",
        endpoint_url=get_settings().s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"jb-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def run(job_type: str, parameters: dict[str, Any], settings: Settings, timeout: float = 180) -> Job:
    """Submit a job and wait until it is final (in this process, or through the pool)."""
    job = Job(name=f"{job_type} test", type=job_type, parameters=parameters)
    if settings.execution == "inprocess":
        return control.submit(job, wait=True, timeout=timeout, settings=settings)
    submitted = control.submit(job, settings=settings)
    return control.wait_for(submitted.id, timeout=timeout, settings=settings)


def completed(job: Job) -> dict[str, Any]:
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.progress == 100.0
    assert isinstance(job.result, dict)
    return job.result


def task_run_counts(job: Job) -> dict[str, int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(job.id)]))
        )
    return {run.name.rsplit("-", 1)[0]: run.run_count for run in runs}


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(300_000),
        "sub/deep/c.tif": os.urandom(70_000),
        "skip/d.txt": b"delta\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def objects(s3: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        item["Key"][len(prefix) :]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listed
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------------------------------
# sync


def test_sync_local_to_s3_and_back_with_checksum_check(
    tmp_path: Path, s3: Any, bucket: str, pool_settings: Settings
) -> None:
    files = make_tree(tmp_path / "src")
    up = completed(
        run(
            "rsync_transfer",
            {"source": str(tmp_path / "src"), "destination": f"s3://{bucket}/data"},
            pool_settings,
        )
    )
    assert (up["files"], up["bytes"], up["mode"]) == (4, sum(map(len, files.values())), "copy")
    assert up["check"]["ok"] is True and up["check"]["matched"] == 4 and up["check"]["method"] == "hash"
    assert objects(s3, bucket, "data/") == files

    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "stale.txt").write_text("not in the source")
    down = completed(
        run(
            "google_sync",
            {"source": f"s3://{bucket}/data", "destination": str(tmp_path / "back"), "mode": "sync"},
            pool_settings,
        )
    )
    assert down["deleted"] == 1 and down["check"]["ok"] is True
    assert tree_of(tmp_path / "back") == files


def test_sync_dry_run_changes_nothing(tmp_path: Path, local_settings: Settings) -> None:
    make_tree(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "extra.txt").write_text("keep me")
    before = tree_of(tmp_path / "dst")
    result = completed(
        run(
            "sync",
            {
                "source": str(tmp_path / "src"),
                "destination": str(tmp_path / "dst"),
                "mode": "sync",
                "dry_run": True,
            },
            local_settings,
        )
    )
    assert sorted(item["path"] for item in result["would_copy"]) == [
        "a.txt",
        "skip/d.txt",
        "sub/b.bin",
        "sub/deep/c.tif",
    ]
    assert result["would_delete"] == ["extra.txt"]
    assert "check" not in result and result["files"] == 0
    assert tree_of(tmp_path / "dst") == before


def test_sync_include_and_exclude_filters_apply_to_the_copy_and_the_check(
    tmp_path: Path, local_settings: Settings
) -> None:
    files = make_tree(tmp_path / "src")
    (tmp_path / "src" / "skip" / "e.tif").write_bytes(b"excluded")
    result = completed(
        run(
            "sync",
            {
                "source": str(tmp_path / "src"),
                "destination": str(tmp_path / "dst"),
                "include": ["*.txt", "*.tif"],
                "exclude": ["skip/**"],
            },
            local_settings,
        )
    )
    assert tree_of(tmp_path / "dst") == {"a.txt": files["a.txt"], "sub/deep/c.tif": files["sub/deep/c.tif"]}
    assert result["files"] == 2 and result["check"] == {**result["check"], "ok": True, "matched": 2}


def test_check_reports_a_changed_file_of_the_same_size(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    shutil.copytree(tmp_path / "src", tmp_path / "dst")
    data = bytearray((tmp_path / "dst" / "sub" / "b.bin").read_bytes())
    data[1000] ^= 0xFF
    (tmp_path / "dst" / "sub" / "b.bin").write_bytes(bytes(data))
    (tmp_path / "dst" / "only-here.txt").write_text("x")
    source = RcloneEndpoint(str(tmp_path / "src"), "src")
    destination = RcloneEndpoint(str(tmp_path / "dst"), "dst")
    both_ways = run_check("rclone", source, destination, one_way=False)
    assert both_ways.changed == ["sub/b.bin"] and both_ways.missing_on_source == ["only-here.txt"]
    assert not both_ways.ok and both_ways.matched == 3
    one_way = run_check("rclone", source, destination, one_way=True)
    assert one_way.changed == ["sub/b.bin"] and one_way.missing_on_source == []


def test_sync_from_a_missing_bucket_fails_once_with_rclones_reason(
    tmp_path: Path, local_settings: Settings
) -> None:
    job = run(
        "sync",
        {"source": f"s3://jb-missing-{uuid.uuid4().hex[:12]}/x", "destination": str(tmp_path / "dst")},
        local_settings,
    )
    assert job.status is JobStatus.FAILED
    assert "directory not found" in (job.error or "")
    assert task_run_counts(job) == {"rclone-transfer": 1}  # retrying cannot make the bucket appear
    assert not (tmp_path / "dst").exists()


@dataclass
class SftpServer:
    port: int
    served: Path
    key: Path


@pytest.fixture(scope="module")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    """A real SFTP server (``rclone serve sftp``) that accepts one generated key."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    root = tmp_path_factory.mktemp("sftp")
    served = root / "served"
    served.mkdir()
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            *("rclone", "serve", "sftp", str(served), "--addr", f"127.0.0.1:{port}"),
            *("--authorized-keys", f"{key}.pub", "--key", str(key)),
        ],
        env={**os.environ, "RCLONE_CONFIG": os.devnull},
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def accepting() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for("the SFTP server to listen", accepting, timeout=30)
        yield SftpServer(port, served, key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_sync_to_sftp_with_a_key_file(
    tmp_path: Path, sftp_server: SftpServer, local_settings: Settings
) -> None:
    files = make_tree(tmp_path / "src")
    result = completed(
        run(
            "sync",
            {
                "source": str(tmp_path / "src"),
                "destination": f"sftp://amy@127.0.0.1:{sftp_server.port}/{tmp_path.name}",
                "sftp_key_file": str(sftp_server.key),
            },
            local_settings,
        )
    )
    assert result["files"] == 4 and result["check"]["ok"] is True
    assert tree_of(sftp_server.served / tmp_path.name) == files


# --------------------------------------------------------------------------------------------------
# upload


def upload_params(source: str, store: Path | str, **extra: Any) -> dict[str, Any]:
    return {
        "source": source,
        "user_email": "amy@example.edu",
        "dataset_name": "Drone survey",
        "sensor": "tiff rgb",
        "convert": False,
        "is_public": "False",
        "destination": str(store),
        **extra,
    }


def test_upload_a_local_file_through_the_pool(tmp_path: Path, pool_settings: Settings) -> None:
    data = os.urandom(2_500_000)
    (tmp_path / "scan.tif").write_bytes(data)
    job = run("file_upload", upload_params(str(tmp_path / "scan.tif"), tmp_path / "store"), pool_settings)
    result = completed(job)
    dataset_uuid = job.parameters["dataset_uuid"]
    assert uuid.UUID(dataset_uuid).version == 4 and result["dataset_uuid"] == dataset_uuid
    assert result["destination"] == str(tmp_path / "store" / dataset_uuid)
    assert result["files"] == [{"path": "scan.tif", "size": len(data), "sha256": sha(data)}]
    assert result["sha256"] == sha(data) and result["bytes"] == len(data)
    assert result["sensor"] == "TIFF RGB" and job.parameters["sensor"] == "TIFF RGB"
    assert (tmp_path / "store" / dataset_uuid / "scan.tif").read_bytes() == data
    assert leftovers(tmp_path / "store") == [dataset_uuid]  # no staging directory left behind


def test_upload_a_directory_records_every_file_and_skips_links_out(
    tmp_path: Path, local_settings: Settings
) -> None:
    files = make_tree(tmp_path / "src")
    (tmp_path / "private.key").write_text("not for the dataset")
    (tmp_path / "src" / "sub" / "key-link").symlink_to(tmp_path / "private.key")
    (tmp_path / "src" / "up").symlink_to(tmp_path)
    result = completed(
        run(
            "upload",
            upload_params(str(tmp_path / "src"), tmp_path / "store", dataset_uuid="ds-7"),
            local_settings,
        )
    )
    assert result["files"] == [
        {"path": rel, "size": len(files[rel]), "sha256": sha(files[rel])} for rel in sorted(files)
    ]
    assert result["bytes"] == sum(map(len, files.values())) and "sha256" not in result
    assert sorted(result["skipped"]) == ["sub/key-link", "up"]
    assert tree_of(tmp_path / "store" / "ds-7") == files


def test_upload_from_a_url_resumes_after_a_dropped_connection(
    tmp_path: Path, pool_settings: Settings
) -> None:
    (tmp_path / "www").mkdir()
    digest = random_file(tmp_path / "www" / "volume.h5", 3_000_000)
    with serving(tmp_path / "www") as server:
        server.drop_after(1_100_000)
        job = run("upload", upload_params(f"{server.url}/volume.h5", tmp_path / "store"), pool_settings)
        requests = list(server.requests)
    result = completed(job)
    assert result["sha256"] == digest and result["bytes"] == 3_000_000 and result["resumes"] == 1
    assert [request["range"] for request in requests] == [None, "bytes=1100000-"]  # from the byte it had
    stored = tmp_path / "store" / job.parameters["dataset_uuid"] / "volume.h5"
    assert sha(stored.read_bytes()) == digest


def test_upload_from_s3_objects_and_into_an_s3_store(
    tmp_path: Path, s3: Any, bucket: str, local_settings: Settings
) -> None:
    data, meta = os.urandom(400_000), b'{"run": 7}'
    s3.put_object(Bucket=bucket, Key="incoming/run 7/cube.nc", Body=data)
    s3.put_object(Bucket=bucket, Key="incoming/run 7/sub/meta.json", Body=meta)
    one = completed(
        run(
            "upload",
            upload_params(f"s3://{bucket}/incoming/run 7/cube.nc", tmp_path / "store"),
            local_settings,
        )
    )
    assert one["files"] == [{"path": "cube.nc", "size": len(data), "sha256": sha(data)}]
    prefix = completed(
        run("upload", upload_params(f"s3://{bucket}/incoming/run 7", tmp_path / "store"), local_settings)
    )
    assert [item["path"] for item in prefix["files"]] == ["cube.nc", "sub/meta.json"]
    assert tree_of(Path(prefix["destination"])) == {"cube.nc": data, "sub/meta.json": meta}

    big = os.urandom((16 << 20) + 5)  # more than one 16 MiB part: a multipart upload
    (tmp_path / "local.bin").write_bytes(big)
    to_s3 = completed(
        run(
            "upload",
            upload_params(str(tmp_path / "local.bin"), f"s3://{bucket}/store", dataset_uuid="ds-s3"),
            local_settings,
        )
    )
    assert to_s3["destination"] == f"s3://{bucket}/store/ds-s3" and to_s3["sha256"] == sha(big)
    assert objects(s3, bucket, "store/") == {"ds-s3/local.bin": big}
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_sink_commits_early_past_its_limits_and_still_leaves_nothing_on_failure(
    s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobbridge.tasks import sink as sink_module
    from jobbridge.tasks.credentials import s3_access
    from jobbridge.tasks.locations import parse_location

    monkeypatch.setattr(sink_module, "HELD_BYTES_LIMIT", 1)  # every small object is committed at once
    location = parse_location(f"s3://{bucket}/ds", allow=["s3"])
    access = s3_access(get_settings())
    failing = sink_module.open_sink(location, s3=access, merge=True)
    for name in ("a", "b", "c"):
        with failing.open(name) as out:
            out.write(name.encode())
    with pytest.raises(RuntimeError), failing.open("d") as out:
        out.write(os.urandom(17 << 20))  # a multipart upload, interrupted
        raise RuntimeError("connection lost")
    failing.abort()
    assert objects(s3, bucket) == {} and s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    working = sink_module.open_sink(location, s3=access, merge=True)
    for name in ("a", "b"):
        with working.open(f"sub/{name}") as out:
            out.write(name.encode())
    working.commit()
    assert objects(s3, bucket) == {"ds/sub/a": b"a", "ds/sub/b": b"b"}


def test_expected_sha256_mismatch_fails_and_leaves_nothing(
    tmp_path: Path, s3: Any, bucket: str, local_settings: Settings
) -> None:
    (tmp_path / "a.bin").write_bytes(os.urandom((16 << 20) + 1))  # a multipart upload on S3
    wrong = "0" * 64
    job = run(
        "upload",
        upload_params(str(tmp_path / "a.bin"), tmp_path / "store", expected_sha256=wrong),
        local_settings,
    )
    assert job.status is JobStatus.FAILED and "SHA-256 mismatch" in (job.error or "")
    assert f"expected {wrong}" in (job.error or "") and "nothing was stored" in (job.error or "")
    assert leftovers(tmp_path / "store") == []
    assert task_run_counts(job) == {"upload-to-dataset-store": 1}  # the same bytes would mismatch again

    on_s3 = run(
        "upload",
        upload_params(str(tmp_path / "a.bin"), f"s3://{bucket}/store", expected_sha256=wrong),
        local_settings,
    )
    assert on_s3.status is JobStatus.FAILED
    assert objects(s3, bucket) == {} and s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert (tmp_path / "a.bin").exists()


def count_jobs(settings: Settings) -> int:
    return len(control.list_jobs(limit=200, settings=settings).jobs)


def test_unsafe_names_and_missing_drive_credentials_are_refused_at_submission(
    tmp_path: Path, pool_settings: Settings
) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")
    before = count_jobs(pool_settings)
    refused = {
        "dataset_uuid": {"dataset_uuid": "../../../etc"},
        "folder": {"folder": "../outside"},
    }
    for field, extra in refused.items():
        with pytest.raises(JobValidationError, match=f"parameter '{field}'"):
            run("upload", upload_params(str(tmp_path / "a.bin"), tmp_path / "store", **extra), pool_settings)
    with pytest.raises(
        JobValidationError, match=r"parameter 'source' is a Google Drive file, and no Drive credentials"
    ):
        run(
            "upload",
            upload_params("gdrive://1AbCdEfGhIjKlMnOpQrStUvWxYz012345", tmp_path / "store"),
            pool_settings,
        )
    assert count_jobs(pool_settings) == before  # nothing was queued
    assert not (tmp_path / "store").exists()


def test_convert_without_a_convert_job_type_is_refused_at_submission(
    tmp_path: Path, pool_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.get_spec("upload")
    monkeypatch.setattr(
        registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "convert"}
    )
    (tmp_path / "a.bin").write_bytes(b"x")
    with pytest.raises(
        JobValidationError, match=r"parameter 'convert' is true, but no 'convert' job type is installed"
    ):
        run("upload", upload_params(str(tmp_path / "a.bin"), tmp_path / "store", convert=True), pool_settings)


class StubConvertParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    sensor: str


@flow(name="test-convert-stub")
def convert_stub(source: str, sensor: str) -> dict[str, str]:
    """Stands in for the convert job type: accepts what a conversion needs."""
    return {"source": source, "sensor": sensor}


@pytest.fixture
def everything_in_process() -> Iterator[None]:
    """Jobs that a job submits run in this process too (the chained convert job)."""
    previous = os.environ.get("JOBBRIDGE_EXECUTION")
    os.environ["JOBBRIDGE_EXECUTION"] = "inprocess"
    reload_settings()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("JOBBRIDGE_EXECUTION", None)
        else:
            os.environ["JOBBRIDGE_EXECUTION"] = previous
        reload_settings()


@pytest.mark.usefixtures("everything_in_process")
def test_convert_true_submits_a_convert_job_for_the_dataset(
    tmp_path: Path, local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.get_spec("upload")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("convert", convert_stub, parameters=StubConvertParameters)
    (tmp_path / "a.tif").write_bytes(b"tiff")
    job = run(
        "upload", upload_params(str(tmp_path / "a.tif"), tmp_path / "store", convert=True), local_settings
    )
    result = completed(job)
    converted = control.wait_for(result["convert_job_id"], timeout=60)
    assert converted.status is JobStatus.COMPLETED and converted.type == "convert"
    assert converted.owner == "amy@example.edu"
    assert converted.parameters == {"source": result["destination"], "sensor": "TIFF RGB"}


def test_move_source_renames_a_staged_file_without_hashing_it_again(
    tmp_path: Path, local_settings: Settings
) -> None:
    staged = get_settings().upload_staging_dir / f"up-{uuid.uuid4().hex}" / "big.raw"
    staged.parent.mkdir(parents=True)
    data = os.urandom(100_000)
    staged.write_bytes(data)
    inode = staged.stat().st_ino
    store = staged.parent.parent.parent / f"store-{tmp_path.name}"  # same filesystem as the staging area
    job = run(
        "upload",
        upload_params(str(staged), store, move_source=True, expected_sha256=sha(data), dataset_uuid="moved"),
        local_settings,
    )
    result = completed(job)
    assert result["sha256"] == sha(data) and not staged.exists()
    assert (store / "moved" / "big.raw").stat().st_ino == inode  # renamed, not copied
    shutil.rmtree(store)


# --------------------------------------------------------------------------------------------------
# backup and restore


def test_backup_then_restore_verifies_against_the_manifest(tmp_path: Path, pool_settings: Settings) -> None:
    files = make_tree(tmp_path / "dataset")
    made = completed(
        run(
            "backup_creation",
            {"source": str(tmp_path / "dataset"), "destination": str(tmp_path / "bk")},
            pool_settings,
        )
    )
    assert (made["files"], made["manifest"]) == (4, str(tmp_path / "bk.sha256"))
    subprocess.run(
        ["sha256sum", "-c", "--quiet", str(tmp_path / "bk.sha256")], cwd=tmp_path / "bk", check=True
    )
    assert tree_of(tmp_path / "bk") == files

    restored = completed(
        run(
            "backup",
            {"action": "restore", "source": str(tmp_path / "bk"), "destination": str(tmp_path / "restored")},
            pool_settings.model_copy(update={"execution": "inprocess"}),
        )
    )
    assert restored["ok"] is True and restored["files"] == 4
    assert tree_of(tmp_path / "restored") == files


def test_backup_to_s3_and_restore_from_it(
    tmp_path: Path, s3: Any, bucket: str, local_settings: Settings
) -> None:
    files = make_tree(tmp_path / "dataset")
    completed(
        run(
            "backup",
            {"source": str(tmp_path / "dataset"), "destination": f"s3://{bucket}/bk/ds"},
            local_settings,
        )
    )
    stored = objects(s3, bucket)
    assert {key for key in stored if key.startswith("bk/ds/")} == {f"bk/ds/{rel}" for rel in files}
    assert stored["bk/ds.sha256"].decode().count("\n") == 4
    again = run(
        "backup", {"source": str(tmp_path / "dataset"), "destination": f"s3://{bucket}/bk/ds"}, local_settings
    )
    assert again.status is JobStatus.FAILED and "overwrite=true" in (again.error or "")
    restored = completed(
        run(
            "backup",
            {
                "action": "restore",
                "source": f"s3://{bucket}/bk/ds",
                "destination": str(tmp_path / "restored"),
            },
            local_settings,
        )
    )
    assert restored["ok"] is True and tree_of(tmp_path / "restored") == files


def test_restore_of_a_tampered_backup_fails_listing_the_files(
    tmp_path: Path, local_settings: Settings
) -> None:
    make_tree(tmp_path / "dataset")
    completed(
        run(
            "backup",
            {"source": str(tmp_path / "dataset"), "destination": str(tmp_path / "bk")},
            local_settings,
        )
    )
    (tmp_path / "bk" / "a.txt").write_text("tampered\n")
    restore = {"action": "restore", "source": str(tmp_path / "bk"), "destination": str(tmp_path / "restored")}
    job = run("backup", restore, local_settings)
    assert job.status is JobStatus.FAILED
    assert "1 file differs from the manifest: 0 missing, 0 extra, 1 changed" in (job.error or "")
    assert job.result["changed"] == ["a.txt"] and job.result["ok"] is False
    assert not (tmp_path / "restored").exists() and leftovers(tmp_path) == ["bk", "bk.sha256", "dataset"]

    (tmp_path / "bk" / "sub" / "b.bin").unlink()
    (tmp_path / "bk" / "new.txt").write_text("added")
    job = run("backup", restore, local_settings)
    assert job.status is JobStatus.FAILED
    assert (job.result["missing"], job.result["extra"], job.result["changed"]) == (
        ["sub/b.bin"],
        ["new.txt"],
        ["a.txt"],
    )
    assert not (tmp_path / "restored").exists()
