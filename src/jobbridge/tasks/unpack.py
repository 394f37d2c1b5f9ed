"""Unpacking archives safely for ``extract``: zip and tar (plain, gz, bz2, xz, zst) into a new directory.

Why a module of its own: it is the reading half of archive handling and shares no code with the writing
half, :mod:`jobbridge.tasks.pack`. Every archive is treated as hostile. Its format is recognised by its
first bytes, never by its name. Tar links and special members are judged by Python's own
``tarfile.data_filter``; plain files and directories, and every zip member, by equivalent (stricter) checks
here and in :mod:`jobbridge.tasks.unpack_safety`, which writes every member, refusing any that would escape
the destination and enforcing the size and member caps. Device files and FIFOs are refused. Decompression
runs on a read-ahead thread. Everything is written into a staging directory beside the destination and
renamed into place only when the whole archive unpacked, so a failure leaves no partial output; the source
archive is only ever read.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import zstandard

from jobbridge.errors import ArchiveLimitError, JobValidationError, UnsafeArchiveError
from jobbridge.tasks.files import (
    BUFFER_SIZE,
    CountingReader,
    ProgressFn,
    ReadAhead,
    no_progress,
    publish_directory,
    staging_directory,
)
from jobbridge.tasks.unpack_safety import ExtractLimits, Readable, TreeWriter, safe_member_path

ArchiveFormat = Literal["zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst"]
#: Formats ``extract`` unpacks, recognised by their first bytes, never by the file name.
ARCHIVE_FORMATS: tuple[ArchiveFormat, ...] = ("zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst")

_MAGIC: tuple[tuple[bytes, ArchiveFormat], ...] = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip: only the end-of-central-directory record
    (b"\x1f\x8b", "tar.gz"),
    (b"BZh", "tar.bz2"),
    (b"\xfd7zXZ\x00", "tar.xz"),
    (b"\x28\xb5\x2f\xfd", "tar.zst"),
)
_MAX_LINK_TARGET = 4096


# ==================================================================================================
# Detecting the format


def _is_tar_header(block: bytes) -> bool:
    """A ustar/GNU magic, or (old v7 archives) a header block whose checksum adds up."""
    if block[257:262] == b"ustar":
        return True
    if len(block) < tarfile.BLOCKSIZE or block.count(0) == len(block):
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def detect_format(path: Path) -> ArchiveFormat:
    """The archive format of ``path`` from its magic bytes; an unknown one lists the accepted formats."""
    with open(path, "rb") as handle:
        head = handle.read(tarfile.BLOCKSIZE)
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if _is_tar_header(head):
        return "tar"
    raise JobValidationError(
        f"{path} is not an archive that extract can unpack (its first bytes match no known format); "
        f"accepted formats: {', '.join(ARCHIVE_FORMATS)}"
    )


# ==================================================================================================
# Unpacking: what tarfile's data filter would say and keep


def _describe_filter_error(error: tarfile.FilterError) -> str:
    """Turn tarfile's filter verdict into our one-line message naming the member and why."""
    member = error.tarinfo
    name = member.name
    reasons: list[tuple[type[tarfile.FilterError], str]] = [
        (tarfile.AbsolutePathError, "absolute path"),
        (tarfile.OutsideDestinationError, "would be written outside the destination"),
        (tarfile.SpecialFileError, "is a device file, FIFO or other special file"),
        (tarfile.AbsoluteLinkError, f"links to the absolute path '{member.linkname}'"),
        (
            tarfile.LinkOutsideDestinationError,
            f"links to '{member.linkname}', outside the destination",
        ),
    ]
    for kind, reason in reasons:
        if isinstance(error, kind):
            return f"member '{name}': {reason}"
    return f"member '{name}': refused by tarfile's data filter ({error})"


def _data_mode(mode: int) -> int:
    """The permissions tarfile's data filter would keep: no set-id/sticky, no group/other write."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


# ==================================================================================================
# Unpacking: tar


#: Errors that mean "the compressed data is damaged" rather than "the disk failed".
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
    gzip.BadGzipFile,
    tarfile.TarError,
    zipfile.BadZipFile,
    NotImplementedError,
)


def _is_corruption(error: BaseException) -> bool:
    """True for errors caused by the archive's bytes (bz2 raises a plain OSError without errno)."""
    if isinstance(error, _DECOMPRESSION_ERRORS):
        return True
    return isinstance(error, OSError) and error.errno is None and not isinstance(error, FileNotFoundError)


