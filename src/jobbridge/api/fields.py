"""The dataset fields every ScientistCloud upload request carries, read from JSON or from a form.

Legacy clients send them in three shapes: JSON booleans (``/initiate``), form strings "true"/"false"
(``/upload``) and Python's ``str(bool)`` "True"/"False" (``/upload-path``). They all end up here as one
validated :class:`DatasetFields`, whose errors name the field.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobbridge.api.names import parse_bool, parse_email, parse_sensor, safe_folder, safe_token
from jobbridge.errors import JobValidationError

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class DatasetFields:
    """Who uploads what into which dataset; becomes the upload job's parameters."""

    user_email: str
    dataset_name: str
    sensor: str
    convert: bool
    is_public: bool
    folder: str | None
    team_uuid: str | None
    dataset_uuid: str

    def parameters(self) -> dict[str, Any]:
        """These fields as upload job parameters (absent optional ones left out)."""
        params: dict[str, Any] = {
            "user_email": self.user_email,
            "dataset_name": self.dataset_name,
            "sensor": self.sensor,
            "convert": self.convert,
            "is_public": self.is_public,
            "dataset_uuid": self.dataset_uuid,
        }
        if self.folder:
            params["folder"] = self.folder
        if self.team_uuid:
            params["team_uuid"] = self.team_uuid
        return params

    def as_metadata(self) -> dict[str, Any]:
        """What the staging ledger keeps to submit the job later."""
        return {
            "user_email": self.user_email,
            "dataset_name": self.dataset_name,
            "sensor": self.sensor,
            "convert": self.convert,
            "is_public": self.is_public,
            "folder": self.folder,
            "team_uuid": self.team_uuid,
            "dataset_uuid": self.dataset_uuid,
        }

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> DatasetFields:
        """Read back :meth:`as_metadata`."""
        values: dict[str, Any] = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**values)


def _required(values: Mapping[str, Any], name: str) -> str:
    value = values.get(name)
    if value is None or not str(value).strip():
        raise JobValidationError(f"{name} is required")
    return str(value).strip()


def dataset_uuid_from(values: Mapping[str, Any]) -> str:
    """The dataset to upload into: ``dataset_uuid``, else ``dataset_identifier`` (newer clients), else new.

    ScientistCloud resolved a name or slug given with ``add_to_existing``; jobbridge takes the identifier
    as the dataset's id as given (a UUID or another safe identifier).
    """
    for name in ("dataset_uuid", "dataset_identifier"):
        token = safe_token(values.get(name), name)
        if token:
            return token
    if parse_bool(values.get("add_to_existing"), "add_to_existing"):
        raise JobValidationError("add_to_existing=true needs dataset_identifier (the dataset to add to)")
    return str(uuid.uuid4())


def read_fields(values: Mapping[str, Any]) -> DatasetFields:
    """Validate the dataset fields of a request (JSON body or form)."""
    name = _required(values, "dataset_name")
    if len(name) > 255:
        raise JobValidationError("dataset_name is longer than 255 characters")
    return DatasetFields(
        user_email=parse_email(_required(values, "user_email")),
        dataset_name=name,
        sensor=parse_sensor(_required(values, "sensor")),
        convert=parse_bool(values.get("convert"), "convert", default=True),
        is_public=parse_bool(values.get("is_public"), "is_public", default=False),
        folder=safe_folder(values.get("folder")),
        team_uuid=safe_token(values.get("team_uuid"), "team_uuid"),
        dataset_uuid=dataset_uuid_from(values),
    )


def read_sha256(value: Any, name: str = "sha256") -> str | None:
    """A SHA-256 given as 64 hex digits (lower-cased), or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _SHA256.match(value.strip()):
        raise JobValidationError(f"{name} must be 64 hexadecimal digits (a SHA-256), got {value!r}")
    return value.strip().lower()
