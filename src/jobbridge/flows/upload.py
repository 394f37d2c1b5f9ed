"""``upload``: put a file or a tree into the dataset store as a ScientistCloud dataset, with SHA-256s.

ScientistCloud's ``file_upload`` and ``upload``. The source is a local file or directory, an http(s) URL
(resumed with Range requests when the connection drops), an S3 object or prefix, or a Google Drive file
(``gdrive://<file id>``). Files land under ``<dataset store>/<dataset_uuid>/`` (the store is
``JOBBRIDGE_DATASET_STORE``: a local directory or ``s3://bucket/prefix``; ``destination`` overrides it),
each hashed with SHA-256 in the same pass as its copy. Nothing is visible there until every file has
arrived (and matched ``expected_sha256``, when given): a failed upload leaves no partial file.

The upload API hands over files it has staged itself with ``move_source=true``: on the same filesystem
they are renamed into the store instead of copied (not hashed again when the API gives their SHA-256).

``convert=true`` submits a ``convert`` job for the dataset once the upload is complete; submission fails
at once when no ``convert`` job type is installed.

:class:`UploadParameters` is a contract with the upload API: keep its field names.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any, Self
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobbridge.errors import JobFailedError, JobValidationError, UnknownJobTypeError
from jobbridge.flows.common import RETRYABLE, begin
from jobbridge.flows.endpoints import (
    BlockName,
    S3Endpoint,
    WorkerFile,
    check_location,
    child,
    invalid,
    location_of,
    s3_for,
)
from jobbridge.registry import get_spec, job_type
from jobbridge.settings import Settings, get_settings
from jobbridge.tasks.credentials import drive_access
from jobbridge.tasks.fetch import CopiedFile, copy_files, download_url, sha256_stream
from jobbridge.tasks.files import field_error, relative_inside
from jobbridge.tasks.locations import (
    Location,
    LocationError,
    LocationKind,
    parse_location,
    safe_relative_path,
    safe_segment,
)
from jobbridge.tasks.progress import Progress, record_result, start_progress
from jobbridge.tasks.sink import DatasetSink, LocalSink, open_sink
from jobbridge.tasks.sources import LocalSource, Source, SourceListing, open_source
from jobbridge.tasks.transfer import (
    raise_for_outcome,
    rclone_binary,
    rclone_endpoint,
    rclone_environment,
    run_rclone,
)

SOURCE_KINDS: tuple[LocationKind, ...] = ("local", "s3", "gdrive", "http")
STORE_KINDS: tuple[LocationKind, ...] = ("local", "s3")
#: At most this many files are listed in the job's result (``file_count`` is always complete).
RESULT_FILES_LIMIT = 1000
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_DRIVE_FILE_ID = re.compile(r"^[A-Za-z0-9_\-]{10,200}$")


class ChecksumMismatchError(JobValidationError):
    """The data's SHA-256 is not the expected one (not retried: the same bytes would arrive again)."""


class Sensor(StrEnum):
    """ScientistCloud's sensor types; input is matched ignoring case, '_', '-' and spaces."""

    IDX = "IDX"
    TIFF = "TIFF"
    TIFF_RGB = "TIFF RGB"
    NETCDF = "NETCDF"
    HDF5 = "HDF5"
    NEXUS_4D = "4D_NEXUS"
    RGB = "RGB"
    MAPIR = "MAPIR"
    OTHER = "OTHER"

    @classmethod
    def _missing_(cls, value: object) -> Sensor | None:
        if not isinstance(value, str):
            return None
        key = _sensor_key(value)
        return next((member for member in cls if _sensor_key(member.value) == key), None)


def _sensor_key(value: str) -> str:
    return re.sub(r"[\s_\-]+", "", value).upper()