def _decompressed(fmt: ArchiveFormat, raw: IO[bytes]) -> IO[bytes]:
    """A forward-readable, forward-seekable stream of the tar bytes inside ``raw``."""
    if fmt == "tar.zst":
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=BUFFER_SIZE, read_across_frames=True, closefd=False
        )
        return cast(IO[bytes], reader)
    if fmt == "tar.gz":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if fmt == "tar.bz2":
        return cast(IO[bytes], bz2.BZ2File(raw, mode="rb"))
    if fmt == "tar.xz":
        return cast(IO[bytes], lzma.LZMAFile(raw, mode="rb"))
    return raw


def _tar_members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one at a time; tarfile's member list is emptied as we go (millions of members)."""
    while True:
        member = archive.next()
        if member is None:
            return
        cast(Any, archive).members.clear()  # tarfile keeps every member otherwise
        yield member


def _filtered(member: tarfile.TarInfo, root: str) -> tarfile.TarInfo:
    """``tarfile.data_filter``'s verdict, as our error naming the member and the reason."""
    try:
        return tarfile.data_filter(member, root)
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(_describe_filter_error(error)) from None


def _unpack_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, writer: TreeWriter) -> None:
    """One member: checked, counted, written.

    Links, devices and every other type go through ``tarfile.data_filter``. Plain files and directories
    skip it: for them its checks (no absolute path, stays inside the destination, sane permissions) are
    implied by :func:`safe_member_path`, by :class:`TreeWriter` (no link among the parents,
    ``O_NOFOLLOW``) and by :func:`_data_mode`, and its two ``realpath`` calls per member made unpacking
    many small files about a quarter slower (bench/bench_files.py).
    """
    name = member.name
    writer.count_member(name)
    rel = safe_member_path(name)
    if member.isdir():
        writer.make_dir(rel, name, member.mtime)
    elif member.isreg():
        writer.expect_bytes(name, member.size)
        source: Any
        if member.sparse is not None:
            source = archive.extractfile(member)
        else:
            # Read straight from the decompressed stream: one copy less than extractfile().
            archive.fileobj.seek(member.offset_data)
            source = archive.fileobj
        writer.write_file(
            rel, name, source, size=member.size, mode=_data_mode(member.mode), mtime=member.mtime
        )
    else:
        member = _filtered(member, writer.root)
        if member.issym():
            writer.symlink(rel, name, member.linkname)
        elif member.islnk():
            writer.hardlink(rel, name, safe_member_path(member.linkname))
        else:  # pragma: no cover - data_filter refuses every other type
            raise UnsafeArchiveError(f"member '{name}': unsupported member type")


def unpack_tar(source: Path, fmt: ArchiveFormat, writer: TreeWriter, progress: ProgressFn) -> None:
    """Stream a (compressed) tar into ``writer``: one pass, 1 MiB reads, no member held in memory.

    Decompression runs on a read-ahead thread while this thread creates the files.
    """
    with open(source, "rb", buffering=0) as raw:
        counter = CountingReader(raw)
        reported = 0

        def report() -> None:
            nonlocal reported
            consumed = counter.consumed
            progress(consumed - reported)
            reported = consumed

        stream = _decompressed(fmt, cast(IO[bytes], io.BufferedReader(counter, BUFFER_SIZE)))
        with contextlib.closing(stream), ReadAhead(stream, on_chunk=report) as ahead:
            archive = tarfile.TarFile(fileobj=cast(IO[bytes], ahead), mode="r", copybufsize=BUFFER_SIZE)
            for member in _tar_members(archive):
                _unpack_tar_member(archive, member, writer)
            # A complete tar ends with a zero block; a stream cut at a member boundary (zstd's
            # reader reports a truncated frame as a plain end) ends without one.
            if ahead.tell() < archive.offset + tarfile.BLOCKSIZE:
                raise JobValidationError(
                    f"{source} ends without tar's end-of-archive marker (damaged or truncated)"
                )


# ==================================================================================================
# Unpacking: zip


