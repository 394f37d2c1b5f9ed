"""SHA-256 of files and trees, and manifests in ``sha256sum`` format.

A manifest is what ``sha256sum`` writes and ``sha256sum -c`` reads: one ``<64 hex>  <relative path>`` line
per regular file, paths relative to the tree's root. Staying with that format lets a user check a tree with
coreutils alone, and lets jobbridge verify manifests that other tools wrote.

Hashing reads 1 MiB at a time; hashlib releases the GIL while it hashes such buffers, so a small thread pool
hashes several files at once (useful for many small files, where opening and reading dominate).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobbridge.errors import JobValidationError
from jobbridge.tasks.files import BUFFER_SIZE, ProgressFn, no_progress, relative_inside, walk_tree

#: Suffix of the manifest that ``compress`` writes beside its archive.
MANIFEST_SUFFIX = ".sha256"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_thread_buffers = threading.local()


def default_workers() -> int:
    """Hashing threads: one per core, at most 8 (beyond that the disk, not the CPU, is the limit)."""
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------------
# Hashing


def _buffer() -> memoryview:
    """This thread's reusable read buffer (allocating 1 MiB per file would dominate small files)."""
    view: memoryview | None = getattr(_thread_buffers, "view", None)
    if view is None:
        view = memoryview(bytearray(BUFFER_SIZE))
        _thread_buffers.view = view
    return view


def sha256_file(path: str | os.PathLike[str], progress: ProgressFn = no_progress) -> tuple[str, int]:
    """SHA-256 hex digest and size of one file, read once in 1 MiB pieces."""
    digest = hashlib.sha256()
    view = _buffer()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(view)
            if not count:
                break
            digest.update(view[:count])
            size += count
            progress(count)
    return digest.hexdigest(), size


class HashingReader:
    """A read-only file wrapper that hashes what passes through it, so copying a file also hashes it.

    tarfile reads each member's data through ``read``; wrapping the source file here means the archive
    and the manifest are produced from one read of each file.
    """

    def __init__(self, raw: Any, progress: ProgressFn = no_progress) -> None:
        self._raw = raw
        self._progress = progress
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        """Read from the wrapped file, hashing and counting what is returned."""
        data: bytes = self._raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        self._progress(len(data))
        return data

    def hexdigest(self) -> str:
        """SHA-256 of everything read so far."""
        return self.digest.hexdigest()


class HashingWriter:
    """A write-only file wrapper that hashes and counts what is written (the archive's own SHA-256)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hash, count and write ``data``."""
        self.digest.update(data)
        self.size += len(data)
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        """Flush the wrapped file."""
        self._raw.flush()

    def tell(self) -> int:
        """Bytes written so far (gzip and tarfile ask for a position)."""
        return self.size

    def hexdigest(self) -> str:
        """SHA-256 of everything written so far."""
        return self.digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The sha256sum line format


def format_manifest_line(digest: str, rel: str) -> str:
    """One ``sha256sum`` line; names holding a backslash or newline are escaped as coreutils does."""
    if "\\" in rel or "\n" in rel or "\r" in rel:
        escaped = rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {rel}\n"


def _unescape(name: str, line_number: int, source: str) -> str:
    out: list[str] = []
    chars = iter(name)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        following = next(chars, "")
        if following not in ("\\", "n", "r"):
            raise JobValidationError(
                f"manifest {source} line {line_number}: bad escape '\\{following}' in the file name"
            )
        out.append({"\\": "\\", "n": "\n", "r": "\r"}[following])
    return "".join(out)


