"""SHA-256 manifests (``sha256sum`` format) on local disks and on S3, written all or nothing.

The format and its parsing are :mod:`jobbridge.tasks.checksum`'s; this module only adds the places a
backup's manifest can live. A manifest is staged first and published after the tree it describes, so
a reader never finds a manifest whose tree is not complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from jobbridge.errors import JobValidationError
from jobbridge.tasks.checksum import format_manifest_line, parse_manifest_line, read_manifest
from jobbridge.tasks.credentials import S3Access
from jobbridge.tasks.locations import Location
from jobbridge.tasks.s3 import s3_client


def manifest_text(lines: Iterable[tuple[str, str]]) -> str:
    """``(relative path, digest)`` pairs as manifest text (sorted by path: diffable, reproducible)."""
    return "".join(format_manifest_line(digest, rel) for rel, digest in sorted(lines))


def parse_manifest_text(text: str, source: str) -> dict[str, str]:
    """Relative path -> digest of manifest text; malformed or duplicate lines name their number."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip():
            continue
        rel, digest = parse_manifest_line(line, number, source)
        if rel in entries:
            raise JobValidationError(f"manifest {source} line {number}: '{rel}' is listed twice")
        entries[rel] = digest
    return entries


def manifest_exists(location: Location, s3: S3Access | None) -> bool:
    """True when a manifest is already there."""
    if location.kind == "local":
        return Path(location.path).exists()
    client = _client(location, s3)
    try:
        client.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def load_manifest(location: Location, s3: S3Access | None) -> dict[str, str]:
    """Read a manifest; a missing one is the user's mistake, named with where it was looked for."""
    missing = JobValidationError(
        f"manifest {location.label()} does not exist; give the backup's manifest in 'manifest'"
    )
    if location.kind == "local":
        if not Path(location.path).is_file():
            raise missing
        return read_manifest(Path(location.path))
    client = _client(location, s3)
    try:
        raw = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise missing from None
    return parse_manifest_text(raw.decode("utf-8", "surrogateescape"), location.label())


class StagedManifest:
    """A manifest ready but not yet visible: ``<path>.partial`` locally; on S3 it is put at publish."""

    def __init__(self, location: Location, s3: S3Access | None, text: str) -> None:
        self.location = location
        self._data = text.encode("utf-8", "surrogateescape")
        self._client: Any = None
        self._partial = Path(location.path + ".partial")
        if location.kind == "local":
            self._partial.write_bytes(self._data)
        else:
            self._client = _client(location, s3)

    def publish(self) -> None:
        """Make it visible: a rename, or one PUT (S3 objects appear whole)."""
        if self._client is None:
            os.replace(self._partial, self.location.path)
        else:
            self._client.put_object(Bucket=self.location.bucket, Key=self.location.key, Body=self._data)

    def discard(self) -> None:
        """Throw it away."""
        if self._client is None:
            self._partial.unlink(missing_ok=True)


def _client(location: Location, s3: S3Access | None) -> Any:
    if location.kind != "s3" or s3 is None:
        raise JobValidationError(f"{location.label()}: a manifest must be a local file or on s3://")
    return s3_client(s3, concurrency=1)
