"""``convert``: turn an uploaded dataset into a streamable multiresolution format, by sensor type.

ScientistCloud's ``dataset_conversion``. The sensor type picks the reader (TIFF / TIFF RGB / RGB image
stacks, NETCDF and HDF5 variables; see :mod:`jobbridge.convert.registry` to add one), the output is
OpenVisus IDX (what ScientistCloud streams) or an OME-Zarr pyramid. Data moves slab by slab under a
memory budget, the output is read back and compared with the input before it is published, and a
failure leaves nothing at the destination. The upload flow chains this job with ``source``, ``sensor``
and ``dataset_uuid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobbridge.convert.pipeline import (
    CONVERTED_DIR,
    ConvertRequest,
    OutputFormat,
    Progresses,
    convert_dataset,
    dataset_directory,
    default_destination,
)
from jobbridge.convert.registry import SENSOR_TYPES, get_converter
from jobbridge.convert.remote import parse
from jobbridge.errors import JobValidationError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.registry import job_type
from jobbridge.tasks.files import field_error, is_empty_directory, path_problem
from jobbridge.tasks.locations import LocationError, segment_problem
from jobbridge.tasks.progress import Progress, record_result, start_progress

#: Share of the progress bar for writing; verification takes the rest.
WRITE_SHARE = 95.0


def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("convert", "{message}", {"message": message})


def _location(value: str) -> str:
    """A source/destination as a clean string: absolute local path, or ``s3://bucket/key[/]``."""
    try:
        location = parse(value)
    except LocationError as error:
        raise _problem(str(error)) from None
    if location.kind == "local":
        return location.path
    return location.label() + ("/" if value.endswith("/") and not location.label().endswith("/") else "")


def _is_local(value: str) -> bool:
    return parse(value).kind == "local"


class ConvertParameters(BaseModel):
    """Parameters of a ``convert`` job."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="The dataset: a file or a directory, local or s3://bucket/prefix "
        "(ScientistCloud: {dataset_store}/{dataset_uuid}/). Its converted/ directory is never read."
    )
    sensor: str = Field(
        description=f"Sensor type, case-insensitive; one of ScientistCloud's {', '.join(SENSOR_TYPES)} "
        "that has a converter (TIFF, TIFF RGB, RGB, NETCDF, HDF5)."
    )
    output_format: OutputFormat = Field(
        default="idx", description="idx (OpenVisus, what ScientistCloud streams) or zarr (OME-Zarr pyramid)."
    )
    destination: str | None = Field(
        default=None,
        description="Directory to create: for idx it holds visus.idx and its data; for zarr it is the "
        f"store. Default: <dataset>/{CONVERTED_DIR}/<name> (idx) or <name>.zarr, where <dataset> is the "
        "source directory (or a file's directory) and <name> the dataset_uuid or the source's name.",
    )
    variable: str | None = Field(
        default=None,
        description="NETCDF/HDF5: the variable (or HDF5 dataset path) to convert; default: the largest "
        "numeric 2-D/3-D one.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing output at the destination.")
    dataset_uuid: str | None = Field(
        default=None, description="ScientistCloud dataset id; names the output and is kept in its metadata."
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        cleaned = _location(value)
        if _is_local(cleaned):
            problem = path_problem(Path(cleaned), "any")
            if problem is not None:
                raise _problem(f"must be an existing file or directory: {problem}")
        return cleaned

    @field_validator("sensor")
    @classmethod
    def _sensor_has_converter(cls, value: str) -> str:
        try:
            return get_converter(value).sensor
        except JobValidationError as error:
            raise _problem(str(error)) from None

    @field_validator("output_format", mode="before")
    @classmethod
    def _lower_case_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("destination")
    @classmethod
    def _destination_location(cls, value: str | None) -> str | None:
        return None if value is None else _location(value)

    @field_validator("dataset_uuid")
    @classmethod
    def _uuid_is_a_name(cls, value: str | None) -> str | None:
        problem = None if value is None else segment_problem(value)
        if problem is not None:
            raise _problem(f"names the output directory, so it {problem}")
        return value

    @model_validator(mode="after")
    def _variable_and_destination(self) -> Self:
        if self.variable is not None and not get_converter(self.sensor).takes_variable:
            raise field_error(
                "variable",
                f"applies to NETCDF and HDF5 datasets, not to sensor '{self.sensor}'",
                self.variable,
            )
        if self.destination is None:
            self.destination = default_destination(self.source, self.output_format, self.dataset_uuid)
        if _is_local(self.destination):
            problem = local_destination_problem(
                Path(self.source) if _is_local(self.source) else None,
                Path(self.destination),
                overwrite=self.overwrite,
            )
            if problem is not None:
                raise field_error("destination", problem, self.destination)
        return self

    def request(self) -> ConvertRequest:
        """The validated parameters as the conversion's request."""
        assert self.destination is not None  # filled in by validation
        return ConvertRequest(
            source=self.source,
            sensor=self.sensor,
            destination=self.destination,
            output_format=self.output_format,
            variable=self.variable,
            overwrite=self.overwrite,
            dataset_uuid=self.dataset_uuid,
        )


