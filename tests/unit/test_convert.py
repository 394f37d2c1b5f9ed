"""Conversion (jobbridge.convert): real TIFF/NetCDF/HDF5 files through real OpenVisus and zarr.

Every round trip reads the whole output back with the format's own library (OpenVisus ``LoadDataset``,
``zarr.open_group``), not with jobbridge's readers, and compares every value with the generated input.
Budgets are tiny so that even these small inputs go through many slabs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import netCDF4
import numpy as np
import pytest
import tifffile
import zarr

from jobbridge.convert.pipeline import ConvertRequest, OutputFormat, convert_dataset, default_destination
from jobbridge.convert.pyramid import halve, level_count
from jobbridge.convert.registry import SourceSpec, get_converter, supported_sensors
from jobbridge.convert.slabs import plan_slabs, slab_length
from jobbridge.convert.sources import dataset_files
from jobbridge.convert.verify import VerificationError, sample_boxes, verify
from jobbridge.convert.volume import ConversionInputError
from jobbridge.convert.zarr_writer import ZarrOutput
from jobbridge.errors import JobValidationError
from jobbridge.registry import get_spec

FORMATS: list[OutputFormat] = ["idx", "zarr"]
RNG = np.random.default_rng(20240611)

# --------------------------------------------------------------------------------------------------
# Helpers


def read_output(destination: Path, fmt: str) -> np.ndarray[Any, Any]:
    """The whole full-resolution array, read with the format's own library, channels last."""
    if fmt == "idx":
        import OpenVisus

        data: np.ndarray[Any, Any] = OpenVisus.LoadDataset(str(destination / "visus.idx")).read()
        return data
    group = zarr.open_group(str(destination), mode="r")
    level0 = np.asarray(group["0"][...])
    return np.moveaxis(level0, 0, -1) if "c" in group["0"].attrs["_ARRAY_DIMENSIONS"] else level0


def convert(source: Path, sensor: str, fmt: OutputFormat, budget: int = 4096, **extra: Any) -> dict[str, Any]:
    uuid = extra.get("dataset_uuid")
    destination = extra.pop("destination", None) or default_destination(str(source), fmt, uuid)
    request = ConvertRequest(str(source), sensor, str(destination), fmt, memory_budget=budget, **extra)
    return convert_dataset(request).as_dict()


def write_slices(directory: Path, volume: np.ndarray[Any, Any], **options: Any) -> Path:
    """One 2-D TIFF per slice, named without zero padding (natural order matters)."""
    directory.mkdir(parents=True)
    for index, plane in enumerate(volume):
        tifffile.imwrite(directory / f"slice_{index}.tif", plane, **options)
    return directory


