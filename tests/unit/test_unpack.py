"""Unpacking (jobbridge.tasks.unpack, unpack_safety): format detection, hostile archives, limits."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import zstandard

from jobbridge.errors import ArchiveLimitError, JobValidationError, UnsafeArchiveError
from jobbridge.tasks.files import ReadAhead
from jobbridge.tasks.unpack import ARCHIVE_FORMATS, detect_format, extract_archive
from jobbridge.tasks.unpack_safety import ExtractLimits, TreeWriter, safe_member_path

TAR_FORMATS = ["tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst"]

# --------------------------------------------------------------------------------------------------
# Building archives byte by byte (tarfile and zipfile write whatever names and types they are given)


Member = tuple[tarfile.TarInfo, bytes | None]


def _compress(data: bytes, fmt: str) -> bytes:
    if fmt == "tar.gz":
        return gzip.compress(data)
    if fmt == "tar.bz2":
        return bz2.compress(data)
    if fmt == "tar.xz":
        return lzma.compress(data)
    if fmt == "tar.zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def make_tar(path: Path, members: list[Member], fmt: str = "tar") -> Path:
    """A tar archive holding exactly ``members`` (hostile names and types included)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    path.write_bytes(_compress(buffer.getvalue(), fmt))
    return path


def file_member(name: str, data: bytes = b"data\n", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def special_member(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, None


def make_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    """A zip holding ``entries``; a ZipInfo may carry Unix type bits (links, devices)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def unix_zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def fingerprint(path: Path) -> tuple[str, int, int]:
    data = path.read_bytes()
    info = path.stat()
    return hashlib.sha256(data).hexdigest(), info.st_size, info.st_mtime_ns


def assert_rejected(
    source: Path,
    destination: Path,
    error: type[Exception],
    match: str,
    **limits: int,
) -> None:
    """Extraction fails with ``error``; no output, no staging dir, the source untouched."""
    before = fingerprint(source)
    with pytest.raises(error, match=match):
        extract_archive(source, destination, **limits)  # type: ignore[arg-type]
    assert not destination.exists(), "a rejected archive left output"
    leftovers = [p.name for p in destination.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == [], f"staging directories left behind: {leftovers}"
    assert fingerprint(source) == before, "the source archive changed"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory for archives; destinations go in ``work/out`` (a sibling of nothing else)."""
    (tmp_path / "out").mkdir()
    return tmp_path


# --------------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_tar_formats_are_detected_by_content_not_name(work: Path, fmt: str) -> None:
    archive = make_tar(work / "misleading.zip", [file_member("a.txt")], fmt)
    assert detect_format(archive) == fmt


def test_zip_is_detected_by_content(work: Path) -> None:
    archive = make_zip(work / "data.tar.gz", [("a.txt", b"x")])
    assert detect_format(archive) == "zip"


def test_old_v7_tar_without_ustar_magic_is_detected(work: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    block = bytearray(buffer.getvalue())
    block[257:265] = b"\0" * 8  # no magic, no version: a v7 header
    block[148:156] = b" " * 8
    checksum = sum(block[:512])
    block[148:156] = b"%06o\0 " % checksum
    (work / "v7.tar").write_bytes(bytes(block))
    assert detect_format(work / "v7.tar") == "tar"


def test_unknown_format_is_a_validation_error_listing_the_accepted_ones(work: Path) -> None:
    source = work / "notes.tar.gz"
    source.write_text("just some text, not an archive\n")
    with pytest.raises(JobValidationError) as caught:
        extract_archive(source, work / "out" / "dest")
    for fmt in ARCHIVE_FORMATS:
        assert fmt in str(caught.value)
    assert not (work / "out" / "dest").exists()


def test_truncated_archive_fails_cleanly(work: Path) -> None:
    source = make_tar(work / "a.tar.zst", [file_member("big.bin", os.urandom(300_000))], "tar.zst")
    source.write_bytes(source.read_bytes()[:150_000])
    assert_rejected(source, work / "out" / "dest", JobValidationError, "damaged or truncated")


def test_archive_cut_at_a_member_boundary_fails_cleanly(work: Path) -> None:
    plain = make_tar(work / "a.tar", [file_member("a.txt", b"x" * 512), file_member("b.txt")])
    cut = plain.read_bytes()[:1024]  # header + data of a.txt, then nothing: no end marker
    source = work / "cut.tar.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress(cut))
    assert_rejected(source, work / "out" / "dest", JobValidationError, "end-of-archive marker")


def test_corrupt_gzip_fails_cleanly(work: Path) -> None:
    source = make_tar(work / "a.tar.gz", [file_member("a.bin", os.urandom(100_000))], "tar.gz")
    data = bytearray(source.read_bytes())
    data[5000:5100] = b"\xff" * 100
    source.write_bytes(bytes(data))
    assert_rejected(source, work / "out" / "dest", JobValidationError, "not a valid tar.gz")


# --------------------------------------------------------------------------------------------------
# Hostile tar members, in every compression


@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_tar_member_with_dotdot_is_refused(work: Path, fmt: str) -> None:
    source = make_tar(work / f"evil.{fmt}", [file_member("ok.txt"), file_member("../evil.txt")], fmt)
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, r"'\.\./evil\.txt'.*'\.\.'")
    assert not (work / "out" / "evil.txt").exists()


def test_tar_member_with_dotdot_inside_the_path_is_refused(work: Path) -> None:
    source = make_tar(work / "evil.tar", [file_member("a/b/../../../evil.txt")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "contains '..'")


def test_tar_member_with_absolute_path_is_refused(work: Path) -> None:
    target = work / "absolute-victim.txt"
    source = make_tar(work / "abs.tar", [file_member(str(target))])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "absolute path")
    assert not target.exists()


def test_tar_symlink_pointing_out_is_refused(work: Path) -> None:
    source = make_tar(work / "link.tar", [special_member("escape", tarfile.SYMTYPE, "../../outside")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'escape'.*outside")


def test_tar_symlink_with_absolute_target_is_refused(work: Path) -> None:
    source = make_tar(work / "link.tar", [special_member("passwd", tarfile.SYMTYPE, "/etc/passwd")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'passwd'.*absolute")


def test_tar_symlink_escaping_through_another_link_is_refused(work: Path) -> None:
    # "here" -> "." is harmless; "there" -> "here/../x" looks inside lexically but resolves outside.
    source = make_tar(
        work / "chain.tar",
        [
            special_member("here", tarfile.SYMTYPE, "."),
            special_member("there", tarfile.SYMTYPE, "here/../x"),
        ],
    )
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'there'")


def test_tar_writing_through_a_symlinked_directory_is_refused(work: Path) -> None:
    outside = work / "outside"
    outside.mkdir()
    source = make_tar(
        work / "through.tar",
        [
            special_member("sub", tarfile.SYMTYPE, "."),
            file_member("sub/file.txt"),
        ],
    )
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "parent 'sub' is a symbolic")


def test_tar_hardlink_pointing_out_is_refused(work: Path) -> None:
    source = make_tar(work / "hard.tar", [special_member("h", tarfile.LNKTYPE, "../../../etc/passwd")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'h'")


def test_tar_hardlink_to_absolute_path_is_refused(work: Path) -> None:
    source = make_tar(work / "hard.tar", [special_member("h", tarfile.LNKTYPE, "/etc/passwd")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'h'.*absolute")


def test_tar_hardlink_to_a_missing_member_is_refused(work: Path) -> None:
    source = make_tar(work / "hard.tar", [special_member("h", tarfile.LNKTYPE, "nowhere.txt")])
    assert_rejected(source, work / "out" / "dest", JobValidationError, "not a file earlier")


@pytest.mark.parametrize(
    ("kind", "label"),
    [(tarfile.CHRTYPE, "char device"), (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "fifo")],
)
def test_tar_device_files_and_fifos_are_refused(work: Path, kind: bytes, label: str) -> None:
    source = make_tar(work / "dev.tar", [file_member("ok.txt"), special_member("dev", kind)])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'dev'.*device file, FIFO")


@pytest.mark.parametrize("fmt", TAR_FORMATS)
def test_tar_bomb_over_max_total_bytes_is_refused(work: Path, fmt: str) -> None:
    zeros = bytes(8 << 20)
    source = make_tar(work / f"bomb.{fmt}", [file_member("zeros.bin", zeros)], fmt)
    if fmt != "tar":
        assert source.stat().st_size < 200_000  # highly compressible
    assert_rejected(
        source, work / "out" / "dest", ArchiveLimitError, "max_total_bytes", max_total_bytes=1 << 20
    )


def test_tar_total_of_small_members_over_the_cap_is_refused(work: Path) -> None:
    members = [file_member(f"f{i}.bin", bytes(100_000)) for i in range(20)]
    source = make_tar(work / "many.tar.zst", members, "tar.zst")
    assert_rejected(source, work / "out" / "dest", ArchiveLimitError, "'f10.bin'", max_total_bytes=1_000_000)


def test_tar_with_too_many_members_is_refused(work: Path) -> None:
    source = make_tar(work / "many.tar", [file_member(f"f{i}.txt") for i in range(30)])
    assert_rejected(source, work / "out" / "dest", ArchiveLimitError, "more than 10 members", max_members=10)


def test_limits_default_to_the_settings(monkeypatch: pytest.MonkeyPatch, work: Path) -> None:
    from jobbridge.settings import reload_settings

    monkeypatch.setenv("JOBBRIDGE_EXTRACT_MAX_MEMBERS", "3")
    reload_settings()
    try:
        assert ExtractLimits.resolve(None, None).max_members == 3
        source = make_tar(work / "four.tar", [file_member(f"f{i}") for i in range(4)])
        assert_rejected(source, work / "out" / "dest", ArchiveLimitError, "max_members")
    finally:
        monkeypatch.delenv("JOBBRIDGE_EXTRACT_MAX_MEMBERS")
        reload_settings()


def test_tar_modes_are_sanitised_like_the_data_filter(work: Path) -> None:
    source = make_tar(
        work / "modes.tar",
        [file_member("setuid", mode=0o4777), file_member("readonly", mode=0o444)],
    )
    extract_archive(source, work / "out" / "dest")
    assert stat.S_IMODE((work / "out" / "dest" / "setuid").stat().st_mode) & 0o7000 == 0
    assert stat.S_IMODE((work / "out" / "dest" / "readonly").stat().st_mode) & 0o600 == 0o600


def test_tar_links_inside_the_tree_are_kept(work: Path) -> None:
    source = make_tar(
        work / "links.tar",
        [
            file_member("dir/target.txt", b"target\n"),
            special_member("dir/soft", tarfile.SYMTYPE, "target.txt"),
            special_member("up", tarfile.SYMTYPE, "dir/target.txt"),
            special_member("hard", tarfile.LNKTYPE, "dir/target.txt"),
        ],
    )
    result = extract_archive(source, work / "out" / "dest")
    dest = work / "out" / "dest"
    assert os.readlink(dest / "dir" / "soft") == "target.txt"
    assert (dest / "up").read_text() == "target\n"
    assert (dest / "hard").stat().st_ino == (dest / "dir" / "target.txt").stat().st_ino
    assert result.members == 4
    assert result.bytes == len(b"target\n")


def test_duplicate_tar_member_replaces_the_earlier_file(work: Path) -> None:
    source = make_tar(work / "dup.tar", [file_member("a.txt", b"one"), file_member("a.txt", b"two")])
    extract_archive(source, work / "out" / "dest")
    assert (work / "out" / "dest" / "a.txt").read_bytes() == b"two"


def test_dot_slash_names_and_the_root_entry_are_accepted(work: Path) -> None:
    source = make_tar(
        work / "dots.tar",
        [special_member("./", tarfile.DIRTYPE), file_member("./a/./b.txt", b"b")],
    )
    result = extract_archive(source, work / "out" / "dest")
    assert (work / "out" / "dest" / "a" / "b.txt").read_bytes() == b"b"
    assert result.members == 2


# --------------------------------------------------------------------------------------------------
# Hostile zips


def test_zip_with_dotdot_is_refused(work: Path) -> None:
    source = make_zip(work / "evil.zip", [("ok.txt", b"x"), ("../evil.txt", b"x")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'../evil.txt'")
    assert not (work / "out" / "evil.txt").exists()


def test_zip_with_absolute_name_is_refused(work: Path) -> None:
    source = make_zip(work / "abs.zip", [(str(work / "victim.txt"), b"x")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "absolute path")
    assert not (work / "victim.txt").exists()


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "a/../../x"])
def test_zip_symlink_pointing_out_is_refused(work: Path, target: str) -> None:
    source = make_zip(work / "link.zip", [(unix_zip_info("link", stat.S_IFLNK | 0o777), target.encode())])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'link'")


def test_zip_symlink_inside_is_created_as_a_link(work: Path) -> None:
    source = make_zip(
        work / "link.zip",
        [
            (unix_zip_info("a.txt", stat.S_IFREG | 0o644), b"alpha"),
            (unix_zip_info("link", stat.S_IFLNK | 0o777), b"a.txt"),
        ],
    )
    extract_archive(source, work / "out" / "dest")
    assert os.readlink(work / "out" / "dest" / "link") == "a.txt"


def test_zip_device_entry_is_refused(work: Path) -> None:
    source = make_zip(work / "dev.zip", [(unix_zip_info("dev", stat.S_IFCHR | 0o644), b"")])
    assert_rejected(source, work / "out" / "dest", UnsafeArchiveError, "'dev'.*device")


def test_zip_bomb_is_refused_before_anything_is_written(work: Path) -> None:
    source = make_zip(work / "bomb.zip", [("zeros.bin", bytes(20 << 20))])
    assert source.stat().st_size < 100_000
    assert_rejected(
        source, work / "out" / "dest", ArchiveLimitError, "max_total_bytes", max_total_bytes=1 << 20
    )


def test_zip_with_too_many_members_is_refused(work: Path) -> None:
    source = make_zip(work / "many.zip", [(f"f{i}.txt", b"x") for i in range(12)])
    assert_rejected(source, work / "out" / "dest", ArchiveLimitError, "12 members", max_members=10)


def _understate_zip_sizes(path: Path, declared: int) -> None:
    """Rewrite the uncompressed size of every entry, in local headers and central directory."""
    data = bytearray(path.read_bytes())
    offset = 0
    while (offset := data.find(b"PK\x03\x04", offset)) != -1:
        struct.pack_into("<I", data, offset + 22, declared)
        offset += 4
    offset = 0
    while (offset := data.find(b"PK\x01\x02", offset)) != -1:
        struct.pack_into("<I", data, offset + 24, declared)
        offset += 4
    path.write_bytes(bytes(data))


def test_zip_whose_headers_understate_the_size_is_refused(work: Path) -> None:
    source = make_zip(work / "liar.zip", [("big.bin", bytes(5 << 20))])
    _understate_zip_sizes(source, 1000)
    with zipfile.ZipFile(source) as archive:
        assert archive.infolist()[0].file_size == 1000  # the lie passes the declared-size check
    assert_rejected(source, work / "out" / "dest", JobValidationError, "big.bin|CRC", max_total_bytes=1 << 20)


def test_bytes_are_counted_as_written_not_as_declared(tmp_path: Path) -> None:
    writer = TreeWriter(tmp_path, ExtractLimits(max_total_bytes=1 << 20, max_members=10))
    stream = io.BytesIO(bytes(5 << 20))  # says nothing about its size up front
    with pytest.raises(ArchiveLimitError, match=r"'big\.bin'"):
        writer.write_file("big.bin", "big.bin", stream, size=None, mode=0o644, mtime=None)
    assert writer.bytes <= (1 << 20) + (1 << 20)  # stopped within one buffer of the cap
    assert stream.tell() <= 2 << 20


def test_zip_round_trip_keeps_content_modes_and_dirs(work: Path) -> None:
    source = make_zip(
        work / "ok.zip",
        [
            (unix_zip_info("bin/", stat.S_IFDIR | 0o755), b""),
            (unix_zip_info("bin/run.sh", stat.S_IFREG | 0o755), b"#!/bin/sh\n"),
            ("docs/readme.txt", b"hello"),
        ],
    )
    result = extract_archive(source, work / "out" / "dest")
    dest = work / "out" / "dest"
    assert (dest / "docs" / "readme.txt").read_bytes() == b"hello"
    assert os.access(dest / "bin" / "run.sh", os.X_OK)
    assert result.format == "zip"
    assert result.members == 3
    assert result.bytes == len(b"#!/bin/sh\n") + 5


# --------------------------------------------------------------------------------------------------
# Destination rules


def test_non_empty_destination_is_refused_without_overwrite(work: Path) -> None:
    dest = work / "out" / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")
    source = make_tar(work / "a.tar", [file_member("a.txt")])
    with pytest.raises(JobValidationError, match=r"not empty.*overwrite"):
        extract_archive(source, dest)
    assert (dest / "keep.txt").read_text() == "keep"


def test_overwrite_replaces_the_destination_only_after_success(work: Path) -> None:
    dest = work / "out" / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    bad = make_tar(work / "bad.tar", [file_member("a.txt"), file_member("../x")])
    with pytest.raises(UnsafeArchiveError):
        extract_archive(bad, dest, overwrite=True)
    assert (dest / "old.txt").read_text() == "old"  # a failed job leaves the old tree alone
    good = make_tar(work / "good.tar", [file_member("new.txt", b"new")])
    extract_archive(good, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert [p.name for p in (work / "out").iterdir()] == ["dest"]


def test_empty_destination_directory_is_used(work: Path) -> None:
    dest = work / "out" / "dest"
    dest.mkdir()
    extract_archive(make_tar(work / "a.tar", [file_member("a.txt")]), dest)
    assert (dest / "a.txt").exists()


def test_destination_whose_parent_is_missing_is_refused(work: Path) -> None:
    source = make_tar(work / "a.tar", [file_member("a.txt")])
    with pytest.raises(JobValidationError, match="parent directory does not exist"):
        extract_archive(source, work / "missing" / "dest")


def test_safe_member_path_normalises_and_refuses() -> None:
    assert safe_member_path("./a//b/./c") == "a/b/c"
    assert safe_member_path("./") == ""
    for name in ("../x", "a/../../x", "/etc/passwd", "a/.."):
        with pytest.raises(UnsafeArchiveError):
            safe_member_path(name)


# --------------------------------------------------------------------------------------------------
# Archives made by GNU tar


def test_gnu_sparse_members_are_unpacked_and_counted_at_full_size(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    with open(source / "sparse.img", "wb") as handle:
        handle.write(b"head")
        handle.seek(3 << 20)
        handle.write(b"tail")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(archive), "-C", str(source), "."], check=True)
    result = extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "sparse.img").read_bytes() == (source / "sparse.img").read_bytes()
    assert result.bytes == (3 << 20) + 4
    assert_rejected(archive, tmp_path / "out2", ArchiveLimitError, "max_total_bytes", max_total_bytes=1 << 20)


# --------------------------------------------------------------------------------------------------
# The read-ahead stream used for decompression


class _Exploding(io.RawIOBase):
    def __init__(self, good: bytes, error: Exception) -> None:
        self._data = io.BytesIO(good)
        self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        count = self._data.readinto(buffer)  # type: ignore[arg-type]
        if not count:
            raise self._error
        return count


def test_read_ahead_reads_seeks_forward_and_tells() -> None:
    data = os.urandom(3 * (1 << 20) + 123)
    chunks: list[int] = []
    with ReadAhead(io.BytesIO(data), on_chunk=lambda: chunks.append(1)) as stream:
        assert stream.read(10) == data[:10]
        stream.seek(2 << 20)
        assert stream.tell() == 2 << 20
        buffer = bytearray(200)
        assert stream.readinto(buffer) == 200
        assert bytes(buffer) == data[2 << 20 : (2 << 20) + 200]
        assert stream.read() == data[(2 << 20) + 200 :]
        assert stream.read(5) == b""
        with pytest.raises(io.UnsupportedOperation):
            stream.seek(0)
    assert len(chunks) >= 4


def test_read_ahead_raises_source_errors_in_the_reader() -> None:
    error = EOFError("compressed stream ended early")
    with ReadAhead(_Exploding(b"abc", error)) as stream:  # type: ignore[arg-type]
        assert stream.read(3) == b"abc"
        with pytest.raises(EOFError, match="ended early"):
            stream.read(1)


def test_read_ahead_stops_its_thread_when_closed_early() -> None:
    stream = ReadAhead(io.BytesIO(bytes(64 << 20)), depth=2)
    assert stream.read(1) == b"\0"
    stream.close()  # the producer is blocked on a full queue: close must still return
    assert not stream._thread.is_alive()
