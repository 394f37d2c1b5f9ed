"""Reading and writing archives safely: unpack zip and tar (plain, gz, bz2, xz, zst), pack tar.zst/tar.gz.

Unpacking treats every archive as hostile. Members that would land outside the destination (``..``,
absolute paths, links pointing out, links to absolute paths, writing through a link), device files and
FIFOs are refused with :class:`~jobbridge.errors.UnsafeArchiveError`; the unpacked size and member count
are capped (:class:`~jobbridge.errors.ArchiveLimitError`), counting bytes as they are written since zip
headers can lie. Tar links and special members are judged by Python's own ``tarfile.data_filter``; plain
files and directories, and every zip member, by equivalent (stricter) checks here. Decompression runs on a
read-ahead thread. Everything is written into a staging directory beside the destination and renamed into
place only when the whole archive unpacked, so a failure leaves no partial output; the source archive is
only ever read.

Packing reads each file once: tarfile copies it through a :class:`~jobbridge.tasks.checksum.HashingReader`
into a zstd (multi-threaded) or gzip stream, so the ``sha256sum`` manifest and the archive's own SHA-256
come out of the same pass. Both are written as ``.partial`` files and renamed at the end.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import logging
import lzma
import os
import posixpath
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

import zstandard

from jobbridge.errors import ArchiveLimitError, JobValidationError, UnsafeArchiveError
from jobbridge.settings import get_settings
from jobbridge.tasks.checksum import (
    MANIFEST_SUFFIX,
    HashingReader,
    HashingWriter,
    format_manifest_line,
)
from jobbridge.tasks.files import (
    BUFFER_SIZE,
    CountingReader,
    ProgressFn,
    ReadAhead,
    TreeEntry,
    no_progress,
    publish_directory,
    relative_inside,
    remove_quietly,
    single_file_entry,
    staging_directory,
    walk_tree,
)

log = logging.getLogger("jobbridge.tasks.archive")

ArchiveFormat = Literal["zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst"]
CompressFormat = Literal["tar.zst", "tar.gz"]

#: Formats ``extract`` unpacks, recognised by their first bytes, never by the file name.
ARCHIVE_FORMATS: tuple[ArchiveFormat, ...] = ("zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst")
#: Formats ``compress`` writes, with their default and accepted compression levels.
COMPRESS_LEVELS: dict[CompressFormat, tuple[int, int, int]] = {
    "tar.zst": (3, 1, 22),
    "tar.gz": (6, 1, 9),
}

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
# Unpacking: the member checks


def safe_member_path(name: str) -> str:
    """The member's path relative to the destination, or :class:`UnsafeArchiveError` if it escapes.

    ``./`` and repeated slashes are dropped; ``""`` is the destination itself. Any ``..`` part is
    refused, as GNU tar does, rather than resolved: an archive made by a normal tool never has one.
    """
    if name.startswith(("/", "\\")):
        raise UnsafeArchiveError(
            f"member '{name}': absolute path; archive members must be relative to the destination"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"member '{name}': its path contains '..', which would escape the destination"
        )
    return "/".join(parts)


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


class _Readable(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one archive may unpack to (``None`` = the setting's default)."""

    max_total_bytes: int
    max_members: int

    @classmethod
    def resolve(cls, max_total_bytes: int | None, max_members: int | None) -> ExtractLimits:
        """Fill unset caps from ``JOBBRIDGE_EXTRACT_MAX_TOTAL_BYTES`` / ``..._MAX_MEMBERS``."""
        settings = get_settings()
        return cls(
            max_total_bytes=max_total_bytes or settings.extract_max_total_bytes,
            max_members=max_members or settings.extract_max_members,
        )


