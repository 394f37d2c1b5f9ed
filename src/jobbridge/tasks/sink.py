"""Where transferred files are written: a local directory or S3, all or nothing.

A failed transfer must leave nothing a reader could mistake for data. Locally, files are written into a
staging directory beside the destination (``.<name>.partial-*``) and renamed into place at the end, one
rename for a new directory. On S3, objects are written as multipart uploads (parts in parallel, see
:mod:`jobbridge.tasks.s3`) that are completed only at :meth:`DatasetSink.commit`, so an object is either
absent or complete: never truncated.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, Protocol

from jobbridge.errors import JobValidationError
from jobbridge.tasks.credentials import S3Access
from jobbridge.tasks.files import (
    current_umask,
    is_empty_directory,
    publish_directory,
    remove_tree,
    walk_tree,
)
from jobbridge.tasks.locations import Location
from jobbridge.tasks.s3 import ObjectUpload, UploadPool, delete_keys, list_keys, s3_client

#: S3: uncommitted objects at most, and bytes of small ones held in memory; beyond, they are committed
#: early (and deleted again if the transfer fails).
PENDING_LIMIT = 1000
HELD_BYTES_LIMIT = 64 << 20
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Writer(Protocol):
    """What the copy loop needs from a destination file."""

    def write(self, data: bytes, /) -> Any: ...


class DatasetSink(ABC):
    """A destination directory that receives files by relative path and publishes them at once.

    ``merge``: the destination may already hold files (a dataset that grows by uploads); same-named
    files are replaced. Otherwise (``backup``, ``restore``) it must be new or empty, unless
    ``overwrite``, which replaces it as a whole.
    """

    url: str

    @abstractmethod
    def open(self, rel: str) -> contextlib.AbstractContextManager[Writer]:
        """A writable file for ``rel``; if the ``with`` body fails, the file is thrown away."""

    def can_adopt(self, path: Path) -> bool:
        """True when a local file can be moved in by a rename (same filesystem); base: never."""
        return False

    def adopt(self, rel: str, path: Path) -> None:
        """Move the local file ``path`` in as ``rel`` at commit (only if :meth:`can_adopt`)."""
        raise NotImplementedError("this destination cannot adopt files by renaming")

    @abstractmethod
    def commit(self) -> None:
        """Publish everything written."""

    @abstractmethod
    def abort(self) -> None:
        """Throw away everything written; the destination is as it was."""


# --------------------------------------------------------------------------------------------------
# Local


class LocalSink(DatasetSink):
    """Writes into ``.<name>.partial-*`` beside ``final`` and renames into place at commit."""

    def __init__(self, final: Path, *, merge: bool, overwrite: bool = False) -> None:
        self.final = final
        self.url = str(final)
        self.merge = merge
        self.overwrite = overwrite
        if not merge and not overwrite and final.is_dir() and not is_empty_directory(final):
            raise JobValidationError(
                f"destination {final} is not empty; choose a new or empty directory, or set overwrite=true"
            )
        if final.exists() and not final.is_dir():
            raise JobValidationError(f"destination {final} exists and is not a directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        self._adopted: list[tuple[Path, str]] = []

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[Writer]:
        """A new file in the staging directory (``O_EXCL | O_NOFOLLOW``: nothing there is followed)."""
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(path, _CREATE_FLAGS, 0o666), "wb", buffering=0)
        try:
            with handle:
                yield handle
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def can_adopt(self, path: Path) -> bool:
        """Same filesystem as the staging directory: a rename moves it in."""
        return path.stat().st_dev == self.staging.stat().st_dev

    def adopt(self, rel: str, path: Path) -> None:
        """Remember to rename ``path`` in at commit; until then the source stays where it is."""
        self._adopted.append((path, rel))

    def commit(self) -> None:
        """One rename for a new destination; file by file into an existing one (``merge``)."""
        if not self.merge:
            for source, rel in self._adopted:
                _move_in(source, self.staging / rel)
            publish_directory(self.staging, self.final, overwrite=self.overwrite)
            return
        if not self.final.exists():
            try:
                self.staging.chmod(0o777 & ~current_umask())
                os.rename(self.staging, self.final)
            except OSError:
                pass  # created meanwhile (another upload to the same dataset): merge file by file
        if self.staging.exists():
            for entry in walk_tree(self.staging):
                if entry.kind == "file":
                    _move_in(Path(entry.path), self.final / entry.rel)
            remove_tree(self.staging)
        for source, rel in self._adopted:
            _move_in(source, self.final / rel)

    def abort(self) -> None:
        """Remove the staging directory; adopted sources were never moved."""
        remove_tree(self.staging)


def _move_in(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


# --------------------------------------------------------------------------------------------------
# S3


class S3Sink(DatasetSink):
    """Writes objects under ``prefix`` of a bucket; they become visible together at :meth:`commit`.

    Objects are held back (multipart uploads left open, small objects kept in memory) until commit,
    except past :data:`PENDING_LIMIT` objects or :data:`HELD_BYTES_LIMIT` bytes of small ones: those are
    committed early, in the background while the copy goes on, and deleted again if the transfer fails.
    """

    def __init__(self, access: S3Access, location: Location, *, merge: bool, overwrite: bool = False) -> None:
        self.url = location.label()
        self.bucket, self.prefix = location.bucket, location.key.strip("/")
        self.pool = UploadPool(s3_client(access), self.bucket)
        self._pending: list[ObjectUpload] = []
        self._early: list[tuple[str, Future[None]]] = []
        self._stale: set[str] = set()
        if not merge:
            existing = set(list_keys(self.pool.client, self.bucket, self.prefix + "/" if self.prefix else ""))
            if existing and not overwrite:
                self.pool.close()
                raise JobValidationError(
                    f"destination {self.url} is not empty ({len(existing)} objects); choose a new prefix, "
                    "or set overwrite=true"
                )
            self._stale = existing

    def key(self, rel: str) -> str:
        """The object key of ``rel``."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[Writer]:
        """An object that appears only at :meth:`commit` (or is committed early, see the class)."""
        upload = ObjectUpload(self.pool, self.key(rel))
        try:
            yield upload
            upload.finish()
        except BaseException:
            upload.abort()
            raise
        self._pending.append(upload)
        held = sum(item.held_bytes for item in self._pending)
        if len(self._pending) >= PENDING_LIMIT or held >= HELD_BYTES_LIMIT:
            self._commit_in_background()

    def _commit_in_background(self) -> None:
        pending, self._pending = self._pending, []
        self._early += [(upload.key, self.pool.submit(upload.commit)) for upload in pending]

    def commit(self) -> None:
        """Commit everything (in parallel); with overwrite, delete what the old tree held beyond ours."""
        try:
            self._commit_in_background()
            for _, future in self._early:
                future.result()
            stale = sorted(self._stale - {key for key, _ in self._early})
            if stale:
                delete_keys(self.pool.client, self.bucket, stale)
        except BaseException:
            self.abort()
            raise
        finally:
            self.pool.close()

    def abort(self) -> None:
        """Abort pending uploads and delete objects committed early."""
        try:
            for upload in self._pending:
                with contextlib.suppress(Exception):
                    upload.abort()
            self._pending.clear()
            wait([future for _, future in self._early])
            if self._early:
                with contextlib.suppress(Exception):
                    delete_keys(self.pool.client, self.bucket, [key for key, _ in self._early])
                self._early.clear()
        finally:
            self.pool.close()


# --------------------------------------------------------------------------------------------------
# Choosing one


def open_sink(
    location: Location, *, s3: S3Access | None = None, merge: bool, overwrite: bool = False
) -> DatasetSink:
    """The sink for a local or S3 destination directory."""
    if location.kind == "local":
        return LocalSink(Path(location.path), merge=merge, overwrite=overwrite)
    if location.kind == "s3" and s3 is not None:
        return S3Sink(s3, location, merge=merge, overwrite=overwrite)
    raise JobValidationError(f"{location.label()}: a destination must be a local directory or s3://")