class UploadParameters(BaseModel):
    """Parameters of an ``upload`` job (a contract with the upload API: keep the field names)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="A local file or directory, http(s)://..., s3://bucket/key-or-prefix, gdrive://<file id>."
    )
    user_email: str = Field(description="Owner of the dataset.")
    dataset_name: str = Field(min_length=1, max_length=255, description="Name shown for the dataset.")
    sensor: Sensor = Field(description=f"One of {', '.join(s.value for s in Sensor)} (any case).")
    convert: bool = Field(description="Submit a convert job for the dataset after the upload.")
    is_public: bool = Field(description="Whether the dataset is public.")
    folder: str | None = Field(
        default=None,
        description="Folder the dataset is filed under (a relative path; recorded, not a subdir).",
    )
    team_uuid: str | None = Field(default=None, description="Team the dataset belongs to.")
    dataset_uuid: str = Field(
        description="Dataset id and directory name in the store; a new UUID4 when absent."
    )
    destination: str | None = Field(
        default=None, description="Dataset store to use instead of JOBBRIDGE_DATASET_STORE (dir or s3://)."
    )
    expected_sha256: str | None = Field(
        default=None, description="SHA-256 the (single) file must have; a mismatch fails the job."
    )
    move_source: bool = Field(
        default=False,
        description="Move the source into the store (renamed when on the same filesystem); only for "
        "files staged under the upload directory (JOBBRIDGE_UPLOAD_DIR).",
    )
    source_credentials_block: BlockName = Field(
        default=None,
        description="AwsCredentials block (s3://) or Secret block (gdrive://: token or service-account "
        "JSON) for the source.",
    )
    gdrive_service_account_file: WorkerFile = Field(
        default=None, description="Google service-account key file on the worker, for gdrive:// sources."
    )
    s3_endpoint: S3Endpoint = Field(
        default=None, description="S3 endpoint of an s3:// source (default: JOBBRIDGE_AWS_ENDPOINT_URL)."
    )

    @model_validator(mode="before")
    @classmethod
    def _new_dataset_uuid(cls, data: Any) -> Any:
        """A missing dataset_uuid is generated here, at submission, so the job's parameters carry it."""
        if isinstance(data, dict) and not data.get("dataset_uuid"):
            data = {**data, "dataset_uuid": str(uuid.uuid4())}
        return data

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return check_location(value, SOURCE_KINDS)

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        return None if value is None else check_location(value, STORE_KINDS)

    @field_validator("user_email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not _EMAIL.match(value.strip()):
            raise invalid("must be an e-mail address such as amy@example.edu")
        return value.strip()

    @field_validator("dataset_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or any(ord(char) < 32 for char in value):
            raise invalid("must be a non-empty name without control characters")
        return value.strip()

    @field_validator("dataset_uuid")
    @classmethod
    def _dataset_uuid(cls, value: str) -> str:
        try:
            safe_segment(value)
        except LocationError as error:
            raise invalid(f"{error}: it names the dataset's directory") from None
        if not _DATASET_ID.match(value):
            raise invalid(
                "must be a UUID or an id of letters, digits, '.', '_' and '-' (it names a directory)"
            )
        return value

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            return safe_relative_path(value)
        except LocationError as error:
            raise invalid(f"must be a relative folder path inside the dataset space: {error}") from None

    @field_validator("team_uuid")
    @classmethod
    def _team(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            return safe_segment(value)
        except LocationError as error:
            raise invalid(str(error)) from None

    @field_validator("expected_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA256.match(value):
            raise invalid("must be 64 hexadecimal digits (a SHA-256)")
        return value.lower()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        source = self.source_location
        if source.kind == "local":
            self._check_local_source(source)
        elif self.move_source:
            raise field_error("move_source", "only applies to a local source", self.move_source)
        if source.kind == "gdrive":
            self._check_drive_source(source)
        if self.source_credentials_block is not None and source.kind not in ("s3", "gdrive"):
            raise field_error(
                "source_credentials_block", "only applies to an s3:// or gdrive:// source", self.source
            )
        if self.convert:
            _require_convert_job_type(self.sensor)
        return self

    def _check_local_source(self, source: Location) -> None:
        path = Path(source.path)
        if not path.is_file() and not path.is_dir():
            raise field_error("source", f"must be an existing file or directory: {path} is not", self.source)
        if path.is_dir() and self.expected_sha256 is not None:
            raise field_error(
                "expected_sha256", "only applies to a single file, and the source is a directory", self.source
            )
        if self.move_source:
            staging = get_settings().upload_staging_dir
            if relative_inside(path, staging) in (None, "", "."):
                raise field_error(
                    "move_source",
                    f"only moves files staged under the upload directory {staging}; "
                    "set move_source=false to copy",
                    self.source,
                )

    def _check_drive_source(self, source: Location) -> None:
        if not _DRIVE_FILE_ID.match(source.path):
            raise field_error(
                "source", "must be gdrive://<file id> (the id from the file's link)", self.source
            )
        if self.gdrive_service_account_file is None and self.source_credentials_block is None:
            raise field_error(
                "source",
                "is a Google Drive file, and no Drive credentials are configured: set "
                "gdrive_service_account_file (a service-account key file on the worker) or "
                "source_credentials_block (a Secret block holding a token or service-account JSON)",
                self.source,
            )

    @property
    def source_location(self) -> Location:
        """The parsed source."""
        return location_of(self.source, SOURCE_KINDS)


def _require_convert_job_type(sensor: Sensor) -> None:
    """``convert=true`` needs a ``convert`` job type that takes this sensor, checked now so that the
    submission fails, not the conversion after a long upload."""
    try:
        spec = get_spec("convert")
    except UnknownJobTypeError:
        raise field_error(
            "convert",
            "is true, but no 'convert' job type is installed on this system, so no conversion can follow "
            "the upload; submit with convert=false (and convert later), or install the convert job type",
            True,
        ) from None
    problem = _convert_sensor_problem(spec.parameters_model, sensor)
    if problem is not None:
        raise field_error(
            "convert", f"is true, but the convert job refuses sensor '{sensor.value}': {problem}", True
        )


def _convert_sensor_problem(model: type[BaseModel] | None, sensor: Sensor) -> str | None:
    """What the convert job's own parameter model says about ``sensor`` (its other fields are not
    known before the upload, so only the error located at ``sensor`` counts)."""
    if model is None or "sensor" not in model.model_fields:
        return None
    try:
        model.model_validate({"sensor": sensor.value})
    except ValidationError as error:
        for detail in error.errors():
            if tuple(detail["loc"]) == ("sensor",):
                return str(detail["msg"])
    return None


# --------------------------------------------------------------------------------------------------
# The work


def dataset_location(params: UploadParameters, settings: Settings) -> Location:
    """``<store>/<dataset_uuid>``: the dataset's directory (or S3 prefix)."""
    store = parse_location(params.destination or settings.dataset_store_url, allow=STORE_KINDS)
    return child(store, params.dataset_uuid)


class _Upload:
    """One upload attempt: fills a sink from the source, verifies, and commits or aborts."""

    def __init__(self, params: UploadParameters, sink: DatasetSink, tracker: Progress) -> None:
        self.params = params
        self.sink = sink
        self.tracker = tracker
        self.settings = get_settings()
        self.skipped: list[str] = []
        self.resumes = 0
        self.remove_after: list[Path] = []

    def run(self) -> list[CopiedFile]:
        source = self.params.source_location
        if source.kind == "http":
            return self._download(source)
        if source.kind == "gdrive":
            return self._from_drive(source)
        if source.kind == "local":
            return self._from_local(Path(source.path))
        s3 = s3_for(
            source,
            self.settings,
            block=self.params.source_credentials_block,
            endpoint=self.params.s3_endpoint,
        )
        return self._copy_listing(open_source(source, s3=s3))

    def _copy_listing(self, source: Source) -> list[CopiedFile]:
        listing = self._listing(source)
        return copy_files(source, listing.files, self.sink, progress=self.tracker.callback())

    def _listing(self, source: Source) -> SourceListing:
        listing = source.listing()
        self._check_single(listing)
        self.skipped = listing.skipped
        self.tracker.total = listing.bytes
        return listing

    def _check_single(self, listing: SourceListing) -> None:
        if self.params.expected_sha256 is not None and len(listing.files) != 1:
            raise JobValidationError(
                f"expected_sha256 applies to a single file, and {listing.label} holds {len(listing.files)}"
            )

    def _from_local(self, path: Path) -> list[CopiedFile]:
        source = LocalSource(path)
        listing = self._listing(source)
        if not (self.params.move_source and isinstance(self.sink, LocalSink) and self.sink.can_adopt(path)):
            copied = copy_files(source, listing.files, self.sink, progress=self.tracker.callback())
            if self.params.move_source:  # another filesystem: copied, and the source goes after commit
                self.remove_after = [Path(item.path) for item in listing.files]
            return copied
        adopted = []
        for item in listing.files:
            if self.params.expected_sha256 is not None:
                digest, size = self.params.expected_sha256, item.size  # the API hashed it as it arrived
                self.tracker.advance(size)
            else:
                with source.open(item) as reader:
                    digest, size = sha256_stream(reader, self.tracker.callback())
            self.sink.adopt(item.rel, Path(item.path))
            adopted.append(CopiedFile(item.rel, size, digest))
        return adopted

    def _download(self, source: Location) -> list[CopiedFile]:
        def on_size(size: int | None) -> None:
            self.tracker.total = size or 0

        copied, self.resumes = download_url(
            source.url, self.sink, progress=self.tracker.callback(), on_size=on_size
        )
        return [copied]

    def _from_drive(self, source: Location) -> list[CopiedFile]:
        """rclone fetches the file by id into a scratch directory; from there it is copied and hashed."""
        drive = drive_access(
            service_account_file=self.params.gdrive_service_account_file,
            block=self.params.source_credentials_block,
        )
        remote = rclone_endpoint(Location("gdrive", ""), "jbsrc", drive=drive)
        scratch_root = self.settings.upload_staging_dir  # sized for uploads, unlike /tmp
        scratch_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gdrive-", dir=scratch_root) as scratch:
            argv = [
                rclone_binary(self.settings.rclone_binary),
                "backend",
                "copyid",
                remote.path,
                source.path,
                scratch + "/",
                "--use-json-log",
            ]
            outcome = run_rclone(argv, rclone_environment([remote]), secrets=remote.secrets())
            raise_for_outcome(outcome, f"download of {source.label()}")
            return self._copy_listing(LocalSource(Path(scratch)))

    def verify(self, files: list[CopiedFile]) -> None:
        """A single file must match ``expected_sha256`` when it is given."""
        expected = self.params.expected_sha256
        if expected is not None and (len(files) != 1 or files[0].sha256 != expected):
            got = files[0].sha256 if len(files) == 1 else f"{len(files)} files"
            raise ChecksumMismatchError(
                f"SHA-256 mismatch for {self.params.source_location.label()}: expected {expected}, "
                f"got {got}; nothing was stored"
            )


@task(name="upload-to-dataset-store", cache_policy=NO_CACHE, **RETRYABLE)
def upload_to_store(params: UploadParameters, artifact_id: UUID | None = None) -> dict[str, Any]:
    """Copy (or move) the source into ``<store>/<dataset_uuid>/``, all or nothing.

    Not cached: the effect is in the store. A retry starts from scratch (the failed attempt left nothing).
    """
    settings = get_settings()
    target = dataset_location(params, settings)
    store_s3 = s3_for(target, settings, block=None, endpoint=None)
    sink = open_sink(target, s3=store_s3, merge=True)
    tracker = Progress(artifact_id, 0)
    upload = _Upload(params, sink, tracker)
    try:
        files = upload.run()
        upload.verify(files)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    for moved in upload.remove_after:
        moved.unlink(missing_ok=True)
    tracker.finish()
    result: dict[str, Any] = {
        "dataset_uuid": params.dataset_uuid,
        "destination": sink.url,
        "files": [item.as_dict() for item in files[:RESULT_FILES_LIMIT]],
        "file_count": len(files),
        "bytes": sum(item.size for item in files),
    }
    if len(files) == 1:
        result["sha256"] = files[0].sha256
    if upload.skipped:
        result["skipped"] = upload.skipped[:RESULT_FILES_LIMIT]
    if upload.resumes:
        result["resumes"] = upload.resumes
    return result


def chain_conversion(params: UploadParameters, dataset: str) -> str:
    """Submit the ``convert`` job for the uploaded dataset; returns its job id.

    The one place that knows what ``convert`` takes: the dataset's location and sensor (plus its id),
    limited to the fields the installed convert job type declares.
    """
    from jobbridge import control
    from jobbridge.jobs import Job

    spec = get_spec("convert")
    wanted = {"source": dataset, "sensor": params.sensor.value, "dataset_uuid": params.dataset_uuid}
    declared = spec.parameters_model.model_fields if spec.parameters_model is not None else wanted
    job = control.submit(
        Job(
            name=f"convert {params.dataset_name}"[:200],
            type="convert",
            parameters={key: value for key, value in wanted.items() if key in declared},
            owner=params.user_email,
        )
    )
    return job.id


@job_type("upload", parameters=UploadParameters)
@flow(name="upload", description="Upload a file or tree into the dataset store, with SHA-256s.")
def upload(
    source: str,
    user_email: str,
    dataset_name: str,
    sensor: str,
    convert: bool,
    is_public: bool,
    folder: str | None = None,
    team_uuid: str | None = None,
    dataset_uuid: str | None = None,
    destination: str | None = None,
    expected_sha256: str | None = None,
    move_source: bool = False,
    source_credentials_block: str | None = None,
    gdrive_service_account_file: Path | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Upload ``source`` as dataset ``dataset_uuid``; returns its files with sizes and SHA-256s."""
    values = {key: value for key, value in locals().items() if value is not None}
    params = begin("upload", UploadParameters, **values)
    label = params.source_location.label()
    artifact_id = start_progress(f"Uploading {label} as dataset {params.dataset_uuid}")
    result = {
        **upload_to_store(params, artifact_id=artifact_id),
        "dataset_name": params.dataset_name,
        "sensor": params.sensor.value,
        "user_email": params.user_email,
        "is_public": params.is_public,
        "folder": params.folder,
        "team_uuid": params.team_uuid,
        "source": label,
    }
    summary = (
        f"Uploaded {result['file_count']} files ({result['bytes']} bytes) from {label} "
        f"to {result['destination']}"
    )
    if params.convert:
        try:
            result["convert_job_id"] = chain_conversion(params, result["destination"])
        except Exception as error:
            result["convert_error"] = str(error)
            summary = (
                f"{summary}; the files are in place, but the convert job could not be submitted: {error}"
            )
            record_result(result, summary)
            raise JobFailedError(summary) from None
        summary = f"{summary}; convert job {result['convert_job_id']} submitted"
    get_run_logger().info(summary)
    record_result(result, summary)
    return result
