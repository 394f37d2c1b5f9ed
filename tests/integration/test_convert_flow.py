"""The convert job through the real stack: the session's Prefect server and worker, and its moto S3.

The main path and the failure go through the work pool under ScientistCloud's name
(``dataset_conversion``) with the three parameters the upload flow passes (source, sensor,
dataset_uuid); the S3 round trip runs in this process against the stack's moto_server.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import tifffile
import zarr
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from jobbridge import control
from jobbridge.jobs import Job, JobStatus
from jobbridge.settings import Settings, get_settings, reload_settings

pytestmark = pytest.mark.usefixtures("prefect_api")

RNG = np.random.default_rng(7)


@pytest.fixture
def pool_settings() -> Settings:
    """Every job through the work pool: the session's worker runs it in its own process."""
    return reload_settings().model_copy(update={"execution": "pool"})


def write_slices(directory: Path, volume: np.ndarray[Any, Any]) -> Path:
    directory.mkdir(parents=True)
    for index, plane in enumerate(volume):
        tifffile.imwrite(directory / f"slice_{index}.tif", plane)
    return directory


def submit_and_wait(parameters: dict[str, Any], settings: Settings) -> Job:
    job = control.submit(
        Job(name="convert test", type="dataset_conversion", parameters=parameters), settings=settings
    )
    return control.wait_for(job.id, timeout=180, settings=settings)


def test_dataset_conversion_through_the_pool_publishes_a_verified_idx(
    tmp_path: Path, pool_settings: Settings
) -> None:
    volume = RNG.integers(0, 65535, size=(40, 96, 128), dtype=np.uint16)
    dataset_uuid = str(uuid.uuid4())
    dataset = write_slices(tmp_path / dataset_uuid, volume)

    final = submit_and_wait(
        {"source": str(dataset), "sensor": "tiff", "dataset_uuid": dataset_uuid}, pool_settings
    )

    assert final.status is JobStatus.COMPLETED, final.error
    assert final.type == "convert" and final.attempts == 1 and final.progress == 100.0
    idx = dataset / "converted" / dataset_uuid / "visus.idx"
    assert final.result["open"] == str(idx)
    assert final.result["sensor"] == "TIFF" and final.result["dataset_uuid"] == dataset_uuid
    assert final.result["input"]["bytes"] == volume.nbytes
    assert final.result["verified_regions"] >= 3
    import OpenVisus

    assert np.array_equal(OpenVisus.LoadDataset(str(idx)).read(), volume)


def test_corrupt_input_fails_once_naming_the_file_and_leaves_nothing(
    tmp_path: Path, pool_settings: Settings
) -> None:
    dataset = write_slices(tmp_path / "ds", RNG.integers(0, 255, size=(10, 64, 64), dtype=np.uint8))
    broken = dataset / "slice_6.tif"
    broken.write_bytes(broken.read_bytes()[:-1500])

    final = submit_and_wait({"source": str(dataset), "sensor": "TIFF", "dataset_uuid": "d-1"}, pool_settings)

    assert final.status is JobStatus.FAILED
    assert "slice_6.tif" in (final.error or "") and "failed to read" in (final.error or "")
    assert sorted(p.name for p in dataset.iterdir()) == sorted(f"slice_{i}.tif" for i in range(10))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[final.id])))
    (task,) = [run for run in runs if run.name.startswith("convert-dataset")]
    assert task.run_count == 1  # corrupt input is not retried


def test_s3_dataset_is_converted_to_zarr_beside_it(tmp_path: Path) -> None:
    settings = reload_settings().model_copy(update={"execution": "inprocess"})
    s3 = boto3.client(
        "s3",
        endpoint_url=get_settings().s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = f"jb-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    volume = RNG.integers(0, 255, size=(6, 300, 280, 3), dtype=np.uint8)
    local = tmp_path / "upload"
    local.mkdir()
    for index, plane in enumerate(volume):
        tifffile.imwrite(local / f"{index}.tif", plane, photometric="rgb")
        s3.upload_file(str(local / f"{index}.tif"), bucket, f"datasets/u-9/{index}.tif")
    # Earlier outputs live under converted/: were this read as a slice, the job would fail.
    s3.put_object(Bucket=bucket, Key="datasets/u-9/converted/old/ignored.tif", Body=b"not a TIFF")

    job = control.submit(
        Job(
            name="s3 convert",
            type="convert",
            parameters={
                "source": f"s3://{bucket}/datasets/u-9/",
                "sensor": "RGB",
                "output_format": "zarr",
                "dataset_uuid": "u-9",
            },
        ),
        wait=True,
        timeout=180,
        settings=settings,
    )

    assert job.status is JobStatus.COMPLETED, job.error
    assert job.result["open"] == f"s3://{bucket}/datasets/u-9/converted/u-9.zarr"
    assert job.result["levels"] == 2
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=get_settings().s3_endpoint, skip_instance_cache=True
    )
    fs.get(f"{bucket}/datasets/u-9/converted/u-9.zarr/", str(tmp_path / "copy.zarr"), recursive=True)
    group = zarr.open_consolidated(str(tmp_path / "copy.zarr"), mode="r")
    assert np.array_equal(np.moveaxis(group["0"][...], 0, -1), volume)
    assert group["1"].shape == (3, 6, 150, 140)