def local_destination_problem(source: Path | None, destination: Path, *, overwrite: bool) -> str | None:
    """Why ``destination`` cannot receive the output, or ``None``.

    It must not be the source or hold it (publishing replaces the destination), must not be a file,
    and must be new or empty unless ``overwrite``. Its directory must exist, except the dataset's own
    ``converted/`` directory (where outputs go by default), which the job creates.
    """
    if source is not None and (destination == source or destination in source.parents):
        return f"{destination} is the source or contains it; choose a directory outside the source"
    if destination.exists() and not destination.is_dir():
        return f"{destination} is a file; give a directory to create"
    if destination.is_dir() and not overwrite and not is_empty_directory(destination):
        return f"{destination} exists and is not empty; set overwrite=true to replace it"
    converted = None if source is None else Path(dataset_directory(str(source))) / CONVERTED_DIR
    if destination.parent != converted and not destination.parent.is_dir():
        return f"the directory of {destination} does not exist; create it first"
    return None


@task(name="convert-dataset", cache_policy=NO_CACHE, **RETRYABLE)
def convert_dataset_task(request: ConvertRequest, artifact_id: UUID | None = None) -> dict[str, Any]:
    """Read, write, verify and publish; progress counts input bytes written, then bytes verified.

    Not cached (the output is a side effect); a retry starts over in a fresh staging directory.
    """
    spans: dict[str, Progress] = {}

    def started(total: int, verify_total: int) -> None:
        spans["write"] = Progress(artifact_id, total, high=WRITE_SHARE)
        spans["verify"] = Progress(artifact_id, verify_total, low=WRITE_SHARE)

    result = convert_dataset(
        request,
        Progresses(
            converted=lambda amount: spans["write"].advance(amount),
            verified=lambda amount: spans["verify"].advance(amount),
            started=started,
        ),
    )
    spans["write"].finish()
    spans["verify"].finish()
    return result.as_dict()


@job_type("convert", parameters=ConvertParameters)
@flow(
    name="convert", description="Convert a dataset (TIFF stack, NetCDF, HDF5) to multiresolution IDX or Zarr."
)
def convert(
    source: str,
    sensor: str,
    output_format: str = "idx",
    destination: str | None = None,
    variable: str | None = None,
    overwrite: bool = False,
    dataset_uuid: str | None = None,
) -> dict[str, Any]:
    """Convert ``source`` (read as ``sensor``) to ``output_format`` at ``destination``."""
    params = begin(
        "convert",
        ConvertParameters,
        source=source,
        sensor=sensor,
        output_format=output_format,
        destination=destination,
        variable=variable,
        overwrite=overwrite,
        dataset_uuid=dataset_uuid,
    )
    request = params.request()
    artifact_id = start_progress(
        f"Converting {request.source} ({request.sensor}) to {request.output_format} at {request.destination}"
    )
    result = convert_dataset_task(request, artifact_id=artifact_id)
    shape = "x".join(str(n) for n in result["input"]["shape"])
    record_result(
        result,
        f"Converted {result['input']['description']} ({shape} {result['input']['dtype']}, "
        f"{result['input']['bytes']} bytes) to {request.output_format} at {result['open']}; "
        f"{result['verified_regions']} regions verified",
    )
    return result