def normalise_manifest_path(name: str, line_number: int, source: str) -> str:
    """A manifest path as a clean relative posix path (``./a//b`` -> ``a/b``); refuses escapes."""
    if name.startswith("/"):
        raise JobValidationError(
            f"manifest {source} line {line_number}: '{name}' is an absolute path; "
            "manifest paths must be relative to the tree"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise JobValidationError(
            f"manifest {source} line {line_number}: '{name}' is not a path inside the tree"
        )
    return "/".join(parts)


def parse_manifest_line(line: str, line_number: int, source: str = "") -> tuple[str, str]:
    """``(relative path, lower-case hex digest)`` of one manifest line; the error names the line."""
    escaped = line.startswith("\\")
    body = line[1:] if escaped else line
    digest, separator, name = body[:64], body[64:66], body[66:]
    if len(digest) != 64 or not _HEX_DIGITS.issuperset(digest) or separator not in ("  ", " *") or not name:
        raise JobValidationError(
            f"manifest {source} line {line_number} is not '<64 hex digits>  <path>' "
            f"(sha256sum format): {line[:120]!r}"
        )
    if escaped:
        name = _unescape(name, line_number, source)
    return normalise_manifest_path(name, line_number, source), digest.lower()


def read_manifest(path: Path) -> dict[str, str]:
    """Relative path -> hex digest of every line of a ``sha256sum`` manifest; blank lines are skipped.

    Malformed or duplicate lines are a :class:`JobValidationError` naming the line number, since a
    manifest that cannot be read exactly cannot prove anything about the tree.
    """
    entries: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        for number, raw_line in enumerate(handle, start=1):
            line = raw_line.rstrip("\n")
            if line.endswith("\r"):
                line = line[:-1]
            if not line.strip():
                continue
            rel, digest = parse_manifest_line(line, number, str(path))
            if rel in entries:
                raise JobValidationError(f"manifest {path} line {number}: '{rel}' is listed twice")
            entries[rel] = digest
    return entries


def write_manifest(path: Path, lines: Iterable[tuple[str, str]], *, overwrite: bool = False) -> None:
    """Write ``(relative path, digest)`` pairs as a manifest, atomically (``<path>.partial`` + rename)."""
    if path.exists() and not overwrite:
        raise JobValidationError(f"manifest {path} exists; set overwrite=true to replace it")
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as out:
            for rel, digest in lines:
                out.write(format_manifest_line(digest, rel))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Trees


@dataclass(frozen=True, slots=True)
class TreeFile:
    """A regular file of a tree: where it is and its size when listed."""

    path: str
    size: int


def manifest_exclusions(root: Path, manifest: Path) -> set[str]:
    """Relative paths of the manifest (and its partial file) when they lie inside the tree."""
    excluded: set[str] = set()
    for candidate in (manifest, manifest.with_name(manifest.name + ".partial")):
        rel = relative_inside(candidate, root)
        if rel:
            excluded.add(rel)
    return excluded


def list_files(root: Path, *, exclude: Iterable[str] = ()) -> dict[str, TreeFile]:
    """Every regular file under ``root`` (links not followed), by relative path, in walk order."""
    return {
        entry.rel: TreeFile(entry.path, entry.size)
        for entry in walk_tree(root, exclude=frozenset(exclude))
        if entry.kind == "file"
    }


def hash_files(
    files: Mapping[str, TreeFile],
    *,
    progress: ProgressFn = no_progress,
    workers: int | None = None,
) -> Iterator[tuple[str, str, int]]:
    """``(relative path, digest, size)`` of each file, in the order given, hashed on a thread pool.

    Results and progress reports are yielded from the caller's thread, so a progress callback that talks
    to the Prefect API never runs on a pool thread.
    """
    count = workers or default_workers()
    items = iter(files.items())
    if count <= 1:
        for rel, info in items:
            digest, size = sha256_file(info.path)
            progress(size)
            yield rel, digest, size
        return
    # A bounded window of submitted files keeps memory flat for millions of files while every
    # thread always has work queued.
    window: deque[tuple[str, Future[tuple[str, int]]]] = deque()
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="sha256") as pool:
        for rel, info in items:
            window.append((rel, pool.submit(sha256_file, info.path)))
            if len(window) >= count * 32:
                yield _collect(window.popleft(), progress)
        while window:
            yield _collect(window.popleft(), progress)


def _collect(pending: tuple[str, Future[tuple[str, int]]], progress: ProgressFn) -> tuple[str, str, int]:
    rel, future = pending
    digest, size = future.result()
    progress(size)
    return rel, digest, size


