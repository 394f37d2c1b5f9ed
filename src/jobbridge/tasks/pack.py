"""Packing a directory or file into tar.zst or tar.gz with a SHA-256 manifest, for ``compress``.

Why a module of its own: it is the writing half of archive handling and shares no code with the reading
half, :mod:`jobbridge.tasks.unpack`. Packing reads each file once: tarfile copies it through a
:class:`~jobbridge.tasks.checksum.HashingReader` into a zstd (multi-threaded) or gzip stream, so the
``sha256sum`` manifest and the archive's own SHA-256 come out of the same pass. Both are written as
``.partial`` files and renamed at the end.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import zstandard

from jobbridge.errors import JobValidationError
from jobbridge.tasks.checksum import (
    MANIFEST_SUFFIX,
    HashingReader,
    HashingWriter,
    format_manifest_line,
)
from jobbridge.tasks.files import (
    BUFFER_SIZE,
    ProgressFn,
    TreeEntry,
    no_progress,
    relative_inside,
    remove_quietly,
    single_file_entry,
    walk_tree,
)

log = logging.getLogger("jobbridge.tasks.pack")

CompressFormat = Literal["tar.zst", "tar.gz"]
#: Formats ``compress`` writes, with their default and accepted compression levels.
COMPRESS_LEVELS: dict[CompressFormat, tuple[int, int, int]] = {
    "tar.zst": (3, 1, 22),
    "tar.gz": (6, 1, 9),
}


@dataclass(frozen=True)
class SourceTree:
    """What a ``compress`` job will pack: every entry in archive order, and the bytes of its files."""

    root: Path
    entries: list[TreeEntry]
    bytes: int


def scan_source(source: Path) -> SourceTree:
    """Walk a directory (or take a single file) so the job knows its total before packing."""
    source = Path(source)
    entries = list(walk_tree(source)) if source.is_dir() else [single_file_entry(source)]
    return SourceTree(source, entries, sum(entry.size for entry in entries))


@dataclass(frozen=True)
class CompressResult:
    """What ``compress`` produced."""

    destination: str
    manifest: str
    format: str
    files: int
    bytes: int
    archive_bytes: int
    archive_sha256: str

    def as_dict(self) -> dict[str, Any]:
        """JSON result of a ``compress`` job."""
        return asdict(self)


def manifest_path_for(destination: Path) -> Path:
    """Where the manifest of an archive goes: beside it, ``<archive>.sha256``."""
    return destination.with_name(destination.name + MANIFEST_SUFFIX)


def compress_destination_problem(source: Path, destination: Path, *, overwrite: bool) -> str | None:
    """Why the archive cannot be written at ``destination``, or ``None``.

    Never inside the source (the archive would pack itself), never over an existing archive or
    manifest unless ``overwrite``.
    """
    if relative_inside(destination, source) is not None:
        return f"{destination} is inside the source {source}; write the archive elsewhere"
    if not destination.parent.is_dir():
        return f"{destination}: its directory does not exist; create it first"
    for path in (destination, manifest_path_for(destination)):
        if path.is_dir():
            return f"{path} is a directory; give the path of an archive file"
        if path.exists() and not overwrite:
            return f"{path} exists; set overwrite=true to replace it"
    return None


def resolve_level(fmt: CompressFormat, level: int | None) -> int:
    """The compression level to use; out-of-range levels name the accepted range."""
    default, lowest, highest = COMPRESS_LEVELS[fmt]
    if level is None:
        return default
    if not lowest <= level <= highest:
        raise JobValidationError(f"level {level} is not valid for {fmt}; use {lowest}..{highest}")
    return level


@contextmanager
def _compressed_writer(
    fmt: CompressFormat, out: HashingWriter, level: int, threads: int | None
) -> Iterator[Any]:
    """A write stream compressing into ``out``; zstd runs on its own threads (``-1``: one per core)."""
    if fmt == "tar.zst":
        compressor = zstandard.ZstdCompressor(
            level=level, threads=-1 if threads is None else threads, write_checksum=True
        )
        with compressor.stream_writer(cast(IO[bytes], out), write_size=BUFFER_SIZE, closefd=False) as writer:
            yield writer
    else:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as writer:  # type: ignore[arg-type]
            yield writer


class _Owners:
    """uid/gid -> name, looked up once each (pwd/grp lookups per file would cost more than tar's I/O)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            self._users[uid] = _lookup_name("pwd", uid)
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            self._groups[gid] = _lookup_name("grp", gid)
        return self._groups[gid]


def _lookup_name(module: str, ident: int) -> str:
    try:
        if module == "pwd":
            import pwd

            return pwd.getpwuid(ident).pw_name
        import grp

        return grp.getgrgid(ident).gr_name
    except (KeyError, ImportError):
        return ""


class _Packer:
    """Adds tree entries to a tar stream, hashing file data as tarfile copies it."""

    def __init__(self, archive: tarfile.TarFile, manifest: IO[str], progress: ProgressFn) -> None:
        self.archive = archive
        self.manifest = manifest
        self.progress = progress
        self.owners = _Owners()
        self.files = 0
        self.bytes = 0
        self._inodes: dict[tuple[int, int], tuple[str, str]] = {}

    def _info(self, entry: TreeEntry, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(entry.rel)
        st = entry.stat
        info.type = kind
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)  # an int: a float mtime costs a pax header per member
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname, info.gname = self.owners.user(st.st_uid), self.owners.group(st.st_gid)
        return info

    def add(self, entry: TreeEntry) -> None:
        """Add one entry: directories and links as such, files with data; special files skipped."""
        if entry.kind == "dir":
            self.archive.addfile(self._info(entry, tarfile.DIRTYPE))
        elif entry.kind == "symlink":
            info = self._info(entry, tarfile.SYMTYPE)
            info.linkname = os.readlink(entry.path)
            self.archive.addfile(info)
        elif entry.kind == "file":
            self._add_file(entry)
        else:
            log.warning("skipping %s: not a regular file, directory or link", entry.path)

    def _add_file(self, entry: TreeEntry) -> None:
        key = (entry.stat.st_dev, entry.stat.st_ino)
        if entry.stat.st_nlink > 1 and key in self._inodes:
            first_rel, digest = self._inodes[key]
            info = self._info(entry, tarfile.LNKTYPE)
            info.linkname = first_rel
            self.archive.addfile(info)
        else:
            info = self._info(entry, tarfile.REGTYPE)
            info.size = entry.stat.st_size
            with open(entry.path, "rb", buffering=0) as raw:
                reader = HashingReader(raw, self.progress)
                self.archive.addfile(info, cast(IO[bytes], reader))
            digest = reader.hexdigest()
            self.bytes += reader.size
            if entry.stat.st_nlink > 1:
                self._inodes[key] = (entry.rel, digest)
        self.files += 1
        self.manifest.write(format_manifest_line(digest, entry.rel))


def write_archive(
    tree: SourceTree,
    destination: Path,
    *,
    fmt: CompressFormat = "tar.zst",
    level: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> CompressResult:
    """Pack ``tree`` into ``destination`` and write ``<destination>.sha256`` in the same pass.

    Member names are relative to the source directory (a lone file is stored under its name), so
    ``sha256sum -c`` run in the directory the archive is unpacked into checks every file.
    """
    destination = Path(destination)
    problem = compress_destination_problem(tree.root, destination, overwrite=overwrite)
    if problem is not None:
        raise JobValidationError(f"destination {problem}")
    chosen_level = resolve_level(fmt, level)
    manifest = manifest_path_for(destination)
    partial = destination.with_name(destination.name + ".partial")
    manifest_partial = manifest.with_name(manifest.name + ".partial")
    try:
        with (
            open(partial, "wb") as raw_out,
            open(
                manifest_partial, "w", encoding="utf-8", errors="surrogateescape", newline="\n"
            ) as manifest_out,
        ):
            out = HashingWriter(raw_out)
            with _compressed_writer(fmt, out, chosen_level, threads) as stream:
                packer = _pack(tree, stream, manifest_out, progress)
        os.replace(manifest_partial, manifest)
        os.replace(partial, destination)
    except BaseException:
        remove_quietly(partial, manifest_partial)
        raise
    return CompressResult(
        destination=str(destination),
        manifest=str(manifest),
        format=fmt,
        files=packer.files,
        bytes=packer.bytes,
        archive_bytes=out.size,
        archive_sha256=out.hexdigest(),
    )


def _pack(tree: SourceTree, stream: Any, manifest: IO[str], progress: ProgressFn) -> _Packer:
    with tarfile.TarFile(
        fileobj=stream, mode="w", format=tarfile.PAX_FORMAT, copybufsize=BUFFER_SIZE
    ) as archive:
        packer = _Packer(archive, manifest, progress)
        for entry in tree.entries:
            packer.add(entry)
    return packer


def compress_path(
    source: Path,
    destination: Path,
    *,
    fmt: CompressFormat = "tar.zst",
    level: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> CompressResult:
    """Scan ``source`` and pack it (see :func:`write_archive`)."""
    return write_archive(
        scan_source(Path(source)),
        destination,
        fmt=fmt,
        level=level,
        threads=threads,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = [
    "COMPRESS_LEVELS",
    "CompressFormat",
    "CompressResult",
    "SourceTree",
    "compress_destination_problem",
    "compress_path",
    "manifest_path_for",
    "resolve_level",
    "scan_source",
    "write_archive",
]
