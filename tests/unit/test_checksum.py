"""SHA-256 manifests and tree checks (jobbridge.tasks.checksum), against real files and sha256sum."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobbridge.errors import JobValidationError
from jobbridge.tasks.checksum import (
    create_manifest,
    format_manifest_line,
    hash_files,
    list_files,
    parse_manifest_line,
    read_manifest,
    sha256_file,
    verify_tree,
    write_manifest,
)
from jobbridge.tasks.files import walk_tree

DIGEST_A = hashlib.sha256(b"alpha\n").hexdigest()


def make_tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))  # several 1 MiB reads
    (root / "sub" / "deep" / "c.txt").write_text("gamma\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "link-to-a").symlink_to("a.txt")
    return root


def sha256sum_manifest(root: Path, manifest: Path) -> None:
    """Write a manifest with the real sha256sum, paths relative to ``root``."""
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    )
    output = subprocess.run(["sha256sum", *files], cwd=root, check=True, capture_output=True)
    manifest.write_bytes(output.stdout)


# --------------------------------------------------------------------------------------------------
# Hashing


def test_sha256_file_matches_hashlib_across_buffer_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom((1 << 20) * 2 + 5)
    path.write_bytes(data)
    reported: list[int] = []
    assert sha256_file(path, reported.append) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sum(reported) == len(data)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_hash_files_keeps_order_and_results_for_any_pool_size(tmp_path: Path, workers: int) -> None:
    root = tmp_path / "t"
    root.mkdir()
    for index in range(150):
        (root / f"f{index:03d}").write_bytes(os.urandom(index * 37))
    files = list_files(root)
    reported: list[int] = []
    results = list(hash_files(files, progress=reported.append, workers=workers))
    assert [rel for rel, _, _ in results] == list(files)
    for rel, digest, size in results:
        data = (root / rel).read_bytes()
        assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sum(reported) == sum(info.size for info in files.values())


def test_walk_is_sorted_depth_first_and_does_not_follow_links(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    (root / "dirlink").symlink_to("sub")
    entries = [(entry.rel, entry.kind) for entry in walk_tree(root)]
    assert entries == [
        ("a.txt", "file"),
        ("dirlink", "symlink"),
        ("empty.txt", "file"),
        ("link-to-a", "symlink"),
        ("sub", "dir"),
        ("sub/b.bin", "file"),
        ("sub/deep", "dir"),
        ("sub/deep/c.txt", "file"),
    ]


# --------------------------------------------------------------------------------------------------
# The sha256sum format


def test_manifest_lines_parse_like_sha256sum() -> None:
    assert parse_manifest_line(f"{DIGEST_A}  a.txt", 1) == ("a.txt", DIGEST_A)
    assert parse_manifest_line(f"{DIGEST_A} *bin/x.bin", 1) == ("bin/x.bin", DIGEST_A)
    assert parse_manifest_line(f"{DIGEST_A.upper()}  ./sub//c", 1) == ("sub/c", DIGEST_A)
    assert parse_manifest_line(f"\\{DIGEST_A}  new\\nline\\\\x", 1) == ("new\nline\\x", DIGEST_A)


@given(
    name=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
        min_size=1,
        max_size=30,
    ).filter(lambda name: name not in (".", "..")),
    digest=st.binary(min_size=32, max_size=32).map(bytes.hex),
)
def test_format_then_parse_round_trips(name: str, digest: str) -> None:
    line = format_manifest_line(digest, name)
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_manifest_line(line[:-1], 1) == (name, digest)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not a manifest line", "is not '<64 hex digits>"),
        (f"{DIGEST_A[:-1]}  short.txt", "is not '<64 hex digits>"),
        (f"{DIGEST_A}\tTAB.txt", "is not '<64 hex digits>"),
        (f"{DIGEST_A}  /etc/passwd", "absolute path"),
        (f"{DIGEST_A}  ../up.txt", "not a path inside the tree"),
        (f"\\{DIGEST_A}  bad\\escape", "bad escape"),
    ],
)
def test_malformed_lines_name_the_line_number(tmp_path: Path, line: str, why: str) -> None:
    manifest = tmp_path / "m.sha256"
    manifest.write_text(f"{DIGEST_A}  a.txt\n\n{line}\n")
    with pytest.raises(JobValidationError, match=f"line 3.*{why}|line 3 {why}"):
        read_manifest(manifest)


def test_duplicate_entries_name_the_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.sha256"
    manifest.write_text(f"{DIGEST_A}  a.txt\n{DIGEST_A}  ./a.txt\n")
    with pytest.raises(JobValidationError, match=r"line 2: 'a\.txt' is listed twice"):
        read_manifest(manifest)


def test_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    manifest = tmp_path / "m.sha256"
    manifest.write_bytes(f"{DIGEST_A}  a.txt\r\n\r\n".encode())
    assert read_manifest(manifest) == {"a.txt": DIGEST_A}


def test_manifests_written_by_sha256sum_are_read(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    (root / "odd\nname\\.txt").write_text("odd")
    manifest = tmp_path / "m.sha256"
    sha256sum_manifest(root, manifest)
    assert verify_tree(root, manifest).ok


def test_write_manifest_refuses_to_overwrite(tmp_path: Path) -> None:
    manifest = tmp_path / "m.sha256"
    manifest.write_text("keep")
    with pytest.raises(JobValidationError, match="overwrite=true"):
        write_manifest(manifest, [("a.txt", DIGEST_A)])
    assert manifest.read_text() == "keep"
    write_manifest(manifest, [("a.txt", DIGEST_A)], overwrite=True)
    assert manifest.read_text() == f"{DIGEST_A}  a.txt\n"


# --------------------------------------------------------------------------------------------------
# Trees against manifests


def test_created_manifest_passes_sha256sum_check(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    (root / "sp ace\\and\nnewline.txt").write_text("x")
    manifest = tmp_path / "t.sha256"
    written = create_manifest(root, manifest)
    assert written.files == 5
    assert written.bytes == sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) - 6
    checked = subprocess.run(
        ["sha256sum", "-c", "--strict", str(manifest)], cwd=root, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "link-to-a" not in manifest.read_text()  # links are not files of the tree


def test_manifest_inside_the_tree_is_not_extra(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    manifest = root / "MANIFEST.sha256"
    create_manifest(root, manifest)
    assert "MANIFEST" not in manifest.read_text()
    check = verify_tree(root, manifest)
    assert check.ok, check.summary()
    assert check.extra == []


def test_create_refuses_an_existing_manifest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    manifest = tmp_path / "t.sha256"
    manifest.write_text("keep")
    with pytest.raises(JobValidationError, match="exists"):
        create_manifest(root, manifest)
    assert manifest.read_text() == "keep"


def test_differences_are_listed_sorted_with_a_one_line_summary(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    manifest = tmp_path / "t.sha256"
    create_manifest(root, manifest)
    (root / "sub" / "deep" / "c.txt").unlink()
    (root / "a.txt").write_bytes(b"changed\n")
    (root / "zz-new.txt").write_text("new")
    (root / "sub" / "new.txt").write_text("new")
    check = verify_tree(root, manifest)
    assert not check.ok
    assert check.missing == ["sub/deep/c.txt"]
    assert check.extra == ["sub/new.txt", "zz-new.txt"]
    assert check.changed == ["a.txt"]
    assert check.files == 3  # hashed: in both the manifest and the tree
    assert check.summary() == ("4 files differ from the manifest: 1 missing, 2 extra, 1 changed")
    result = check.as_dict(limit=1)
    assert result["extra"] == ["sub/new.txt"]
    assert result["differences"] == {"missing": 1, "extra": 2, "changed": 1}
    assert result["truncated"] is True
    assert result["ok"] is False


def test_one_difference_reads_in_the_singular(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    manifest = tmp_path / "t.sha256"
    create_manifest(root, manifest)
    (root / "empty.txt").write_bytes(b"no longer empty")
    assert verify_tree(root, manifest).summary() == (
        "1 file differs from the manifest: 0 missing, 0 extra, 1 changed"
    )


def test_verify_reports_progress_for_the_bytes_it_hashes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    manifest = tmp_path / "t.sha256"
    written = create_manifest(root, manifest)
    reported: list[int] = []
    check = verify_tree(root, manifest, progress=reported.append, workers=2)
    assert sum(reported) == check.bytes == written.bytes