@dataclass
class TreeCheck:
    """How a tree compares with its manifest; ``ok`` when nothing is missing, extra or changed."""

    path: str
    manifest: str
    files: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the tree matches the manifest exactly."""
        return not (self.missing or self.extra or self.changed)

    @property
    def differences(self) -> int:
        """Number of files that differ from the manifest in any way."""
        return len(self.missing) + len(self.extra) + len(self.changed)

    def summary(self) -> str:
        """One line: ``3 files differ from the manifest: 1 missing, 1 extra, 1 changed``."""
        if self.ok:
            return f"{self.files} files match the manifest ({self.bytes} bytes)"
        noun = "file differs" if self.differences == 1 else "files differ"
        return (
            f"{self.differences} {noun} from the manifest: {len(self.missing)} missing, "
            f"{len(self.extra)} extra, {len(self.changed)} changed"
        )

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        """JSON result; with ``limit``, each list is cut to that many paths and ``truncated`` says so."""
        lists = {"missing": self.missing, "extra": self.extra, "changed": self.changed}
        cut = {name: values[:limit] if limit is not None else values for name, values in lists.items()}
        return {
            "path": self.path,
            "manifest": self.manifest,
            "files": self.files,
            "bytes": self.bytes,
            **cut,
            "differences": {name: len(values) for name, values in lists.items()},
            "truncated": any(len(cut[name]) < len(lists[name]) for name in lists),
            "ok": self.ok,
        }


def compare_tree(
    root: Path,
    manifest: Path,
    expected: Mapping[str, str],
    present: Mapping[str, TreeFile],
    *,
    progress: ProgressFn = no_progress,
    workers: int | None = None,
) -> TreeCheck:
    """Hash the files that both the manifest and the tree hold, and list every difference (sorted).

    ``files``/``bytes`` count what was hashed; files only in the tree are ``extra`` and are not read.
    """
    check = TreeCheck(path=str(root), manifest=str(manifest))
    to_hash = {rel: present[rel] for rel in expected if rel in present}
    for rel, digest, size in hash_files(to_hash, progress=progress, workers=workers):
        check.files += 1
        check.bytes += size
        if digest != expected[rel]:
            check.changed.append(rel)
    check.missing = sorted(rel for rel in expected if rel not in present)
    check.extra = sorted(rel for rel in present if rel not in expected)
    check.changed.sort()
    return check


def verify_tree(
    root: Path, manifest: Path, *, progress: ProgressFn = no_progress, workers: int | None = None
) -> TreeCheck:
    """Compare the tree under ``root`` with ``manifest`` (a manifest inside the tree is not 'extra')."""
    expected = read_manifest(manifest)
    present = list_files(root, exclude=manifest_exclusions(root, manifest))
    return compare_tree(root, manifest, expected, present, progress=progress, workers=workers)


@dataclass(frozen=True)
class ManifestWritten:
    """A manifest written for a tree: where, for which tree, how many files and bytes it covers."""

    path: str
    manifest: str
    files: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON result of a ``validate`` job in create mode."""
        return {"path": self.path, "manifest": self.manifest, "files": self.files, "bytes": self.bytes}


def create_manifest(
    root: Path,
    manifest: Path,
    *,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    workers: int | None = None,
    present: Mapping[str, TreeFile] | None = None,
) -> ManifestWritten:
    """Hash every regular file under ``root`` and write the manifest (excluding the manifest itself)."""
    if manifest.exists() and not overwrite:
        raise JobValidationError(f"manifest {manifest} exists; set overwrite=true to replace it")
    files = present if present is not None else list_files(root, exclude=manifest_exclusions(root, manifest))
    totals = [0, 0]

    def lines() -> Iterator[tuple[str, str]]:
        for rel, digest, size in hash_files(files, progress=progress, workers=workers):
            totals[0] += 1
            totals[1] += size
            yield rel, digest

    write_manifest(manifest, lines(), overwrite=overwrite)
    return ManifestWritten(str(root), str(manifest), totals[0], totals[1])
