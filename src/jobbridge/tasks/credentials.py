"""Credentials of transfer endpoints, resolved at run time from settings or Prefect blocks, never params.

Job parameters are stored by Prefect, mirrored into DynamoDB and MongoDB and shown in the UI, so they
may only *name* where a secret lives: a prefect-aws ``AwsCredentials`` block for S3, a ``Secret`` block
(an rclone Drive token or a service-account key, as JSON) or a service-account file path for Google
Drive. This module turns those names into values inside the job's process; the values go to a
subprocess's environment (rclone) or a client (s3fs), and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from jobbridge.errors import JobValidationError
from jobbridge.settings import Settings

#: moto and other emulators accept any key, but clients refuse to sign without one.
EMULATOR_KEY = "testing"
#: Prefect block document names: lower-case letters, digits and dashes.
BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9\-]{0,127}$")


def block_name_problem(name: str) -> str | None:
    """Why ``name`` is not a Prefect block document name (checked at submission), or ``None``."""
    if BLOCK_NAME.match(name):
        return None
    return "must be the name of a saved Prefect block (lower-case letters, digits and dashes)"


@dataclass(frozen=True)
class S3Access:
    """How to reach one S3 endpoint: URL, region and (secret) keys; ``repr`` shows no secret."""

    endpoint_url: str | None
    region: str
    key_id: str | None = None
    secret: SecretStr | None = field(default=None, repr=False)
    token: SecretStr | None = field(default=None, repr=False)

    def rclone_options(self) -> dict[str, str]:
        """rclone ``s3`` remote options (``provider=Other`` talks to any S3 API, AWS included)."""
        options = {"type": "s3", "provider": "Other" if self.endpoint_url else "AWS", "region": self.region}
        if self.endpoint_url:
            options["endpoint"] = self.endpoint_url
            options["force_path_style"] = "true"
        if self.key_id and self.secret is not None:
            options["access_key_id"] = self.key_id
            options["secret_access_key"] = self.secret.get_secret_value()
            if self.token is not None:
                options["session_token"] = self.token.get_secret_value()
        else:
            options["env_auth"] = "true"  # instance role, AWS_* variables or a profile
        return options

    def fsspec_options(self) -> dict[str, Any]:
        """``s3fs.S3FileSystem`` keyword arguments (fresh instance, no listing cache: files change)."""
        options: dict[str, Any] = {
            "client_kwargs": {"region_name": self.region},
            "skip_instance_cache": True,
            "use_listings_cache": False,
        }
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.key_id and self.secret is not None:
            options["key"] = self.key_id
            options["secret"] = self.secret.get_secret_value()
            if self.token is not None:
                options["token"] = self.token.get_secret_value()
        return options


def s3_access(settings: Settings, *, block: str | None = None, endpoint: str | None = None) -> S3Access:
    """S3 access from an ``AwsCredentials`` block named ``block``, else from the settings.

    The endpoint is, in order: ``endpoint`` (a job parameter), the block's
    ``aws_client_parameters.endpoint_url``, the settings' ``s3_endpoint`` (the embedded moto server
    unless ``JOBBRIDGE_AWS_ENDPOINT_URL`` says otherwise; empty means AWS itself).
    """
    if block:
        return _block_s3_access(settings, block, endpoint)
    url = endpoint or settings.s3_endpoint
    secret = settings.aws_secret_access_key
    if settings.aws_access_key_id and secret is not None:
        return S3Access(url, settings.aws_region, settings.aws_access_key_id, secret)
    if url and not os.environ.get("AWS_PROFILE"):
        return S3Access(url, settings.aws_region, EMULATOR_KEY, SecretStr(EMULATOR_KEY))
    return S3Access(url, settings.aws_region)


def _block_s3_access(settings: Settings, name: str, endpoint: str | None) -> S3Access:
    from prefect_aws import AwsCredentials

    block = _load_block(AwsCredentials, name, "AwsCredentials")
    # A session resolves profiles and assumed roles into plain keys, which rclone and s3fs both take.
    frozen = block.get_boto3_session().get_credentials()
    keys = frozen.get_frozen_credentials() if frozen is not None else None
    url = endpoint or block.aws_client_parameters.endpoint_url or settings.s3_endpoint
    return S3Access(
        url,
        block.region_name or settings.aws_region,
        keys.access_key if keys else None,
        SecretStr(keys.secret_key) if keys and keys.secret_key else None,
        SecretStr(keys.token) if keys and keys.token else None,
    )


@dataclass(frozen=True)
class DriveAccess:
    """Google Drive credentials for rclone's ``drive`` backend; ``repr`` shows no secret."""

    service_account_file: Path | None = None
    secret: SecretStr | None = field(default=None, repr=False)
    secret_is_service_account: bool = False
    root_folder_id: str | None = None
    read_only: bool = True

    def rclone_options(self) -> dict[str, str]:
        """rclone ``drive`` remote options."""
        options = {"type": "drive", "scope": "drive.readonly" if self.read_only else "drive"}
        if self.root_folder_id:
            options["root_folder_id"] = self.root_folder_id
        if self.service_account_file is not None:
            options["service_account_file"] = str(self.service_account_file)
        elif self.secret is not None:
            kind = "service_account_credentials" if self.secret_is_service_account else "token"
            options[kind] = self.secret.get_secret_value()
        return options


def drive_access(
    *,
    service_account_file: Path | None,
    block: str | None,
    root_folder_id: str | None = None,
    read_only: bool = True,
) -> DriveAccess:
    """Drive access from a service-account file, else from a ``Secret`` block holding JSON.

    The Secret's value is either an rclone OAuth token (``{"access_token": ..., "refresh_token": ...}``,
    as ``rclone authorize drive`` prints it) or a service-account key (``{"type": "service_account"...}``).
    """
    if service_account_file is not None:
        return DriveAccess(service_account_file, root_folder_id=root_folder_id, read_only=read_only)
    if not block:
        raise JobValidationError(
            "Google Drive needs credentials: a service-account file (gdrive_service_account_file) or the "
            "name of a Secret block holding a token or service-account key (credentials block)"
        )
    from prefect.blocks.system import Secret

    value = _load_block(Secret, block, "Secret").get()
    if isinstance(value, dict):
        is_service_account = value.get("type") == "service_account"
        text = json.dumps(value)
    else:
        text = str(value)
        is_service_account = '"service_account"' in text
    return DriveAccess(
        None, SecretStr(text), is_service_account, root_folder_id=root_folder_id, read_only=read_only
    )


def _load_block(block_type: Any, name: str, type_name: str) -> Any:
    """Load a saved block; a missing one is the user's mistake (not retried), named with the fix."""
    try:
        return block_type.load(name, _sync=True)
    except ValueError as error:
        if "Unable to find" in str(error) or "not found" in str(error).lower():
            raise JobValidationError(
                f"no {type_name} block named '{name}': create it (Prefect UI, Blocks) or name another"
            ) from None
        raise
