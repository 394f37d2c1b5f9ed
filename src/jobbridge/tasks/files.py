"""Filesystem helpers shared by the archive and checksum tasks.

Three concerns live here because extract, compress and validate all need them: walking a tree in a stable
order without following links, staging output next to its final place so that a failed job leaves nothing
behind, and checking the paths a user passes as job parameters (with errors that name the field).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from jobbridge.errors import JobValidationError

#: Read and write size of every file operation here: large enough that system-call and interpreter
#: overhead vanish next to the copying, small enough to stay in the CPU cache.
BUFFER_SIZE = 1 << 20

#: A callable that is told how many units (bytes, usually) of work were just done.
ProgressFn = Callable[[int], None]

EntryKind = Literal["file", "dir", "symlink", "other"]


def no_progress(amount: int) -> None:
    """Progress callback that ignores its reports, so the file functions never test for ``None``."""


# --------------------------------------------------------------------------------------------------
# Walking a tree


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One thing found under a root: its posix path relative to the root, its path, kind and lstat."""

    rel: str
    path: str
    kind: EntryKind
    stat: os.stat_result

    @property
    def size(self) -> int:
        """Size in bytes of a regular file (0 for anything else)."""
        return self.stat.st_size if self.kind == "file" else 0


def _kind(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def walk_tree(root: Path, *, exclude: Collection[str] = ()) -> Iterator[TreeEntry]:
    """Everything under ``root`` depth-first, names sorted in each directory, links not followed.

    Sorting makes archives and manifests reproducible; not following links keeps a link that points out
    of the tree from pulling foreign data in (links are reported as ``symlink`` entries). ``exclude``
    holds relative paths to skip (e.g. a manifest that lives inside the tree). The root is not yielded.
    """
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as scan:
            children = sorted(scan, key=lambda entry: entry.name)
        subdirs: list[tuple[str, str]] = []
        for child in children:
            rel = prefix + child.name
            if rel in exclude:
                continue
            info = child.stat(follow_symlinks=False)
            entry = TreeEntry(rel, child.path, _kind(info.st_mode), info)
            yield entry
            if entry.kind == "dir":
                subdirs.append((child.path, rel + "/"))
        # Depth first with each directory's content right after it, in sorted order.
        stack.extend(reversed(subdirs))


def single_file_entry(path: Path) -> TreeEntry:
    """The entry of a lone file, named by its base name (what an archive of one file holds)."""
    info = path.lstat()
    return TreeEntry(path.name, os.fspath(path), _kind(info.st_mode), info)


def relative_inside(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` as a posix string when it lies inside ``root``, else ``None``."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix()


# --------------------------------------------------------------------------------------------------
# Staging output next to its destination


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def remove_tree(path: Path) -> None:
    """Delete a directory tree or a file, if present; links inside are removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def staging_directory(destination: Path) -> Iterator[Path]:
    """A fresh directory beside ``destination`` (``.<name>.partial-<random>``), removed on any failure.

    Beside, not in /tmp, so that publishing it is a rename on the same filesystem: the destination
    either does not change or appears complete. The caller publishes with :func:`publish_directory`;
    whatever is left at the end (on failure, or not published) is deleted.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
    finally:
        remove_tree(staging)


def is_empty_directory(path: Path) -> bool:
    """True for a directory with nothing in it."""
    with os.scandir(path) as scan:
        return next(scan, None) is None


def publish_directory(staging: Path, destination: Path, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``destination``; an existing non-empty one is replaced only if ``overwrite``.

    An empty destination directory is replaced by the rename itself; a non-empty one is first moved
    aside, so there is no moment at which a half-replaced tree is visible.
    """
    staging.chmod(0o777 & ~current_umask())
    try:
        os.rename(staging, destination)
        return
    except OSError:
        if not destination.is_dir() or is_empty_directory(destination):
            raise
    if not overwrite:
        raise JobValidationError(
            f"destination {destination} is not empty; choose a new or empty directory, "
            "or set overwrite=true to replace it"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    os.rename(destination, aside / "old")
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(aside / "old", destination)  # put the old tree back before failing
        remove_tree(aside)
        raise
    remove_tree(aside)


def remove_quietly(*paths: Path) -> None:
    """Remove leftover partial files after a failure, without masking the failure itself."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Streams


class CountingReader(io.RawIOBase):
    """A raw file that counts the bytes read from it (``consumed``), e.g. archive bytes for progress.

    It only counts: reads may happen on a read-ahead thread, and progress callbacks may talk to the
    Prefect API, so the consumer reports the count from its own thread.
    """

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw
        self.consumed = 0

    def readable(self) -> bool:
        """Always: this wraps a file opened for reading."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` and count."""
        count = self._raw.readinto(buffer) or 0
        self.consumed += count
        return count


_END = object()


class ReadAhead:
    """Reads ``source`` on a background thread, up to ``depth`` 1 MiB chunks ahead of the consumer.

    Decompression (zstd, zlib, bz2, lzma all release the GIL) then overlaps with the consumer's work,
    creating and writing files, as ``tar -I zstd -x`` overlaps the two processes of its pipe. The
    consumer sees a forward-only file: ``read``, ``readinto``, ``tell`` and forward ``seek``. Errors
    of the source are raised in the consumer's thread at the position where they happened.
    """

    def __init__(
        self,
        source: IO[bytes],
        *,
        on_chunk: Callable[[], None] = lambda: None,
        depth: int = 8,
    ) -> None:
        self._source = source
        self._on_chunk = on_chunk
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._chunk = memoryview(b"")
        self._offset = 0
        self._position = 0
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)
        self._thread.start()

    # -- producer ---------------------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(BUFFER_SIZE)
                if not data:
                    break
                self._queue.put(data)
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put(error)
            return
        self._queue.put(_END)

    # -- consumer ---------------------------------------------------------------------------------

    def _next_chunk(self) -> bool:
        if self._done:
            return False
        item = self._queue.get()
        self._on_chunk()
        if item is _END:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._chunk = memoryview(item)  # type: ignore[arg-type]
        self._offset = 0
        return True

    def _take(self, limit: int) -> memoryview:
        """Up to ``limit`` bytes of the current chunk (fetching the next one when it is used up)."""
        if self._offset >= len(self._chunk) and not self._next_chunk():
            return memoryview(b"")
        piece = self._chunk[self._offset : self._offset + limit]
        self._offset += len(piece)
        self._position += len(piece)
        return piece

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` as far as the stream goes."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            piece = self._take(len(view) - filled)
            if not piece:
                break
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        return filled

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes (fewer at the end); ``-1`` reads to the end."""
        parts: list[bytes] = []
        remaining = size if size >= 0 else None
        while remaining is None or remaining > 0:
            piece = self._take(BUFFER_SIZE if remaining is None else remaining)
            if not piece:
                break
            parts.append(bytes(piece))
            if remaining is not None:
                remaining -= len(piece)
        return b"".join(parts)

    def tell(self) -> int:
        """Bytes consumed so far."""
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Skip forward (tarfile seeks over padding); backwards is impossible on a stream."""
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise io.UnsupportedOperation("a read-ahead stream only seeks forward")
        while self._position < target and self._take(target - self._position):
            pass
        return self._position

    def close(self) -> None:
        """Stop the producer and wait for it: drain the queue so a blocked ``put`` returns."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Path checks for parameter models


def field_error(field: str, message: str, value: Any) -> ValidationError:
    """A validation error located at ``field``, raised from a model validator that sees several fields.

    jobbridge's error text names the field from the error's location, so a cross-field rule (say,
    "destination must be empty unless overwrite") still reports the field the user has to change.
    """
    return ValidationError.from_exception_data(
        "parameters",
        [InitErrorDetails(type=PydanticCustomError("path", message), loc=(field,), input=value)],
    )


def path_problem(path: Path, want: Literal["file", "dir", "any"]) -> str | None:
    """Why ``path`` is not an existing file/directory (or anything), or ``None`` when it is."""
    if not path.exists():
        return f"{path} does not exist"
    if want == "file" and not path.is_file():
        return f"{path} is not a regular file"
    if want == "dir" and not path.is_dir():
        return f"{path} is not a directory"
    return None


def require_path(path: Path, want: Literal["file", "dir", "any"]) -> Path:
    """Field-validator body: ``path`` must exist (as a file / a directory); raises a clean message."""
    problem = path_problem(path, want)
    if problem is not None:
        noun = {"file": "an existing file", "dir": "an existing directory", "any": "an existing path"}
        raise PydanticCustomError(
            "path", "must be {noun}: {problem}", {"noun": noun[want], "problem": problem}
        )
    return path


def require_new_path(path: Path, *, overwrite: bool, field: str) -> None:
    """An output file path: its directory must exist, and the file must not unless ``overwrite``."""
    if not path.parent.is_dir():
        raise field_error(field, f"the directory of {path} does not exist; create it first", str(path))
    if path.is_dir():
        raise field_error(field, f"{path} is a directory; give the path of a file", str(path))
    if path.exists() and not overwrite:
        raise field_error(field, f"{path} exists; set overwrite=true to replace it", str(path))