def _zip_mode(info: zipfile.ZipInfo) -> int:
    """The member's Unix mode when a Unix zipper recorded one, else 0."""
    mode = info.external_attr >> 16
    return mode if info.create_system == 3 else 0


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _read_zip_link(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> str:
    if info.file_size > _MAX_LINK_TARGET:
        raise UnsafeArchiveError(f"member '{name}': a link target of {info.file_size} bytes")
    with archive.open(info) as handle:
        data = handle.read(_MAX_LINK_TARGET + 1)
    return os.fsdecode(data)


def _unpack_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, writer: TreeWriter) -> None:
    name = info.filename
    writer.count_member(name)
    rel = safe_member_path(name)
    mode = _zip_mode(info)
    kind = stat.S_IFMT(mode)
    if info.flag_bits & 0x1:
        raise JobValidationError(f"member '{name}': encrypted zip members are not supported")
    if info.is_dir() or kind == stat.S_IFDIR:
        writer.make_dir(rel, name, _zip_mtime(info))
    elif kind == stat.S_IFLNK:
        writer.symlink(rel, name, _read_zip_link(archive, info, name))
    elif kind not in (0, stat.S_IFREG):
        raise UnsafeArchiveError(f"member '{name}': is a device file, FIFO or other special file")
    else:
        writer.expect_bytes(name, info.file_size)
        with archive.open(info) as handle:
            writer.write_file(
                rel,
                name,
                cast(Readable, handle),
                size=None,
                mode=_data_mode(mode or 0o644),
                mtime=_zip_mtime(info),
            )


def unpack_zip(source: Path, writer: TreeWriter, progress: ProgressFn) -> None:
    """Unpack a zip into ``writer``, refusing over-limit archives from the central directory first."""
    with zipfile.ZipFile(source) as archive:
        members = archive.infolist()
        if len(members) > writer.limits.max_members:
            raise ArchiveLimitError(
                f"the archive has {len(members)} members, more than max_members "
                f"({writer.limits.max_members}); raise max_members to unpack it"
            )
        declared = sum(info.file_size for info in members)
        if declared > writer.limits.max_total_bytes:
            raise ArchiveLimitError(
                f"the archive declares {declared} bytes unpacked, more than max_total_bytes "
                f"({writer.limits.max_total_bytes}); raise max_total_bytes to unpack it"
            )
        for info in members:
            _unpack_zip_member(archive, info, writer)
            progress(info.compress_size)


# ==================================================================================================
# Unpacking: the whole job


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract`` produced: where, from which format, how many members and bytes."""

    destination: str
    format: str
    members: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON result of an ``extract`` job."""
        return asdict(self)


def extract_destination_problem(destination: Path, *, overwrite: bool) -> str | None:
    """Why ``destination`` cannot receive an archive, or ``None``: it must be new or an empty dir.

    With ``overwrite`` a non-empty directory is fine (it is replaced once the archive has unpacked).
    """
    if not destination.parent.is_dir():
        return f"{destination}: its parent directory does not exist; create it first"
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        return f"{destination} exists and is not a directory"
    if destination.is_dir() and not overwrite and any(destination.iterdir()):
        return (
            f"{destination} is not empty; choose a new or empty directory, "
            "or set overwrite=true to replace it"
        )
    return None


def extract_archive(
    source: Path,
    destination: Path,
    *,
    max_total_bytes: int | None = None,
    max_members: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> ExtractResult:
    """Unpack ``source`` into ``destination`` safely and atomically (see the module docstring).

    ``progress`` is told the archive bytes consumed (its total is the archive's size). Errors caused
    by the archive's content are :class:`JobValidationError` subclasses, so a flow does not retry them.
    """
    source, destination = Path(source), Path(destination)
    limits = ExtractLimits.resolve(max_total_bytes, max_members)
    problem = extract_destination_problem(destination, overwrite=overwrite)
    if problem is not None:
        raise JobValidationError(f"destination {problem}")
    fmt = detect_format(source)
    with staging_directory(destination) as staging:
        writer = TreeWriter(staging, limits)
        try:
            if fmt == "zip":
                unpack_zip(source, writer, progress)
            else:
                unpack_tar(source, fmt, writer, progress)
        except JobValidationError:
            raise
        except Exception as error:
            if not _is_corruption(error):
                raise
            raise JobValidationError(
                f"{source} is not a valid {fmt} archive (damaged or truncated): {error}"
            ) from None
        writer.finish()
        publish_directory(staging, destination, overwrite=overwrite)
    return ExtractResult(str(destination), fmt, writer.members, writer.bytes)


__all__ = [
    "ARCHIVE_FORMATS",
    "ArchiveFormat",
    "ExtractResult",
    "detect_format",
    "extract_archive",
    "extract_destination_problem",
    "unpack_tar",
    "unpack_zip",
]
