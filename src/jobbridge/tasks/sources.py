"""What a transfer reads: the files of a local path or of an fsspec location (S3), by relative path.

Listing comes first, so a job knows its total bytes for progress and can refuse names that would leave
the destination before writing anything. Local trees are walked without following links: a link in a
dataset pointing at ``/etc`` must not pull ``/etc`` into the dataset store, so links (and devices,
sockets, fifos) are reported as skipped, never read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jobbridge.errors import JobValidationError
from jobbridge.tasks.credentials import S3Access
from jobbridge.tasks.files import walk_tree
from jobbridge.tasks.locations import Location, LocationError, safe_relative_path, safe_segment
from jobbridge.tasks.s3 import s3_filesystem


class Reader(Protocol):
    """What the copy loop needs from a source file."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file to transfer: its path relative to the destination, its size and where it is."""

    rel: str
    size: int
    path: str


@dataclass
class SourceListing:
    """The files of a source, their total size, and what was skipped (links, special files)."""

    label: str
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    single: bool = False

    @property
    def bytes(self) -> int:
        """Total size of the files."""
        return sum(item.size for item in self.files)


class Source(Protocol):
    """A place files are read from."""

    def listing(self) -> SourceListing:
        """Every file to transfer."""
        ...

    def open(self, item: SourceFile) -> contextlib.AbstractContextManager[Reader]:
        """The file's content, for reading once from the start."""
        ...


class LocalSource:
    """A local file or directory tree; links and special files are skipped, never followed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def listing(self) -> SourceListing:
        """A file lists as its own name; a directory as its tree (relative to it)."""
        listing = SourceListing(str(self.path))
        if not self.path.is_dir():
            if not self.path.is_file():
                raise JobValidationError(f"source {self.path} is not a regular file or a directory")
            listing.single = True
            listing.files.append(
                SourceFile(safe_segment(self.path.name), self.path.stat().st_size, str(self.path))
            )
            return listing
        for entry in walk_tree(self.path):
            if entry.kind == "file":
                listing.files.append(SourceFile(entry.rel, entry.size, entry.path))
            elif entry.kind != "dir":
                listing.skipped.append(entry.rel)
        return listing

    @contextlib.contextmanager
    def open(self, item: SourceFile) -> Iterator[Reader]:
        """Open without following a link swapped in since the listing (``O_NOFOLLOW``)."""
        descriptor = os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb", buffering=0) as handle:
            yield handle


class FsspecSource:
    """An object or every object under a prefix of an fsspec filesystem (S3)."""

    def __init__(self, fs: Any, path: str, label: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.label = label

    def listing(self) -> SourceListing:
        """One object by its base name, or every object under the prefix by its path below it."""
        listing = SourceListing(self.label)
        info = _info(self.fs, self.path)
        if info is not None and info.get("type") == "file":
            listing.single = True
            name = self.path.rsplit("/", 1)[-1]
            listing.files.append(SourceFile(_checked(name, self.label), int(info["size"]), self.path))
            return listing
        found = self.fs.find(self.path, detail=True)
        if not found:
            raise JobValidationError(f"source {self.label} does not exist (no object, no objects below it)")
        prefix = self.path + "/"
        for name, detail in sorted(found.items()):
            if detail.get("type") != "file" or not name.startswith(prefix):
                continue
            listing.files.append(
                SourceFile(_checked(name[len(prefix) :], self.label), int(detail["size"]), name)
            )
        return listing

    @contextlib.contextmanager
    def open(self, item: SourceFile) -> Iterator[Reader]:
        """Read in 8 MiB ranged requests (s3fs retries a failed range on its own)."""
        with self.fs.open(item.path, "rb", block_size=8 << 20, cache_type="readahead") as handle:
            yield handle


def _info(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = fs.info(path)
    except FileNotFoundError:
        return None
    return info


def _checked(rel: str, label: str) -> str:
    """Object names become paths under the destination: refuse those that would leave it."""
    try:
        return safe_relative_path(rel)
    except LocationError as error:
        raise JobValidationError(f"source {label} holds an unsafe name: {error}") from None


def open_source(location: Location, *, s3: S3Access | None = None) -> Source:
    """The source for a local path or an S3 location."""
    if location.kind == "local":
        return LocalSource(Path(location.path))
    if location.kind == "s3" and s3 is not None:
        return FsspecSource(s3_filesystem(s3), location.path, location.label())
    raise JobValidationError(f"{location.label()}: this source must be a local path or s3://")
