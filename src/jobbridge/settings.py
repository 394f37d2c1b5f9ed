"""Settings: ``JOBBRIDGE_*`` environment variables (and a ``.env`` file), read once per process.

Legacy environment names are accepted as aliases where a legacy system had one, so a team can point its old
environment at jobbridge unchanged. Secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ProcessingMode(StrEnum):
    """How jobs run: NORMAL; DEBUG logs every step to a debug file; TEST isolates names under a prefix."""

    NORMAL = "NORMAL"
    DEBUG = "DEBUG"
    TEST = "TEST"


#: Which job types each legacy layout mirrors by default (the job types its system had).
DEFAULT_MIRROR_LAYOUTS: dict[str, tuple[str, ...]] = {
    "scientistcloud": ("sync", "upload", "convert", "extract", "compress", "backup", "validate"),
    "receipt_trainer": ("train",),
    "delphi": ("command",),
    "argoitny": ("script_generation", "problem_extraction"),
}


class Settings(BaseSettings):
    """Everything jobbridge can be told from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="JOBBRIDGE_", env_file=".env", extra="ignore", populate_by_name=True
    )

    mode: ProcessingMode = ProcessingMode.NORMAL
    test_prefix: str = Field(default="test_", pattern=r"^[a-z][a-z0-9_\-]{0,30}$")
    debug_log_file: Path = Path("job_processor_debug.log")

    home: Path = Field(
        default=Path(".jobbridge"),
        description="Project-local state dir of the embedded stack (pid files, logs, databases).",
    )
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("JOBBRIDGE_PREFECT_API_URL", "PREFECT_API_URL"),
        description="Prefect API to use; defaults to the embedded stack's server when it is up.",
    )
    prefect_port: int = Field(default=4200, ge=1, le=65535)
    moto_port: int = Field(default=4566, ge=1, le=65535)
    mongo_port: int = Field(default=27017, ge=1, le=65535)
    work_pool: str = "local"
    execution: Literal["auto", "pool", "inprocess"] = Field(
        default="auto",
        description="auto: through the work pool when a worker is online, else in-process.",
    )
    worker_warm_processes: int = Field(default=1, ge=0, le=32)
    worker_query_seconds: float = Field(default=0.5, gt=0, le=60)
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules to import so that their job types register."
    )

    extract_max_total_bytes: int = Field(default=64 * 1024**3, gt=0)
    extract_max_members: int = Field(default=1_000_000, gt=0)
    progress_interval_seconds: float = Field(default=0.5, gt=0)

    dataset_store: str = Field(
        default="",
        description="Where datasets live, as an fsspec URL (a local directory or s3://bucket/prefix); "
        "empty means <home>/datasets.",
    )
    upload_dir: Path | None = Field(
        default=None, description="Staging area of chunked uploads; default <home>/uploads."
    )
    upload_chunk_size: int = Field(
        default=64 * 1024**2, ge=1024**2, le=5 * 1024**3, description="Bytes per upload chunk."
    )
    upload_single_request_max: int = Field(
        default=100 * 1024**2, gt=0, description="Files up to this size go in one request, larger in chunks."
    )
    upload_expiry_hours: float = Field(
        default=24.0, gt=0, description="An unfinished upload idle this long is deleted."
    )
    upload_path_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories whose files /api/upload/upload-path may ingest (comma list); "
        "empty turns that route off.",
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    rclone_binary: str = Field(default="rclone", description="The rclone executable (Debian's package).")

    spot_notice_url: str = Field(
        default="http://169.254.169.254/latest/meta-data/spot/instance-action",
        description="EC2 spot interruption notice endpoint that train jobs watch (404 = no notice).",
    )
    spot_poll_seconds: float = Field(default=5.0, gt=0, le=300)
    batch_concurrency: int = Field(default=4, ge=1, le=256, description="Item groups a batch runs at once.")
    batch_group_size: int = Field(default=0, ge=0, description="Items per task; 0 = chosen from the count.")
    dask_address: str | None = Field(
        default=None,
        description="Dask scheduler for batch fan-out ('local': a LocalCluster); none: threads.",
    )

    aws_region: str = Field(
        default="us-east-1",
        validation_alias=AliasChoices("JOBBRIDGE_AWS_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    aws_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("JOBBRIDGE_AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("JOBBRIDGE_AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    aws_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("JOBBRIDGE_AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        description="DynamoDB/S3 endpoint; defaults to the embedded moto server (set it empty for AWS).",
    )
    mongodb_url: SecretStr | None = Field(
        default=None,
        description="MongoDB URL (may hold a password, so it is kept secret); defaults to the embedded one.",
    )

    mirror_dynamodb: bool = Field(default=True, description="Mirror into DynamoDB (jobbridge layout).")
    mirror_mongodb: bool = Field(default=True, description="Mirror into MongoDB (jobbridge layout).")
    mirror_database: str = Field(default="jobbridge", description="MongoDB database of the mirror.")
    mirror_scientistcloud_database: str = Field(
        default="scientistcloud",
        description="MongoDB database of the ScientistCloud layout (its own DB_NAME): its jobs collection "
        "must not be jobbridge's.",
    )
    mirror_layouts: dict[str, list[str]] = Field(
        default_factory=lambda: {key: list(value) for key, value in DEFAULT_MIRROR_LAYOUTS.items()},
        description='Legacy layout -> job types it mirrors ("*" = all), as JSON; {} turns them off.',
    )
    mirror_blocks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Saved DynamoDBMirror/MongoDBMirror block names; when set they replace the above.",
    )
    mirror_reconcile_seconds: float = Field(default=5.0, gt=0, le=3600)
    mirror_stale_seconds: float = Field(
        default=10.0, gt=0, description="A RUNNING job whose process is gone this long is marked CRASHED."
    )

    @field_validator("plugins", "mirror_blocks", "upload_path_roots", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("mirror_layouts")
    @classmethod
    def _known_layouts(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(DEFAULT_MIRROR_LAYOUTS))
        if unknown:
            known = ", ".join(DEFAULT_MIRROR_LAYOUTS)
            raise ValueError(f"unknown legacy layout(s) {', '.join(unknown)}: use {known}")
        return value

    @property
    def namespace(self) -> str:
        """The prefix of every name this process creates: the test prefix in TEST mode, else empty."""
        return self.test_prefix if self.mode is ProcessingMode.TEST else ""

    def namespaced(self, name: str) -> str:
        """``name`` under this mode's namespace (TEST mode keeps test jobs apart from production)."""
        return f"{self.namespace}{name}"

    @property
    def tag_prefix(self) -> str:
        """Prefix of the tags jobbridge puts on flow runs; TEST mode gets its own."""
        return self.namespaced("jobbridge")

    @property
    def deployment_name(self) -> str:
        """Name of each job type's deployment (``<type>/<deployment_name>``); one per work pool."""
        base = "jobbridge" if self.work_pool == "local" else f"jobbridge-{self.work_pool}"
        return self.namespaced(base)

    @property
    def dynamodb_endpoint(self) -> str | None:
        """The DynamoDB endpoint: the configured one ("" means AWS itself), else the embedded moto server."""
        if self.aws_endpoint_url is None:
            return f"http://127.0.0.1:{self.moto_port}"
        return self.aws_endpoint_url or None

    @property
    def mongodb_uri(self) -> str:
        """The MongoDB URL: the configured one, else the embedded nx-27017 server."""
        if self.mongodb_url is not None and self.mongodb_url.get_secret_value():
            return self.mongodb_url.get_secret_value()
        return f"mongodb://127.0.0.1:{self.mongo_port}/"

    @property
    def state_dir(self) -> Path:
        """Absolute path of :attr:`home`."""
        return self.home.expanduser().resolve()

    @property
    def dataset_store_url(self) -> str:
        """The dataset store as an fsspec URL or local path: the configured one, else ``<home>/datasets``."""
        return self.dataset_store or str(self.state_dir / "datasets")

    @property
    def upload_staging_dir(self) -> Path:
        """Absolute path of the chunked-upload staging area."""
        return (self.upload_dir or self.state_dir / "uploads").expanduser().resolve()

    @property
    def s3_endpoint(self) -> str | None:
        """The S3 endpoint: the same rule as :attr:`dynamodb_endpoint` (embedded moto unless configured)."""
        return self.dynamodb_endpoint

    def redacted(self) -> dict[str, Any]:
        """All settings as plain values, with every secret replaced by ``**********``."""
        shown: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                shown[name] = "**********" if value.get_secret_value() else ""
            elif isinstance(value, StrEnum):
                shown[name] = value.value
            elif isinstance(value, Path):
                shown[name] = str(value)
            else:
                shown[name] = value
        return shown


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; call :func:`reload_settings` after changing the environment."""
    return Settings()


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again."""
    get_settings.cache_clear()
    return get_settings()