class TreeWriter:
    """Writes members into a staging root, enforcing the caps and never writing through a link.

    Both unpackers (tar, zip) hand their members here, so the rules that keep output inside the root
    are implemented once: every parent directory of a member must be a real directory this writer
    made or checked (never a link), files are opened with ``O_NOFOLLOW | O_EXCL``, and every link made
    is re-resolved at the end.
    """

    def __init__(self, root: Path, limits: ExtractLimits) -> None:
        self.root = os.path.realpath(root)
        self.limits = limits
        self.members = 0
        self.bytes = 0
        self._dirs: set[str] = {""}
        self._links: list[tuple[str, str]] = []
        self._dir_times: list[tuple[str, float]] = []
        self._view = memoryview(bytearray(BUFFER_SIZE))

    # -- caps -------------------------------------------------------------------------------------

    def count_member(self, name: str) -> None:
        """Count one more member; past ``max_members`` the archive is refused."""
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveLimitError(
                f"member '{name}': the archive has more than {self.limits.max_members} members "
                "(max_members); raise max_members to unpack it"
            )

    def expect_bytes(self, name: str, size: int) -> None:
        """Refuse early a member whose declared size alone would pass ``max_total_bytes``."""
        if self.bytes + size > self.limits.max_total_bytes:
            self._too_big(name)

    def _too_big(self, name: str) -> None:
        raise ArchiveLimitError(
            f"member '{name}': unpacking it exceeds max_total_bytes "
            f"({self.limits.max_total_bytes} bytes); raise max_total_bytes to unpack this archive"
        )

    # -- paths ------------------------------------------------------------------------------------

    def _full(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _ensure_parents(self, rel: str, name: str) -> None:
        """Make (or check) each parent directory of ``rel``; a link among them is refused."""
        parts = rel.split("/")[:-1]
        prefix = ""
        for part in parts:
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix in self._dirs:
                continue
            full = self._full(prefix)
            try:
                mode = os.lstat(full).st_mode
            except FileNotFoundError:
                os.mkdir(full)
                mode = stat.S_IFDIR
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(
                    f"member '{name}': its parent '{prefix}' is a symbolic link; "
                    "writing through links is refused"
                )
            if not stat.S_ISDIR(mode):
                raise JobValidationError(f"member '{name}': its parent '{prefix}' is a file in the archive")
            self._dirs.add(prefix)

    def _clear_target(self, rel: str, name: str) -> str:
        """Make room for a member: a later member replaces an earlier file (tar's rule), not a dir."""
        full = self._full(rel)
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            return full
        if stat.S_ISDIR(mode):
            raise JobValidationError(
                f"member '{name}': a directory of the same name is already in the archive"
            )
        os.unlink(full)
        return full

    # -- members ----------------------------------------------------------------------------------

    def make_dir(self, rel: str, name: str, mtime: float | None = None) -> None:
        """A directory member (the root itself, ``""``, needs nothing); its mtime is set at the end."""
        if mtime is not None and rel:
            self._dir_times.append((rel, mtime))
        if not rel or rel in self._dirs:
            return
        self._ensure_parents(rel, name)
        full = self._full(rel)
        try:
            os.mkdir(full)
        except FileExistsError:
            if stat.S_ISLNK(os.lstat(full).st_mode) or not os.path.isdir(full):
                raise JobValidationError(
                    f"member '{name}': a file or link of the same name is already in the archive"
                ) from None
        self._dirs.add(rel)

    def write_file(
        self,
        rel: str,
        name: str,
        source: _Readable,
        *,
        size: int | None,
        mode: int,
        mtime: float | None,
    ) -> None:
        """Copy a regular file from ``source`` (exactly ``size`` bytes, or to its end), counting bytes."""
        if not rel:
            raise JobValidationError(f"member '{name}': a file cannot be the destination itself")
        self._ensure_parents(rel, name)
        fd = self._create(rel, name, mode)
        try:
            self._copy(fd, source, size, name)
            if mtime is not None:
                _set_mtime(fd, mtime)
        finally:
            os.close(fd)

    def _create(self, rel: str, name: str, mode: int) -> int:
        """Open a new file for writing, never through a link; the kernel applies the umask to
        ``mode`` (which always lets the owner write). A duplicate member replaces the earlier file."""
        full = self._full(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(full, flags, mode)
        except FileExistsError:
            self._clear_target(rel, name)
            return os.open(full, flags, mode)

    def _copy(self, fd: int, source: _Readable, size: int | None, name: str) -> None:
        view = self._view
        remaining = size
        limit = self.limits.max_total_bytes
        while remaining is None or remaining > 0:
            want = BUFFER_SIZE if remaining is None else min(BUFFER_SIZE, remaining)
            count = source.readinto(view[:want]) or 0
            if count == 0:
                if remaining is not None:
                    raise JobValidationError(
                        f"member '{name}': the archive ends inside it (damaged or truncated)"
                    )
                return
            self.bytes += count
            if self.bytes > limit:
                self._too_big(name)
            _write_all(fd, view[:count])
            if remaining is not None:
                remaining -= count

    def symlink(self, rel: str, name: str, target: str) -> None:
        """A symbolic link; refused if its target is absolute or resolves outside the root."""
        check_link_target(self.root, rel, name, target)
        self._ensure_parents(rel, name)
        full = self._clear_target(rel, name)
        os.symlink(target, full)
        self._links.append((rel, name))

    def hardlink(self, rel: str, name: str, target_rel: str) -> None:
        """A hard link to a regular file this archive already unpacked."""
        target = self._full(target_rel)
        parent = target_rel.rpartition("/")[0]
        try:
            is_file = stat.S_ISREG(os.lstat(target).st_mode)
        except FileNotFoundError:
            is_file = False
        if not target_rel or parent not in self._dirs or not is_file:
            raise JobValidationError(
                f"member '{name}': hard link to '{target_rel}', which is not a file earlier in the archive"
            )
        self._ensure_parents(rel, name)
        full = self._clear_target(rel, name)
        os.link(target, full, follow_symlinks=False)

    def finish(self) -> None:
        """Re-resolve every link made, now that the whole tree exists (each must stay inside), then
        give directories their mtimes, deepest first, since writing into a directory changes it."""
        for rel, name in self._links:
            resolved = os.path.realpath(self._full(rel))
            if os.path.commonpath([resolved, self.root]) != self.root:
                raise UnsafeArchiveError(
                    f"member '{name}': the link resolves to '{resolved}', outside the destination"
                )
        for rel, mtime in reversed(self._dir_times):
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(self._full(rel), (mtime, mtime), follow_symlinks=False)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _set_mtime(fd: int, mtime: float) -> None:
    try:
        os.utime(fd, (mtime, mtime))
    except (OverflowError, ValueError, OSError):
        log.debug("could not set mtime %r", mtime)


def check_link_target(root: str, rel: str, name: str, target: str) -> None:
    """Refuse a link whose target is absolute or leaves ``root``, lexically or through existing links."""
    if not target or "\x00" in target:
        raise UnsafeArchiveError(f"member '{name}': the link has an empty or invalid target")
    if target.startswith("/") or os.path.isabs(target):
        raise UnsafeArchiveError(f"member '{name}': links to the absolute path '{target}'")
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    resolved = os.path.realpath(os.path.join(root, posixpath.dirname(rel), target))
    if lexical == ".." or lexical.startswith("../") or (os.path.commonpath([resolved, root]) != root):
        raise UnsafeArchiveError(f"member '{name}': links to '{target}', outside the destination")


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
                cast(_Readable, handle),
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


# ==================================================================================================
# Packing


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
    "ARCHIVE_FORMATS",
    "COMPRESS_LEVELS",
    "CompressResult",
    "ExtractResult",
    "TreeWriter",
    "compress_destination_problem",
    "compress_path",
    "detect_format",
    "extract_archive",
    "extract_destination_problem",
    "safe_member_path",
    "scan_source",
    "write_archive",
]
