"""Writing an untrusted archive's members into a directory without letting any of them escape it.

Why a module of its own: these are the rules that make unpacking safe. Both unpackers in
:mod:`jobbridge.tasks.unpack` (tar and zip) hand every member here, so the rules are written, tested and
reviewed once, apart from the code that reads each format. Members that would land outside the destination
(``..``, absolute paths, links pointing out, links to absolute paths, writing through a link) are refused
with :class:`~jobbridge.errors.UnsafeArchiveError`; the unpacked size and member count are capped
(:class:`~jobbridge.errors.ArchiveLimitError`), counting bytes as they are written since zip headers can lie.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobbridge.errors import ArchiveLimitError, JobValidationError, UnsafeArchiveError
from jobbridge.settings import get_settings
from jobbridge.tasks.files import BUFFER_SIZE

log = logging.getLogger("jobbridge.tasks.unpack_safety")


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


class Readable(Protocol):
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
        source: Readable,
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

    def _copy(self, fd: int, source: Readable, size: int | None, name: str) -> None:
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


__all__ = [
    "ExtractLimits",
    "Readable",
    "TreeWriter",
    "check_link_target",
    "safe_member_path",
]
