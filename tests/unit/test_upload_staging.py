"""The upload store and its pure parts, on real files in a temporary directory (no API, no Prefect)."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import uuid
from pathlib import Path

import pytest

from jobbridge.api import names
from jobbridge.api.errors import (
    ChunkRejectedError,
    UploadAreaBusyError,
    UploadConflictError,
    UploadError,
    UploadGoneError,
    UploadNotFoundError,
)
from jobbridge.api.fields import read_fields, read_sha256
from jobbridge.api.ledger import COMPLETED, RECEIVING, VERIFIED
from jobbridge.api.resumable_sha256 import can_resume, new_sha256
from jobbridge.api.staging import UploadStore, chunk_count_for, ranges
from jobbridge.api.writers import BLOCK_SIZE, ChunkWriter
from jobbridge.errors import JobValidationError

MiB = 1024 * 1024
FIELDS = {"user_email": "amy@example.edu", "dataset_name": "scan", "sensor": "TIFF"}


# --------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["scan_001.tif", "résumé.h5", ".hidden", "a b c.nc", "x" * 200, "100%.txt"])
def test_plain_file_names_are_accepted(name: str) -> None:
    assert names.safe_filename(name) == name


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("../etc/passwd", "without '/'"),
        ("/etc/passwd", "without '/'"),
        ("..", "not a file name"),
        ("a\\..\\b", "without '/'"),
        ("C:\\Windows\\x", "without '/'"),
        ("a\x00b", "NUL"),
        ("%2e%2e%2fetc", "without '/'"),
        ("%2e%2e", "not a file name"),
        ("%252e%252e%252f", "without '/'"),  # double-encoded
        ("..%5cx", "without '/'"),
        ("%c0%ae%c0%ae", "not valid UTF-8"),
        ("a\uff0fb", "without '/'"),  # fullwidth solidus: '/' under NFKC
        ("\uff0e\uff0e", "not a file name"),  # fullwidth dots: '..' under NFKC
        ("tab\there", "control character"),
        ("", "empty"),
        ("   ", "empty"),
        ("é" * 200, "longer than 255 bytes"),
    ],
)
def test_unsafe_file_names_are_refused_with_the_reason(name: str, complaint: str) -> None:
    with pytest.raises(names.UnsafeNameError, match=complaint):
        names.safe_filename(name)


def test_raw_filename_bytes_must_be_strict_utf8() -> None:
    assert names.safe_filename("naïve.tif".encode()) == "naïve.tif"
    with pytest.raises(names.UnsafeNameError, match="not valid UTF-8"):
        names.safe_filename(b"\xc0\xae\xc0\xae")  # overlong '..'
    with pytest.raises(names.UnsafeNameError, match="not valid UTF-8"):
        names.safe_filename(b"abc\xff")


@pytest.mark.parametrize("folder", ["../x", "/abs", "C:\\data", "a/../b", "a/%2e%2e/b", "a\\b"])
def test_unsafe_folders_are_refused(folder: str) -> None:
    with pytest.raises(names.UnsafeNameError):
        names.safe_folder(folder)


def test_folders_are_normalised_relative_paths() -> None:
    assert names.safe_folder("raw/day1/") == "raw/day1"
    assert names.safe_folder("./raw//x") == "raw/x"
    assert names.safe_folder("") is None and names.safe_folder(None) is None


def test_upload_ids_are_server_uuid4s_only() -> None:
    issued = names.new_upload_id()
    assert names.parse_upload_id(issued) == issued
    assert names.parse_upload_id(issued.upper()) == issued
    for bad in ["../../etc", str(uuid.uuid1()), "nope", issued + "/..", issued.replace("-", "")]:
        with pytest.raises(names.UnsafeNameError, match="not an upload id"):
            names.parse_upload_id(bad)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("false", False),
        ("False", False),
        (True, True),
        (False, False),
        (None, False),
    ],
)
def test_form_booleans_in_every_legacy_spelling(raw: object, value: bool) -> None:
    assert names.parse_bool(raw, "is_public") is value  # type: ignore[arg-type]


def test_bad_values_name_the_field() -> None:
    with pytest.raises(JobValidationError, match="is_public is 'maybe'"):
        names.parse_bool("maybe", "is_public")
    with pytest.raises(JobValidationError, match="sensor 'XRAY' is not one of"):
        read_fields({**FIELDS, "sensor": "XRAY"})
    with pytest.raises(JobValidationError, match="user_email is required"):
        read_fields({"dataset_name": "x", "sensor": "TIFF"})
    with pytest.raises(JobValidationError, match=r"team_uuid '\.\./t' is not an identifier"):
        read_fields({**FIELDS, "team_uuid": "../t"})
    with pytest.raises(JobValidationError, match="64 hexadecimal"):
        read_sha256("abc")


def test_dataset_fields_read_legacy_spellings() -> None:
    fields = read_fields(
        {
            **FIELDS,
            "sensor": "tiff rgb",
            "is_public": "True",
            "convert": "false",
            "dataset_identifier": "ds-42",
            "folder": "raw/day1",
        }
    )
    assert (fields.sensor, fields.is_public, fields.convert) == ("TIFF RGB", True, False)
    assert fields.dataset_uuid == "ds-42" and fields.folder == "raw/day1"
    assert uuid.UUID(read_fields(FIELDS).dataset_uuid).version == 4  # a new dataset by default
    with pytest.raises(JobValidationError, match="add_to_existing=true needs dataset_identifier"):
        read_fields({**FIELDS, "add_to_existing": "true"})


# ------------------------------------------------------------------------------------ pure helpers


def test_ranges_and_chunk_counts() -> None:
    assert ranges(bytearray([1, 1, 0, 1, 0, 0]), 1) == [[0, 1], [3, 3]]
    assert ranges(bytearray([1, 1, 0, 1, 0, 0]), 0) == [[2, 2], [4, 5]]
    assert ranges(bytearray(), 0) == []
    assert (
        chunk_count_for(0, MiB) == 0 and chunk_count_for(MiB, MiB) == 1 and chunk_count_for(MiB + 1, MiB) == 2
    )


@pytest.mark.skipif(not can_resume(), reason="libcrypto's SHA256 functions are not available here")
def test_a_saved_hash_state_resumes_to_the_same_digest() -> None:
    rng = random.Random(7)
    data = rng.randbytes(3 * MiB + 17)
    for cut in (0, 1, 63, 64, MiB, len(data)):
        first = new_sha256()
        assert first is not None
        first.update(data[:cut])
        resumed = new_sha256(first.state())
        assert resumed is not None
        resumed.update(bytearray(data[cut:]))
        assert resumed.hexdigest() == hashlib.sha256(data).hexdigest()
    assert new_sha256(b"\x00" * 10) is None  # not a state: the caller re-hashes from the start


# ------------------------------------------------------------------------------------------- store


def open_store(root: Path, **kwargs: object) -> UploadStore:
    options: dict[str, object] = {"chunk_size": MiB, "expiry_seconds": 3600.0, **kwargs}
    return UploadStore(root, **options).open()  # type: ignore[arg-type]


def send(
    store: UploadStore, upload_id: str, n: int, data: bytes, sha: str | None = None, *, sized: bool = True
) -> dict[str, object]:
    """What the chunk route does: stream the body in blocks, then finish (unsized: chunked encoding)."""
    writer = store.begin_chunk(upload_id, n, len(data) if sized else None)
    try:
        for start in range(0, len(data), BLOCK_SIZE):
            block = bytearray(BLOCK_SIZE)
            piece = data[start : start + BLOCK_SIZE]
            block[: len(piece)] = piece
            writer.write_block(block, len(piece))
        return writer.finish(sha or hashlib.sha256(data).hexdigest())
    finally:
        writer.close()


def chunks_of(data: bytes, size: int = MiB) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def complete(store: UploadStore, upload_id: str, sha: str | None = None) -> str:
    record = store.verify(upload_id, sha, wait=30)
    assert not isinstance(record, dict), record
    assert record.state == VERIFIED and record.sha256
    return record.sha256


def test_parallel_out_of_order_chunks_assemble_the_file(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(9 * MiB + 1234)
    with open_store(tmp_path / "up") as store:
        record = store.create("data.bin", len(data), FIELDS)
        parts = chunks_of(data)
        order = list(range(len(parts)))
        random.Random(2).shuffle(order)
        threads = [threading.Thread(target=send, args=(store, record.upload_id, n, parts[n])) for n in order]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.describe(record.upload_id)["missing_ranges"] == []
        assert complete(store, record.upload_id) == hashlib.sha256(data).hexdigest()
        assert store.data_path(record).read_bytes() == data


def test_a_corrupted_chunk_is_refused_and_can_be_sent_again(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MiB)
    parts = chunks_of(data)
    with open_store(tmp_path / "up") as store:
        record = store.create("c.bin", len(data), FIELDS)
        send(store, record.upload_id, 0, parts[0])
        flipped = bytes([parts[1][0] ^ 1]) + parts[1][1:]
        with pytest.raises(
            ChunkRejectedError, match=r"chunk 1: SHA-256 of the bytes received is .* nothing was kept"
        ):
            send(store, record.upload_id, 1, flipped, hashlib.sha256(parts[1]).hexdigest())
        with pytest.raises(ChunkRejectedError, match="chunk 2 has 1048575 bytes, expected 1048576"):
            send(store, record.upload_id, 2, parts[2][:-1], hashlib.sha256(parts[2]).hexdigest(), sized=False)
        with pytest.raises(ChunkRejectedError, match="must be 1048576 bytes"):
            store.begin_chunk(record.upload_id, 2, content_length=5)
        with pytest.raises(ChunkRejectedError, match="out of range"):
            store.begin_chunk(record.upload_id, 3)
        assert store.describe(record.upload_id)["missing_ranges"] == [[1, 2]]
        with pytest.raises(UploadConflictError, match="missing chunks 1-2"):
            store.verify(record.upload_id, None, wait=1)
        send(store, record.upload_id, 1, parts[1])
        send(store, record.upload_id, 2, parts[2])
        assert complete(store, record.upload_id) == hashlib.sha256(data).hexdigest()


def test_a_chunk_body_longer_than_the_chunk_is_refused_before_it_is_written(tmp_path: Path) -> None:
    with open_store(tmp_path / "up") as store:
        record = store.create("c.bin", MiB + 10, FIELDS)
        writer = store.begin_chunk(record.upload_id, 1)
        try:
            with pytest.raises(ChunkRejectedError, match="longer than 10 bytes"):
                writer.write_block(bytearray(b"x" * BLOCK_SIZE), 11)
        finally:
            writer.close()
        assert os.path.getsize(store.data_path(record)) == MiB + 10


def test_duplicates_in_flight_conflict_and_resends_never_overwrite(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(2 * MiB)
    parts = chunks_of(data)
    with open_store(tmp_path / "up") as store:
        record = store.create("d.bin", len(data), FIELDS)
        first = store.begin_chunk(record.upload_id, 0)
        with pytest.raises(UploadConflictError, match="being received by another request"):
            store.begin_chunk(record.upload_id, 0)
        first.close()
        send(store, record.upload_id, 0, parts[0])
        again = send(store, record.upload_id, 0, parts[0])
        assert again["already_received"] is True
        other = random.Random(5).randbytes(MiB)
        with pytest.raises(UploadConflictError, match="already received with SHA-256"):
            send(store, record.upload_id, 0, other)
        assert store.data_path(record).read_bytes()[:MiB] == parts[0]  # the good bytes are still there


def test_zero_chunks_of_a_sparse_file_stay_holes(tmp_path: Path) -> None:
    size = 64 * MiB
    data = bytearray(size)
    data[5 * MiB : 5 * MiB + 100] = b"x" * 100
    with open_store(tmp_path / "up") as store:
        record = store.create("sparse.bin", size, FIELDS)
        for n, part in enumerate(chunks_of(bytes(data))):
            send(store, record.upload_id, n, part)
        assert complete(store, record.upload_id) == hashlib.sha256(data).hexdigest()
        staged = store.data_path(record)
        assert staged.read_bytes() == data
        assert staged.stat().st_blocks * 512 <= 4 * MiB  # one written block, not 64 MiB


def test_a_failed_attempt_leaves_no_stale_bytes_behind_a_zero_resend(tmp_path: Path) -> None:
    """A chunk half-written by a failed attempt is no longer known to be zeros: its resend is written."""
    with open_store(tmp_path / "up") as store:
        record = store.create("z.bin", MiB, FIELDS)
        zeros = bytes(MiB)
        with pytest.raises(ChunkRejectedError):
            send(store, record.upload_id, 0, b"\x01" * MiB, hashlib.sha256(zeros).hexdigest())
        send(store, record.upload_id, 0, zeros)
        assert complete(store, record.upload_id) == hashlib.sha256(zeros).hexdigest()
        assert store.data_path(record).read_bytes() == zeros


def test_the_declared_sha256_is_checked(tmp_path: Path) -> None:
    data = b"hello" * 1000
    with open_store(tmp_path / "up") as store:
        record = store.create("h.txt", len(data), FIELDS, expected_sha256="0" * 64)
        send(store, record.upload_id, 0, data)
        with pytest.raises(UploadError, match=r"the SHA-256 of the assembled file is .* declared 0000"):
            store.verify(record.upload_id, None, wait=10)
        other = store.create("h.txt", len(data), FIELDS)
        send(store, other.upload_id, 0, data)
        assert (
            complete(store, other.upload_id, hashlib.sha256(data).hexdigest())
            == hashlib.sha256(data).hexdigest()
        )


def test_an_empty_file_completes_at_once(tmp_path: Path) -> None:
    with open_store(tmp_path / "up") as store:
        record = store.create("empty.txt", 0, FIELDS)
        assert complete(store, record.upload_id) == hashlib.sha256(b"").hexdigest()


def test_a_reopened_store_resumes_chunks_and_the_saved_hash(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(6 * MiB)
    parts = chunks_of(data)
    store = open_store(tmp_path / "up")
    record = store.create("r.bin", len(data), FIELDS)
    for n in (0, 1, 2, 4):
        send(store, record.upload_id, n, parts[n])
    active = store.active_upload(record.upload_id)
    assert active is not None
    assert active.hasher.wait(10) is False and active.hasher.hashed == 3  # stops at the gap
    store.close()  # saves the hash state reached
    with open_store(tmp_path / "up") as again:
        info = again.describe(record.upload_id)
        assert info["received_ranges"] == [[0, 2], [4, 4]] and info["missing_ranges"] == [[3, 3], [5, 5]]
        if can_resume():
            assert again.ledger.get(record.upload_id).hashed_chunks == 3  # type: ignore[union-attr]
        send(again, record.upload_id, 3, parts[3])
        send(again, record.upload_id, 5, parts[5])
        assert complete(again, record.upload_id) == hashlib.sha256(data).hexdigest()


def test_chunks_that_did_not_survive_a_crash_are_asked_for_again(tmp_path: Path) -> None:
    """Bytes lost after a chunk was recorded (power loss) are found when hashed, and that chunk re-sent."""
    data = random.Random(8).randbytes(4 * MiB)
    parts = chunks_of(data)
    store = open_store(tmp_path / "up")
    record = store.create("t.bin", len(data), FIELDS)
    for n in (0, 2, 3):  # chunk 1 missing: 2 and 3 stay beyond the saved hash
        send(store, record.upload_id, n, parts[n])
    store.close()
    with open(store.data_path(record), "r+b") as handle:  # chunk 2 "lost" while the API was down
        handle.seek(2 * MiB)
        handle.write(bytes(MiB))
    with open_store(tmp_path / "up") as again:
        send(again, record.upload_id, 1, parts[1])
        with pytest.raises(UploadConflictError, match="missing chunks 2"):
            again.verify(record.upload_id, None, wait=10)
        send(again, record.upload_id, 2, parts[2])
        assert complete(again, record.upload_id) == hashlib.sha256(data).hexdigest()


def test_a_lost_data_file_makes_every_chunk_missing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "up")
    record = store.create("l.bin", 2 * MiB, FIELDS)
    send(store, record.upload_id, 0, bytes(range(256)) * 4096)
    store.close()
    store.data_path(record).unlink()
    with open_store(tmp_path / "up") as again:
        assert again.describe(record.upload_id)["missing_ranges"] == [[0, 1]]


def test_one_store_per_upload_area(tmp_path: Path) -> None:
    with (
        open_store(tmp_path / "up"),
        pytest.raises(UploadAreaBusyError, match=f"in use by another jobbridge api \\(pid {os.getpid()}\\)"),
    ):
        open_store(tmp_path / "up")
    open_store(tmp_path / "up").close()  # free again once the first one is closed


def test_expiry_removes_idle_uploads_and_keeps_running_jobs_files(tmp_path: Path) -> None:
    with open_store(tmp_path / "up", expiry_seconds=60.0) as store:
        idle = store.create("idle.bin", 2 * MiB, FIELDS)
        send(store, idle.upload_id, 0, bytes(MiB))
        done = store.create("done.bin", 10, FIELDS)
        send(store, done.upload_id, 0, b"0123456789")
        complete(store, done.upload_id)
        store.attach_job(done.upload_id, "job-1")
        fresh = store.create("fresh.bin", 10, FIELDS)
        later = store.ledger.get(fresh.upload_id).updated_at + 30  # type: ignore[union-attr]
        assert store.expire(now=later) == []
        much_later = later + 3600
        final: dict[str, bool | None] = {"job-1": False}
        removed = store.expire(now=much_later, job_is_final=lambda job: final[job])
        assert set(removed) == {idle.upload_id, fresh.upload_id}
        assert not (tmp_path / "up" / idle.upload_id).exists()
        with pytest.raises(UploadNotFoundError):
            store.describe(idle.upload_id)
        with pytest.raises(UploadNotFoundError):
            send(store, idle.upload_id, 1, bytes(MiB))
        assert store.get(done.upload_id).state == COMPLETED  # its job still runs: kept
        assert store.expire(now=much_later) == []  # cannot tell whether the job is over: kept
        final["job-1"] = True
        assert store.expire(now=much_later, job_is_final=lambda job: final[job]) == [done.upload_id]


def test_cancel_removes_the_bytes_and_refuses_more_chunks(tmp_path: Path) -> None:
    with open_store(tmp_path / "up") as store:
        record = store.create("x.bin", 2 * MiB, FIELDS)
        send(store, record.upload_id, 0, bytes(MiB))
        assert store.cancel(record.upload_id).state == "cancelled"
        assert not (tmp_path / "up" / record.upload_id).exists()
        with pytest.raises(UploadGoneError, match="was cancelled"):
            store.begin_chunk(record.upload_id, 1)


def test_orphan_directories_are_removed_at_open(tmp_path: Path) -> None:
    root = tmp_path / "up"
    orphan = root / names.new_upload_id()
    orphan.mkdir(parents=True)
    (orphan / "x").write_bytes(b"x")
    (root / "not-an-upload").mkdir()
    with open_store(root):
        assert not orphan.exists() and (root / "not-an-upload").exists()


def test_a_single_request_upload_is_hashed_as_it_streams(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(5 * MiB + 3) + bytes(3 * MiB)
    with open_store(tmp_path / "up") as store:
        writer = store.begin_single(b"one.bin", max_size=10 * MiB)
        for start in range(0, len(data), BLOCK_SIZE):
            block = bytearray(BLOCK_SIZE)
            piece = data[start : start + BLOCK_SIZE]
            block[: len(piece)] = piece
            writer.write_block(block, len(piece))
        record = writer.finish()
        assert (record.state, record.size, record.sha256) == (
            VERIFIED,
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
        assert store.data_path(record).read_bytes() == data
        too_big = store.begin_single("big.bin", max_size=MiB)
        with pytest.raises(UploadError, match="larger than 1048576 bytes"):
            too_big.write_block(bytearray(BLOCK_SIZE), BLOCK_SIZE)
        too_big.discard()
        assert not (tmp_path / "up" / too_big.record.upload_id).exists()
        with pytest.raises(names.UnsafeNameError):
            store.begin_single(b"../x", max_size=MiB)


def test_chunk_writer_is_the_route_contract(tmp_path: Path) -> None:
    """The route hands ChunkWriter fixed-size blocks; a state is 'receiving' until verified."""
    with open_store(tmp_path / "up") as store:
        record = store.create("k.bin", 10, FIELDS)
        writer = store.begin_chunk(record.upload_id, 0)
        assert isinstance(writer, ChunkWriter)
        writer.close()
        assert store.get(record.upload_id).state == RECEIVING