def leftovers(directory: Path) -> list[str]:
    """Everything under ``directory`` (staging directories are hidden: list them too)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiff_slice_directory_round_trip(tmp_path: Path, fmt: OutputFormat) -> None:
    volume = RNG.integers(0, 65535, size=(23, 37, 51), dtype=np.uint16)
    stack = write_slices(tmp_path / "stack", volume)
    result = convert(stack, "TIFF", fmt, budget=37 * 51 * 2 * 3)  # 3 slices a slab
    destination = stack / "converted" / ("stack.zarr" if fmt == "zarr" else "stack")
    assert result["destination"] == str(destination)
    assert result["input"]["shape"] == [23, 37, 51] and result["input"]["dtype"] == "uint16"
    assert result["slabs"] > 3
    assert result["verified_regions"] >= 3
    assert np.array_equal(read_output(destination, fmt), volume)
    assert [p.name for p in (stack / "converted").iterdir()] == [destination.name]  # no staging left


@pytest.mark.parametrize("fmt", FORMATS)
def test_multipage_tiff_round_trip(tmp_path: Path, fmt: OutputFormat) -> None:
    volume = RNG.normal(size=(19, 40, 33)).astype(np.float32)
    volume[3, 4, 5] = np.nan
    tifffile.imwrite(tmp_path / "volume.tif", volume)
    result = convert(tmp_path / "volume.tif", "tiff", fmt, budget=40 * 33 * 4 * 4)
    assert result["sensor"] == "TIFF"
    back = read_output(Path(result["destination"]), fmt)
    assert np.array_equal(back, volume, equal_nan=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_image_is_converted_as_2d_by_rows(tmp_path: Path, fmt: OutputFormat) -> None:
    image = RNG.integers(0, 255, size=(301, 517), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "image.tif", image, rowsperstrip=16)
    result = convert(tmp_path / "image.tif", "TIFF", fmt, budget=517 * 20)
    assert result["input"]["shape"] == [301, 517]
    assert result["slabs"] > 5
    assert np.array_equal(read_output(Path(result["destination"]), fmt), image)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("planar", [False, True])
def test_rgb_stack_round_trip(tmp_path: Path, fmt: OutputFormat, planar: bool) -> None:
    volume = RNG.integers(0, 255, size=(6, 30, 41, 3), dtype=np.uint8)
    directory = tmp_path / "rgb"
    directory.mkdir()
    for index, plane in enumerate(volume):
        data = np.moveaxis(plane, -1, 0) if planar else plane
        tifffile.imwrite(
            directory / f"{index}.tiff", data, photometric="rgb", planarconfig="separate" if planar else None
        )
    result = convert(directory, "TIFF RGB", fmt, budget=30 * 41 * 3 * 2)
    assert result["input"]["channels"] == 3
    assert np.array_equal(read_output(Path(result["destination"]), fmt), volume)


@pytest.mark.parametrize("fmt", FORMATS)
def test_netcdf_largest_variable_round_trip_keeps_stored_values(tmp_path: Path, fmt: OutputFormat) -> None:
    path = tmp_path / "climate.nc"
    packed = RNG.integers(-30000, 30000, size=(1, 12, 45, 60), dtype=np.int16)
    with netCDF4.Dataset(path, "w") as ds:
        for name, size in (("time", 1), ("level", 12), ("lat", 45), ("lon", 60)):
            ds.createDimension(name, size)
        ds.createVariable("lat", "f4", ("lat",))[:] = np.linspace(-90, 90, 45)
        ds.createVariable("small", "f8", ("lat", "lon"))[:] = 1.0
        temp = ds.createVariable("temp", "i2", ("time", "level", "lat", "lon"), fill_value=-32767)
        temp.scale_factor, temp.add_offset, temp.units = 0.01, 273.15, "K"
        temp.set_auto_maskandscale(False)
        temp[:] = packed
    result = convert(path, "NETCDF", fmt, budget=45 * 60 * 2 * 5)
    assert result["variable"] == "temp"
    assert result["input"]["shape"] == [12, 45, 60]
    assert np.array_equal(read_output(Path(result["destination"]), fmt), packed[0])
    if fmt == "zarr":
        attributes = zarr.open_group(result["destination"], mode="r").attrs["jobbridge"]["attributes"]
        assert attributes["scale_factor"] == pytest.approx(0.01) and attributes["units"] == "K"
        assert attributes["dimensions"] == ["time", "level", "lat", "lon"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hdf5_chosen_and_default_dataset_round_trip(tmp_path: Path, fmt: OutputFormat) -> None:
    path = tmp_path / "scan.h5"
    big = RNG.normal(size=(17, 29, 31)).astype(">f8")  # big-endian on disk
    other = RNG.integers(0, 1000, size=(9, 20, 20), dtype=np.int32)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/volume", data=big, chunks=(4, 29, 31), compression="gzip")
        h5.create_dataset("entry/mask", data=other)
        h5.create_dataset("entry/title", data="scan 7")
        h5["entry/data/volume"].attrs["units"] = "counts"
    result = convert(path, "HDF5", fmt, budget=29 * 31 * 8 * 3)
    assert result["variable"] == "/entry/data/volume"
    assert result["input"]["dtype"] == "float64"
    assert np.array_equal(read_output(Path(result["destination"]), fmt), big.astype(np.float64))
    chosen = convert(path, "HDF5", fmt, variable="entry/mask", destination=tmp_path / f"mask.{fmt}")
    assert chosen["variable"] == "/entry/mask"
    assert np.array_equal(read_output(tmp_path / f"mask.{fmt}", fmt), other)


def test_zarr_pyramid_halves_y_and_x_with_mean_and_ngff_metadata(tmp_path: Path) -> None:
    volume = RNG.integers(0, 4096, size=(5, 530, 700), dtype=np.uint16)
    stack = write_slices(tmp_path / "stack", volume)
    result = convert(stack, "TIFF", "zarr", budget=530 * 700 * 2 * 2, dataset_uuid="abc-123")
    assert result["destination"] == str(stack / "converted" / "abc-123.zarr")
    assert result["levels"] == 3
    store = Path(result["destination"])
    group = zarr.open_consolidated(str(store), mode="r")
    (multiscale,) = group.attrs["multiscales"]
    assert multiscale["version"] == "0.4"
    assert [axis["name"] for axis in multiscale["axes"]] == ["z", "y", "x"]
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1", "2"]
    assert multiscale["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    assert [group[str(k)].shape for k in range(3)] == [(5, 530, 700), (5, 265, 350), (5, 133, 175)]
    expected = volume.reshape(5, 265, 2, 350, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.array_equal(group["1"][...], np.floor(expected + 0.5).astype(np.uint16))
    assert group["0"].attrs["_ARRAY_DIMENSIONS"] == ["z", "y", "x"]
    assert json.loads((store / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    assert group.attrs["jobbridge"]["dataset_uuid"] == "abc-123"


def test_halve_averages_odd_edges_with_what_exists() -> None:
    image = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    expected = np.empty((2, 3))
    for y in range(2):
        for x in range(3):
            expected[y, x] = image[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].mean()
    assert np.array_equal(halve(image, channels=False), np.floor(expected + 0.5).astype(np.uint8))
    rgb = np.stack([image, image * 2, image + 1], axis=-1)
    halved = halve(rgb, channels=True)
    assert halved.shape == (2, 3, 3) and np.array_equal(halved[..., 0], halve(image, channels=False))
    floats = np.array([[1.0, 2.0, 4.0]], dtype=np.float32)
    assert np.array_equal(halve(floats, channels=False), np.array([[1.5, 4.0]], dtype=np.float32))
    assert level_count(530, 700) == 3 and level_count(256, 256) == 1 and level_count(4000, 1) == 1


# --------------------------------------------------------------------------------------------------
# Failures leave nothing behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_slice_mid_stack_fails_naming_it_and_leaves_nothing(
    tmp_path: Path, fmt: OutputFormat
) -> None:
    volume = RNG.integers(0, 255, size=(12, 64, 80), dtype=np.uint8)
    stack = write_slices(tmp_path / "stack", volume)
    broken = stack / "slice_9.tif"
    broken.write_bytes(broken.read_bytes()[:-2000])  # the header survives, the pixels do not
    with pytest.raises(ConversionInputError, match=r"slice_9\.tif"):
        convert(stack, "TIFF", fmt, budget=64 * 80 * 2)  # slices 0-7 are written before it fails
    assert leftovers(stack) == sorted(f"slice_{i}.tif" for i in range(12))  # no converted/, no staging


def test_truncated_multipage_tiff_is_reported_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, RNG.integers(0, 255, size=(20, 64, 80), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConversionInputError, match=r"volume\.tif: truncated or damaged TIFF.*20 pages"):
        convert(path, "TIFF", "idx")
    assert leftovers(tmp_path) == ["volume.tif"]


def test_not_hdf5_and_not_tiff_are_named(tmp_path: Path) -> None:
    (tmp_path / "fake.h5").write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(ConversionInputError, match=r"fake\.h5: not a readable HDF5 file.*signature"):
        convert(tmp_path / "fake.h5", "HDF5", "zarr")
    (tmp_path / "fake.tif").write_bytes(b"hello world" * 10)
    with pytest.raises(ConversionInputError, match=r"fake\.tif: not a readable TIFF file"):
        convert(tmp_path / "fake.tif", "TIFF", "zarr")
    assert leftovers(tmp_path) == ["fake.h5", "fake.tif"]


def test_stack_of_mixed_slices_names_the_odd_one(tmp_path: Path) -> None:
    stack = write_slices(tmp_path / "stack", RNG.integers(0, 255, size=(3, 10, 12), dtype=np.uint8))
    tifffile.imwrite(stack / "slice_3.tif", np.zeros((10, 12), dtype=np.uint16))
    with pytest.raises(
        ConversionInputError, match=r"slice_3\.tif: pages are 12x10 uint16 but .*slice_0\.tif"
    ):
        convert(stack, "TIFF", "zarr")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((10, 12, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(ConversionInputError, match=r"3 samples per pixel; sensor 'TIFF' .*'TIFF RGB'"):
        convert(rgb, "TIFF", "zarr")
    with pytest.raises(ConversionInputError, match=r"sensor 'RGB' takes RGB images"):
        convert(stack / "slice_0.tif", "RGB", "zarr")


def test_netcdf_without_a_convertible_variable_lists_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "series.nc"
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("t", 50)
        ds.createVariable("values", "f4", ("t",))[:] = np.arange(50)
    with pytest.raises(ConversionInputError, match=r"no numeric 2-D or 3-D array.*values \[50\] float32"):
        convert(path, "NETCDF", "zarr")
    with pytest.raises(ConversionInputError, match=r"no variable 'temp'"):
        convert(path, "NETCDF", "zarr", variable="temp")


def test_verification_catches_an_output_that_differs(tmp_path: Path) -> None:
    volume = RNG.integers(0, 255, size=(8, 20, 30), dtype=np.uint8)
    stack = write_slices(tmp_path / "stack", volume)
    result = convert(stack, "TIFF", "zarr")
    array = zarr.open_array(str(Path(result["destination"]) / "0"), mode="r+")
    array[7, 19, 29] = (int(volume[7, 19, 29]) + 1) % 256  # the last value of the last slab
    with get_converter("TIFF").open(SourceSpec(stack, exclude=(stack / "converted",))) as reader:
        boxes = sample_boxes(reader.info, 4)
        with pytest.raises(VerificationError, match=r"region \[4:8, 0:20, 0:30\].*1 of 2400 values differ"):
            verify(reader, ZarrOutput(Path(result["destination"])), boxes, where="test")


# --------------------------------------------------------------------------------------------------
# Parameters, sensors, slabs


def test_unsupported_sensor_is_a_validation_error_listing_the_supported(tmp_path: Path) -> None:
    spec = get_spec("dataset_conversion")
    assert spec.name == "convert"
    assert supported_sensors() == ["HDF5", "NETCDF", "RGB", "TIFF", "TIFF RGB"]
    with pytest.raises(
        JobValidationError,
        match=r"parameter 'sensor' sensor type 'MAPIR' cannot be converted.*supported: HDF5, NETCDF, RGB, "
        r"TIFF, TIFF RGB",
    ):
        spec.validate_parameters({"source": str(tmp_path), "sensor": "mapir"})
    with pytest.raises(JobValidationError, match=r"'IDX' cannot be converted \(the dataset is already IDX"):
        spec.validate_parameters({"source": str(tmp_path), "sensor": "IDX"})
    with pytest.raises(JobValidationError, match=r"unknown sensor type 'JPEG'; supported: HDF5"):
        spec.validate_parameters({"source": str(tmp_path), "sensor": "JPEG"})


def test_parameters_fill_in_the_default_destination_and_check_it(tmp_path: Path) -> None:
    spec = get_spec("convert")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    checked = spec.validate_parameters({"source": str(dataset), "sensor": "tiff_rgb", "dataset_uuid": "u-1"})
    assert checked["sensor"] == "TIFF RGB"
    assert checked["destination"] == str(dataset / "converted" / "u-1")
    assert spec.validate_parameters(checked) == checked  # the worker validates the filled-in form again
    with pytest.raises(
        JobValidationError, match=r"parameter 'destination' the directory of .* does not exist"
    ):
        spec.validate_parameters(
            {"source": str(dataset), "sensor": "TIFF", "destination": str(tmp_path / "a/b")}
        )
    zarr_dest = spec.validate_parameters({"source": str(dataset), "sensor": "TIFF", "output_format": "ZARR"})
    assert zarr_dest["destination"] == str(dataset / "converted" / "ds.zarr")
    (dataset / "converted" / "ds").mkdir(parents=True)
    (dataset / "converted" / "ds" / "visus.idx").write_text("old")
    with pytest.raises(JobValidationError, match=r"parameter 'destination' .*not empty; set overwrite=true"):
        spec.validate_parameters({"source": str(dataset), "sensor": "TIFF"})
    with pytest.raises(JobValidationError, match=r"parameter 'destination' .*is the source or contains it"):
        spec.validate_parameters({"source": str(dataset), "sensor": "TIFF", "destination": str(tmp_path)})
    with pytest.raises(JobValidationError, match=r"parameter 'variable' applies to NETCDF and HDF5"):
        spec.validate_parameters(
            {"source": str(dataset), "sensor": "TIFF", "variable": "x", "overwrite": True}
        )
    with pytest.raises(JobValidationError, match=r"parameter 'source' must be an existing file or directory"):
        spec.validate_parameters({"source": str(tmp_path / "missing"), "sensor": "TIFF"})
    with pytest.raises(JobValidationError, match=r"parameter 'dataset_uuid' names the output directory"):
        spec.validate_parameters({"source": str(dataset), "sensor": "TIFF", "dataset_uuid": "../x"})
    with pytest.raises(JobValidationError, match=r"parameter 'output_format'"):
        spec.validate_parameters({"source": str(dataset), "sensor": "TIFF", "output_format": "n5"})


def test_default_destination_is_in_the_datasets_converted_directory(tmp_path: Path) -> None:
    (tmp_path / "scan.h5").write_bytes(b"")
    assert default_destination(str(tmp_path / "scan.h5"), "zarr", None) == f"{tmp_path}/converted/scan.zarr"
    assert default_destination(str(tmp_path), "idx", "u-7") == f"{tmp_path}/converted/u-7"
    assert default_destination("s3://bkt/datasets/u-7", "idx", None) == "s3://bkt/datasets/u-7/converted/u-7"
    assert default_destination("s3://bkt/ds/u-7/", "zarr", "u-7") == "s3://bkt/ds/u-7/converted/u-7.zarr"
    assert (
        default_destination("s3://bkt/ds/u-7/scan.nc", "zarr", None) == "s3://bkt/ds/u-7/converted/scan.zarr"
    )


def test_overwrite_replaces_an_existing_output(tmp_path: Path) -> None:
    first = RNG.integers(0, 255, size=(4, 16, 16), dtype=np.uint8)
    stack = write_slices(tmp_path / "stack", first)
    destination = tmp_path / "out.zarr"
    convert(stack, "TIFF", "zarr", destination=destination)
    second = first[::-1].copy()
    for index, plane in enumerate(second):
        tifffile.imwrite(stack / f"slice_{index}.tif", plane)
    convert(stack, "TIFF", "zarr", destination=destination, overwrite=True)
    assert np.array_equal(read_output(destination, "zarr"), second)
    assert leftovers(tmp_path).count("out.zarr") == 1 and not any(
        ".partial-" in p for p in leftovers(tmp_path)
    )


def test_dataset_files_are_naturally_ordered_and_skip_hidden_and_converted(tmp_path: Path) -> None:
    for name in ("b/img10.TIF", "b/img2.tif", "a.tiff", ".hidden/x.tif", "converted/y.tif", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = dataset_files(SourceSpec(tmp_path, exclude=(tmp_path / "converted",)), (".tif", ".tiff"))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.tiff", "b/img2.tif", "b/img10.TIF"]


def test_slab_length_respects_budget_and_alignment() -> None:
    assert slab_length(1000, 64_000) == 64
    assert slab_length(1000, 64_000, preferred=16) == 64
    assert slab_length(1000, 60_000, preferred=16) == 48
    assert slab_length(1000, 10_000, required=4, preferred=16) == 8
    assert slab_length(1000, 500, required=4, preferred=16) == 4  # at least one required multiple
    assert slab_length(10**9, 64 << 20) == 1  # a slice larger than the budget is one slab
    assert list(plan_slabs(10, 4)) == [(0, 4), (4, 8), (8, 10)]


def test_heavy_libraries_wait_until_a_conversion_runs() -> None:
    import subprocess
    import sys

    code = (
        "import sys, jobbridge.convert.pipeline, jobbridge.convert.registry as r; r.supported_sensors(); "
        "print(sorted(m for m in ('zarr', 'OpenVisus', 'h5py', 'netCDF4', 'tifffile') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
