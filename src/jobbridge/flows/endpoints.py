"""Parameter checks that the transfer job types (sync, upload, backup) share.

Each turns a bad value into a pydantic error whose text says what is accepted, so that the registry's
message reads ``parameter 'source' must be ...`` at submission, before any run exists.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from jobbridge.settings import Settings
from jobbridge.tasks.credentials import S3Access, block_name_problem, s3_access
from jobbridge.tasks.locations import Location, LocationError, LocationKind, parse_location

_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/.*)?$")


def invalid(message: str) -> PydanticCustomError:
    """A validation error with exactly ``message`` (no "Value error, " prefix)."""
    return PydanticCustomError("value", message)


def check_location(value: str, allow: Collection[LocationKind]) -> str:
    """Field-validator body: a parseable location of an allowed kind; local paths come back absolute."""
    try:
        location = parse_location(value, allow=allow)
    except LocationError as error:
        raise invalid(f"is not a usable location: {error}") from None
    return location.path if location.kind == "local" else value


def location_of(value: str, allow: Collection[LocationKind]) -> Location:
    """The parsed location of an already validated value."""
    return parse_location(value, allow=allow)


def check_block_name(value: str | None) -> str | None:
    """Field-validator body for a ``*_credentials_block`` parameter: a block *name*, never a secret."""
    if value is None:
        return None
    problem = block_name_problem(value)
    if problem is not None:
        raise invalid(problem)
    return value


def check_endpoint(value: str | None) -> str | None:
    """Field-validator body for ``s3_endpoint``: an http(s) URL without credentials in it."""
    if value is None:
        return None
    if not _ENDPOINT.match(value) or "@" in value:
        raise invalid(
            "must be an http(s) URL such as https://s3.eu-west-1.amazonaws.com, without credentials"
        )
    return value.rstrip("/")


def check_existing_file(value: Path | None) -> Path | None:
    """Field-validator body for a key or service-account file the worker reads."""
    if value is not None and not value.is_file():
        raise invalid(f"must be an existing file on the worker: {value} is not")
    return value


#: Field types that carry their check, so each parameters model declares a field once and validates it too.
BlockName = Annotated[str | None, AfterValidator(check_block_name)]
S3Endpoint = Annotated[str | None, AfterValidator(check_endpoint)]
WorkerFile = Annotated[Path | None, AfterValidator(check_existing_file)]


def s3_for(
    location: Location, settings: Settings, *, block: str | None, endpoint: str | None
) -> S3Access | None:
    """S3 access for an ``s3://`` location (credentials from ``block`` or the settings), else ``None``."""
    if location.kind != "s3":
        return None
    return s3_access(settings, block=block, endpoint=endpoint)


def child(location: Location, name: str) -> Location:
    """``location/name`` (``name`` already checked to be one safe path component)."""
    if location.kind == "local":
        return Location("local", str(Path(location.path) / name))
    return Location(location.kind, f"{location.path.rstrip('/')}/{name}", location.host, location.user)


def manifest_beside(location: Location) -> Location:
    """``<location>.sha256``: where a backup's manifest lives, beside the tree it describes."""
    return Location(location.kind, location.path.rstrip("/") + ".sha256", location.host, location.user)
