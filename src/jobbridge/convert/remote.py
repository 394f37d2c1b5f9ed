"""Datasets in an object store (``s3://``): converted from a local copy, published back with fsspec.

OpenVisus writes only to local files, and a staging directory renamed into place is the simplest way
to never show a half-written dataset, so a remote dataset is copied to a local temporary directory
(streamed, file by file, never held in memory), converted and verified there, then uploaded. The entry
files (``visus.idx``; Zarr's ``.zgroup``/``.zattrs``/``.zmetadata``) go up last, so readers that open a
dataset by its entry never see it incomplete; a failed upload deletes what it wrote. Object stores
have no rename: replacing an existing output (``overwrite``) deletes it first, so it is briefly absent.

Needs local disk for the input and the output; ``TMPDIR`` chooses where.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.settings import get_settings
from jobbridge.tasks.credentials import s3_access
from jobbridge.tasks.locations import Location, LocationKind, parse_location

#: Location kinds a conversion reads from and writes to.
CONVERT_LOCATIONS: tuple[LocationKind, ...] = ("local", "s3")


def parse(value: str) -> Location:
    """A source or destination string as a local path or an ``s3://`` location."""
    return parse_location(value, allow=CONVERT_LOCATIONS)


def filesystem(location: Location) -> Any:
    """An fsspec filesystem for ``location`` (S3 with the settings' endpoint and keys)."""
    import s3fs

    if location.kind != "s3":
        raise ValueError(f"{location.label()} is not in an object store")
    return s3fs.S3FileSystem(**s3_access(get_settings()).fsspec_options())


def _hidden_or_excluded(rel: PurePosixPath, excluded: Collection[str]) -> bool:
    text = rel.as_posix()
    return any(part.startswith(".") for part in rel.parts) or any(
        text == prefix or text.startswith(prefix + "/") for prefix in excluded
    )


@contextlib.contextmanager
def local_copy(location: Location, *, exclude: Collection[str] = ()) -> Iterator[Path]:
    """A local copy of a remote file or directory, deleted afterwards.

    ``exclude``: paths relative to the dataset not to copy (its earlier conversions, ``converted/...``).
    """
    fs = filesystem(location)
    scratch = Path(tempfile.mkdtemp(prefix="jobbridge-convert-"))
    try:
        root = location.path.rstrip("/")
        name = PurePosixPath(root).name or "dataset"
        if fs.isfile(root):
            target = scratch / name
            fs.get(root, str(target))
            yield target
            return
        files = [PurePosixPath(path) for path in fs.find(root)]
        if not files:
            raise JobValidationError(f"{location.label()}: no such file or directory, or it is empty")
        target = scratch / name
        wanted = [f for f in files if not _hidden_or_excluded(f.relative_to(root), exclude)]
        for remote in wanted:
            local = target / remote.relative_to(root)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get(str(remote), str(local))
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remote_exists(location: Location) -> bool:
    """True when anything exists at (or under) ``location``."""
    fs = filesystem(location)
    return bool(fs.exists(location.path.rstrip("/")))


def upload_tree(local: Path, location: Location, *, entries: Collection[str], overwrite: bool) -> int:
    """Upload the directory ``local`` to ``location``, ``entries`` last; returns the bytes uploaded.

    An existing destination is an error unless ``overwrite`` (then it is deleted first). On failure,
    whatever was uploaded is deleted, so nothing partial stays behind.
    """
    fs = filesystem(location)
    root = location.path.rstrip("/")
    if fs.exists(root):
        if not overwrite:
            raise JobValidationError(
                f"destination {location.label()} exists; choose another or set overwrite=true to replace it"
            )
        fs.rm(root, recursive=True)
    files = sorted(
        (Path(directory) / name for directory, _, names in os.walk(local) for name in names),
        key=lambda path: path.relative_to(local).as_posix() in entries,
    )
    sent = 0
    try:
        for path in files:
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
            sent += path.stat().st_size
        stored = int(fs.du(root))
        if stored != sent:
            raise JobbridgeError(
                f"upload to {location.label()} is incomplete: {stored} of {sent} bytes arrived; retrying"
            )
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(root, recursive=True)
        raise
    return sent
