"""Packing (jobbridge.tasks.pack): manifests, atomic writes, and round trips through extract and GNU tar."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobbridge.errors import JobValidationError
from jobbridge.tasks.checksum import verify_tree
from jobbridge.tasks.pack import compress_path, scan_source, write_archive
from jobbridge.tasks.unpack import detect_format, extract_archive

# --------------------------------------------------------------------------------------------------
# Packing, and round trips


def make_tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deep" / "c.txt").write_text("gamma " * 1000)
    (root / "with space.txt").write_text("space")
    (root / "back\\slash.txt").write_text("backslash")
    (root / "new\nline.txt").write_text("newline")
    (root / "link").symlink_to("a.txt")
    os.link(root / "a.txt", root / "sub" / "hard.txt")
    return root


def tree_contents(root: Path) -> dict[str, object]:
    """Every path under ``root`` with what it holds (bytes, link target, or 'dir')."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = path.read_bytes()
    return found


@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_round_trip_compress_extract_validate(tmp_path: Path, fmt: str) -> None:
    source = make_tree(tmp_path / "src")
    archive = tmp_path / f"data.{fmt}"
    packed = compress_path(source, archive, fmt=fmt)  # type: ignore[arg-type]
    assert packed.files == 7
    assert packed.archive_bytes == archive.stat().st_size
    assert packed.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert detect_format(archive) == fmt

    unpacked = extract_archive(archive, tmp_path / "dest")
    assert tree_contents(tmp_path / "dest") == tree_contents(source)
    assert unpacked.format == fmt
    assert verify_tree(tmp_path / "dest", Path(packed.manifest)).ok
    checked = subprocess.run(
        ["sha256sum", "-c", "--strict", packed.manifest],
        cwd=tmp_path / "dest",
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_archive_is_readable_by_gnu_tar(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    compress_path(source, tmp_path / "data.tar.zst")
    (tmp_path / "gnu").mkdir()
    subprocess.run(
        ["tar", "-I", "zstd", "-xf", str(tmp_path / "data.tar.zst"), "-C", str(tmp_path / "gnu")],
        check=True,
    )
    assert tree_contents(tmp_path / "gnu") == tree_contents(source)


def test_gnu_tar_archives_are_extracted(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    for fmt, flag in (("tar.zst", "zstd"), ("tar.xz", "xz"), ("tar.bz2", "bzip2")):
        archive = tmp_path / f"gnu.{fmt}"
        subprocess.run(["tar", "-I", flag, "-cf", str(archive), "-C", str(source), "."], check=True)
        extract_archive(archive, tmp_path / f"out-{flag}")
        assert tree_contents(tmp_path / f"out-{flag}") == tree_contents(source)


def test_symlinks_are_stored_as_links_not_followed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not pack me")
    (source / "to-secret").symlink_to(secret)
    packed = compress_path(source, tmp_path / "a.tar.zst")
    with (
        open(tmp_path / "a.tar.zst", "rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        members = [(m.name, m.issym(), m.linkname) for m in archive]
    assert members == [("to-secret", True, str(secret))]
    assert packed.files == 0
    assert b"do not pack me" not in zstandard.ZstdDecompressor().decompressobj().decompress(
        (tmp_path / "a.tar.zst").read_bytes()
    )


def test_single_file_is_stored_under_its_name(tmp_path: Path) -> None:
    (tmp_path / "one.csv").write_text("a,b\n")
    packed = compress_path(tmp_path / "one.csv", tmp_path / "one.tar.gz", fmt="tar.gz")
    assert Path(packed.manifest).read_text().endswith("  one.csv\n")
    extract_archive(tmp_path / "one.tar.gz", tmp_path / "out")
    assert (tmp_path / "out" / "one.csv").read_text() == "a,b\n"


def test_destination_inside_the_source_is_refused(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    with pytest.raises(JobValidationError, match="inside the source"):
        compress_path(source, source / "sub" / "self.tar.zst")
    assert not (source / "sub" / "self.tar.zst").exists()


def test_existing_archive_is_kept_unless_overwrite(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    archive = tmp_path / "a.tar.zst"
    archive.write_bytes(b"precious")
    with pytest.raises(JobValidationError, match="exists; set overwrite=true"):
        compress_path(source, archive)
    assert archive.read_bytes() == b"precious"
    compress_path(source, archive, overwrite=True)
    assert detect_format(archive) == "tar.zst"


def test_bad_level_names_the_range(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    with pytest.raises(JobValidationError, match=r"1\.\.9"):
        compress_path(source, tmp_path / "a.tar.gz", fmt="tar.gz", level=12)


def test_failure_while_packing_leaves_no_partial_files(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    scanned = scan_source(source)
    (source / "sub" / "b.bin").write_bytes(b"shrunk")  # smaller than when it was scanned
    with pytest.raises(OSError, match="unexpected end of data"):
        write_archive(scanned, tmp_path / "a.tar.zst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    reported: list[int] = []
    packed = compress_path(source, tmp_path / "a.tar.zst", progress=reported.append)
    assert sum(reported) == packed.bytes
    consumed: list[int] = []
    extract_archive(tmp_path / "a.tar.zst", tmp_path / "out", progress=consumed.append)
    assert sum(consumed) == (tmp_path / "a.tar.zst").stat().st_size


_names = st.text(alphabet="abcxyz019_-. ", min_size=1, max_size=12).filter(
    lambda name: name not in (".", "..") and name.strip() == name
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(
        st.lists(_names, min_size=1, max_size=3).map(tuple),
        st.binary(max_size=20_000),
        max_size=12,
    ),
    fmt=st.sampled_from(["tar.zst", "tar.gz"]),
)
def test_random_trees_round_trip(tmp_path: Path, files: dict[tuple[str, ...], bytes], fmt: str) -> None:
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    source = case / "src"
    source.mkdir(parents=True)
    for parts, data in files.items():
        path = source.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            continue  # the same name drawn as both a file and a directory
    archive = case / f"a.{fmt}"
    packed = compress_path(source, archive, fmt=fmt)  # type: ignore[arg-type]
    extract_archive(archive, case / "dest")
    assert tree_contents(case / "dest") == tree_contents(source)
    assert verify_tree(case / "dest", Path(packed.manifest)).ok
