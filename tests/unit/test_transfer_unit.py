"""Pure logic of the transfer jobs: locations and sandboxed names, parameter models, rclone command lines
and log parsing, hashing while copying, manifests, and the local sink's all-or-nothing publishing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect import flow
from pydantic import BaseModel, SecretStr, field_validator

from jobbridge import registry
from jobbridge.errors import JobValidationError
from jobbridge.flows.upload import Sensor
from jobbridge.registry import get_spec
from jobbridge.settings import get_settings
from jobbridge.tasks.credentials import DriveAccess, S3Access
from jobbridge.tasks.fetch import CHUNK, Sha256Pipe, copy_stream, filename_for
from jobbridge.tasks.locations import (
    LocationError,
    name_from_remote,
    parse_location,
    safe_relative_path,
    safe_segment,
)
from jobbridge.tasks.manifests import manifest_text, parse_manifest_text
from jobbridge.tasks.s3 import part_size
from jobbridge.tasks.sink import LocalSink
from jobbridge.tasks.sources import LocalSource
from jobbridge.tasks.transfer import (
    RcloneEndpoint,
    RcloneOutcome,
    filter_args,
    parse_combined,
    parse_log_line,
    raise_for_outcome,
    rclone_endpoint,
    rclone_environment,
    remote_env,
    scrub,
    transfer_argv,
)

ALL_KINDS = ("local", "s3", "gdrive", "sftp", "http")

# A stats line exactly as rclone 1.60 writes it with --use-json-log --stats-log-level NOTICE.
STATS_LINE = (
    '{"level":"warning","msg":"\\nTransferred:   \\t    2.861 MiB / 2.861 MiB, 100%, 0 B/s, ETA -\\n",'
    '"source":"accounting/stats.go:482","stats":{"bytes":3000003,"checks":0,"deletedDirs":0,"deletes":0,'
    '"elapsedTime":0.052680798,"errors":0,"eta":null,"fatalError":false,"renames":0,"retryError":false,'
    '"speed":1234.5,"totalBytes":3000003,"totalChecks":0,"totalTransfers":2,"transferTime":0,"transfers":2},'
    '"time":"2026-11-26T01:35:50.423298+00:00"}'
)


# --------------------------------------------------------------------------------------------------
# Locations and names


def test_locations_of_every_kind_parse() -> None:
    assert parse_location("s3://my-bucket/a/b/", allow=ALL_KINDS).path == "my-bucket/a/b/"
    s3 = parse_location("s3://my-bucket", allow=ALL_KINDS)
    assert (s3.bucket, s3.key, s3.label()) == ("my-bucket", "", "s3://my-bucket")
    sftp = parse_location("sftp://amy@example.org:2222/data/run%201", allow=ALL_KINDS)
    assert (sftp.user, sftp.host, sftp.port, sftp.path) == ("amy", "example.org", 2222, "/data/run 1")
    assert parse_location("sftp://h.example/~/inbox", allow=ALL_KINDS).path == "inbox"
    assert parse_location("gdrive://Shared/run-7", allow=ALL_KINDS).path == "Shared/run-7"
    http = parse_location("https://example.org/x/data.h5?sig=1", allow=ALL_KINDS)
    assert (http.kind, http.url) == ("http", "https://example.org/x/data.h5?sig=1")
    assert parse_location("file:///srv/data", allow=ALL_KINDS).path == "/srv/data"


def test_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_location("data/run", allow=["local"]).path == str(tmp_path / "data" / "run")
    assert parse_location("~/x", allow=["local"]).path == os.path.expanduser("~/x")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("ftp://host/x", "scheme 'ftp://' is not supported"),
        ("s3://AB/x", "is not an S3 bucket name"),
        ("s3://bucket/a/../b", "'..' segment"),
        ("https://user:pw@example.org/x", "must not hold a user name or password"),
        ("sftp://amy:secret@host/x", "must not hold a password"),
        ("sftp:///x", "has no valid host"),
        ("/tmp/a\x00b", "NUL byte"),
        ("gdrive://a/../b", "'..' segments"),
    ],
)
def test_bad_locations_say_what_is_accepted(value: str, message: str) -> None:
    with pytest.raises(LocationError, match=message):
        parse_location(value, allow=ALL_KINDS)


def test_a_kind_not_allowed_lists_the_allowed_ones() -> None:
    with pytest.raises(LocationError, match=r"not accepted here; use .*s3://bucket"):
        parse_location("https://example.org/x", allow=["local", "s3"])


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", "a\x00b", "tab\there", "x" * 256])
def test_unsafe_segments_are_refused(name: str) -> None:
    with pytest.raises(LocationError):
        safe_segment(name)


@pytest.mark.parametrize("path", ["../x", "a/../../b", "/etc/passwd", "C:\\win", "a/\x00/b", "", "./"])
def test_unsafe_relative_paths_are_refused(path: str) -> None:
    with pytest.raises(LocationError):
        safe_relative_path(path)


def test_relative_paths_are_normalised() -> None:
    assert safe_relative_path("a//b/./c/") == "a/b/c"
    assert safe_relative_path("run 7/é.tif") == "run 7/é.tif"


@given(st.text(min_size=1, max_size=60))
def test_a_cleaned_relative_path_never_leaves_its_root(value: str) -> None:
    try:
        cleaned = safe_relative_path(value)
    except LocationError:
        return
    root = Path("/store/ds")
    assert os.path.normpath(root / cleaned).startswith(str(root) + "/")


def test_names_from_remote_servers_lose_their_directories() -> None:
    assert name_from_remote("../../etc/passwd", "download") == "passwd"
    assert name_from_remote("/a/b/scan.tif", "download") == "scan.tif"
    assert name_from_remote("..", "download") == "download"
    assert name_from_remote("dir/", "download") == "download"


def test_download_file_names_come_from_the_server_or_the_url() -> None:
    url = "http://h/files/a%20b.h5?x=1"
    plain = httpx.Response(200, request=httpx.Request("GET", url))
    assert filename_for(plain, url) == "a b.h5"
    disposition = httpx.Response(200, headers={"Content-Disposition": 'attachment; filename="../../evil.sh"'})
    assert filename_for(disposition, url) == "evil.sh"
    encoded = httpx.Response(
        200, headers={"Content-Disposition": "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"}
    )
    assert filename_for(encoded, url) == "résumé.pdf"
    assert filename_for(httpx.Response(200), "http://h/") == "download"


# --------------------------------------------------------------------------------------------------
# Parameter models (checked at submission)


def upload_params(source: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": source,
        "user_email": "amy@example.edu",
        "dataset_name": "Drone survey",
        "sensor": "RGB",
        "convert": False,
        "is_public": False,
        **extra,
    }


@pytest.mark.parametrize(
    ("given_value", "canonical"),
    [
        ("tiff rgb", "TIFF RGB"),
        ("TIFF_RGB", "TIFF RGB"),
        ("4d nexus", "4D_NEXUS"),
        ("hdf5", "HDF5"),
        ("idx", "IDX"),
    ],
)
def test_sensor_is_accepted_in_any_case_and_stored_canonical(
    tmp_path: Path, given_value: str, canonical: str
) -> None:
    (tmp_path / "f.bin").write_bytes(b"x")
    checked = get_spec("upload").validate_parameters(
        upload_params(str(tmp_path / "f.bin"), sensor=given_value)
    )
    assert checked["sensor"] == canonical
    assert Sensor(given_value).value == canonical


def test_upload_parameters_fill_in_a_dataset_uuid_and_absolute_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.bin").write_bytes(b"x")
    checked = get_spec("file_upload").validate_parameters(
        upload_params("f.bin", is_public="True", convert="false")
    )
    assert uuid.UUID(checked["dataset_uuid"]).version == 4
    assert checked["source"] == str(tmp_path / "f.bin")
    assert checked["is_public"] is True and checked["convert"] is False


def test_upload_errors_name_the_field_and_what_is_accepted(tmp_path: Path) -> None:
    spec = get_spec("upload")
    (tmp_path / "f.bin").write_bytes(b"x")
    good = str(tmp_path / "f.bin")
    cases = {
        "parameter 'sensor'": upload_params(good, sensor="jpeg"),
        "parameter 'user_email' must be an e-mail": upload_params(good, user_email="amy"),
        "parameter 'expected_sha256' must be 64 hexadecimal": upload_params(good, expected_sha256="abc"),
        "parameter 'source' must be an existing file or directory": upload_params(str(tmp_path / "none")),
        "parameter 'source_credentials_block' only applies": upload_params(
            good, source_credentials_block="k"
        ),
        "parameter 'move_source' only moves files staged": upload_params(good, move_source=True),
    }
    for expected, parameters in cases.items():
        with pytest.raises(JobValidationError, match=expected):
            spec.validate_parameters(parameters)
    with pytest.raises(JobValidationError, match=r"'user_email' is required.*'sensor' is required"):
        spec.validate_parameters({"source": good, "dataset_name": "x", "convert": False, "is_public": True})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset_uuid", "../../etc"),
        ("dataset_uuid", "/abs"),
        ("dataset_uuid", "a\x00b"),
        ("dataset_uuid", "a/b"),
        ("folder", "../../outside"),
        ("folder", "/etc"),
        ("folder", "ok/\x00/x"),
        ("team_uuid", ".."),
    ],
)
def test_names_that_would_leave_the_store_are_refused(tmp_path: Path, field: str, value: str) -> None:
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(JobValidationError, match=f"parameter '{field}'"):
        get_spec("upload").validate_parameters(upload_params(str(tmp_path / "f.bin"), **{field: value}))


def test_expected_sha256_needs_a_single_file(tmp_path: Path) -> None:
    with pytest.raises(JobValidationError, match="parameter 'expected_sha256' only applies to a single file"):
        get_spec("upload").validate_parameters(upload_params(str(tmp_path), expected_sha256="a" * 64))


def test_google_drive_without_credentials_is_refused_at_submission() -> None:
    with pytest.raises(
        JobValidationError, match=r"parameter 'source' is a Google Drive file, and no Drive credentials"
    ):
        get_spec("upload").validate_parameters(upload_params("gdrive://1AbCdEfGhIjKlMnOpQrStUvWxYz012345"))
    with pytest.raises(JobValidationError, match=r"parameter 'source' must be gdrive://<file id>"):
        get_spec("upload").validate_parameters(upload_params("gdrive://x", source_credentials_block="tok"))
    accepted = get_spec("upload").validate_parameters(
        upload_params("gdrive://1AbCdEfGhIjKlMnOpQrStUvWxYz012345", source_credentials_block="drive-token")
    )
    assert accepted["source_credentials_block"] == "drive-token"


def test_convert_without_a_convert_job_type_is_refused_naming_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    get_spec("upload")  # built-ins loaded, so that removing 'convert' below sticks
    monkeypatch.setattr(
        registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "convert"}
    )
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(JobValidationError, match=r"parameter 'convert' is true, but no 'convert' job type"):
        get_spec("upload").validate_parameters(upload_params(str(tmp_path / "f.bin"), convert=True))


class StrictConvert(BaseModel):
    """A convert job type that, like the real one, has no converter for some sensors."""

    source: str
    sensor: str

    @field_validator("sensor")
    @classmethod
    def _convertible(cls, value: str) -> str:
        if value == "OTHER":
            raise ValueError("no converter for OTHER")
        return value


@flow(name="strict-convert-stub")
def strict_convert(source: str, sensor: str) -> None:
    """Never runs: only its parameter model is consulted."""


def test_convert_with_a_sensor_the_convert_job_refuses_is_refused_at_submission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    get_spec("upload")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("convert", strict_convert, parameters=StrictConvert)
    (tmp_path / "f.bin").write_bytes(b"x")
    good = upload_params(str(tmp_path / "f.bin"), convert=True)
    with pytest.raises(
        JobValidationError, match=r"parameter 'convert' .*refuses sensor 'OTHER'.*no converter"
    ):
        get_spec("upload").validate_parameters({**good, "sensor": "other"})
    assert get_spec("upload").validate_parameters({**good, "sensor": "tiff"})["sensor"] == "TIFF"


def test_move_source_is_accepted_for_staged_files() -> None:
    staged = get_settings().upload_staging_dir / f"unit-{uuid.uuid4().hex}" / "f.bin"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"x")
    checked = get_spec("upload").validate_parameters(upload_params(str(staged), move_source=True))
    assert checked["move_source"] is True


def test_sync_parameters_check_each_side(tmp_path: Path) -> None:
    spec = get_spec("google_sync")
    (tmp_path / "src").mkdir()
    src = str(tmp_path / "src")
    cases = {
        "parameter 'source' must be an existing directory": {
            "source": str(tmp_path / "no"),
            "destination": "s3://bkt/x",
        },
        "parameter 'destination' must not be inside the source": {"source": src, "destination": src + "/sub"},
        "parameter 'destination' is on Google Drive, which needs credentials": {
            "source": src,
            "destination": "gdrive://backup",
        },
        "parameter 'source' is an sftp:// location: set sftp_key_file": {
            "source": "sftp://amy@host/data",
            "destination": str(tmp_path / "d"),
        },
        "parameter 'include' holds an unusable pattern": {
            "source": src,
            "destination": "s3://bkt/x",
            "include": [""],
        },
        "parameter 'source_credentials_block' only applies": {
            "source": src,
            "destination": "s3://bkt/x",
            "source_credentials_block": "aws",
        },
        "parameter 'mode'": {"source": src, "destination": "s3://bkt/x", "mode": "move"},
        "parameter 's3_endpoint' must be an http": {
            "source": src,
            "destination": "s3://bkt/x",
            "s3_endpoint": "x",
        },
    }
    for expected, parameters in cases.items():
        with pytest.raises(JobValidationError, match=expected):
            spec.validate_parameters(parameters)
    ok = spec.validate_parameters({"source": src, "destination": "s3://bkt/x", "include": ["*.tif"]})
    assert ok == {"source": src, "destination": "s3://bkt/x", "include": ["*.tif"]}


def test_backup_parameters(tmp_path: Path) -> None:
    spec = get_spec("backup_creation")
    (tmp_path / "ds").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(JobValidationError, match=r"parameter 'destination' .* is not empty"):
        spec.validate_parameters({"source": str(tmp_path / "ds"), "destination": str(tmp_path / "full")})
    with pytest.raises(
        JobValidationError, match=r"parameter 'manifest' the backup's manifest .* does not exist"
    ):
        spec.validate_parameters(
            {"action": "restore", "source": str(tmp_path / "ds"), "destination": str(tmp_path / "out")}
        )
    with pytest.raises(JobValidationError, match="parameter 'action'"):
        spec.validate_parameters(
            {"action": "copy", "source": str(tmp_path / "ds"), "destination": "s3://bkt/b"}
        )


# --------------------------------------------------------------------------------------------------
# rclone command lines, environment and logs


def test_filters_put_excludes_first_and_close_with_an_exclude_all() -> None:
    assert filter_args(["*.tif"], ["raw/**"]) == [
        "--filter",
        "- raw/**",
        "--filter",
        "+ *.tif",
        "--filter",
        "- **",
    ]
    assert filter_args([], ["*.tmp"]) == ["--filter", "- *.tmp"]


def test_secrets_stay_in_the_child_environment_only() -> None:
    access = S3Access("http://127.0.0.1:9", "eu-west-1", "AKIAEXAMPLE", SecretStr("s3cr3t-value"))
    source = rclone_endpoint(parse_location("s3://bkt/in", allow=ALL_KINDS), "jbsrc", s3=access)
    destination = rclone_endpoint(parse_location("/tmp/out", allow=ALL_KINDS), "jbdst")
    argv = transfer_argv(
        "rclone", "sync", source, destination, dry_run=True, filters=filter_args(["*.h5"], [])
    )
    assert argv[:4] == ["rclone", "sync", "jbsrc:bkt/in", "/tmp/out"]
    assert "--dry-run" in argv and not any("s3cr3t" in arg for arg in argv)
    assert "s3cr3t" not in repr(source) and "s3cr3t" not in repr(access)
    env = rclone_environment(
        [source, destination],
        base={"AWS_CA_BUNDLE": "/x.pem", "RCLONE_CONFIG_JBSRC_TYPE": "local", "PATH": "/bin"},
    )
    assert "AWS_CA_BUNDLE" not in env and env["PATH"] == "/bin" and env["RCLONE_CONFIG"] == os.devnull
    assert env["RCLONE_CONFIG_JBSRC_TYPE"] == "s3"
    assert env["RCLONE_CONFIG_JBSRC_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert env["RCLONE_CONFIG_JBSRC_FORCE_PATH_STYLE"] == "true"
    assert source.secrets() == ["s3cr3t-value"]
    assert scrub("denied for s3cr3t-value", source.secrets()) == "denied for ***"


def test_remote_options_without_keys_use_the_environment_and_drive_takes_its_secret() -> None:
    assert S3Access(None, "us-east-1").rclone_options()["env_auth"] == "true"
    token = DriveAccess(
        None, SecretStr('{"access_token":"t"}'), False, root_folder_id="0Axyz"
    ).rclone_options()
    assert token == {
        "type": "drive",
        "scope": "drive.readonly",
        "root_folder_id": "0Axyz",
        "token": '{"access_token":"t"}',
    }
    account = DriveAccess(None, SecretStr("{}"), True, read_only=False).rclone_options()
    assert account["service_account_credentials"] == "{}" and account["scope"] == "drive"
    assert remote_env("jbsrc", {"type": "sftp", "key_file": "/k"}) == {
        "RCLONE_CONFIG_JBSRC_TYPE": "sftp",
        "RCLONE_CONFIG_JBSRC_KEY_FILE": "/k",
    }


def test_log_lines_are_classified() -> None:
    stats = parse_log_line(STATS_LINE)
    assert stats.kind == "stats" and stats.stats is not None
    assert (stats.stats.bytes, stats.stats.total_bytes, stats.stats.transfers) == (3000003, 3000003, 2)
    assert stats.stats.speed == 1234.5 and stats.stats.eta is None
    skipped = parse_log_line(
        json.dumps(
            {
                "level": "warning",
                "msg": "Skipped copy as --dry-run is set",
                "object": "a.bin",
                "skipped": "copy",
                "size": 12,
            }
        )
    )
    assert (skipped.kind, skipped.action, skipped.object, skipped.size) == ("skipped", "copy", "a.bin", 12)
    error = parse_log_line('{"level":"error","msg":"directory not found","object":"Local file system at /x"}')
    assert error.kind == "error" and error.object.startswith("Local")
    fatal = parse_log_line("2026/11/26 01:35:50 Failed to copy: directory not found")
    assert (fatal.kind, fatal.message) == ("error", "Failed to copy: directory not found")
    assert parse_log_line("").kind == "other"


def test_exit_codes_decide_whether_a_retry_can_help() -> None:
    missing = RcloneOutcome(returncode=3, errors=["x: directory not found"] * 3)
    with pytest.raises(JobValidationError, match=r"directory not found"):
        raise_for_outcome(missing, "rclone copy")
    with pytest.raises(Exception, match="timeout") as info:
        raise_for_outcome(RcloneOutcome(returncode=5, errors=["timeout"]), "rclone copy")
    assert not isinstance(info.value, JobValidationError)
    raise_for_outcome(RcloneOutcome(returncode=0), "rclone copy")


def test_check_output_is_read_per_symbol() -> None:
    result = parse_combined("= a\n+ only-src\n- only-dst\n* changed file\n! unreadable\n= b\n", "hash")
    assert (result.matched, result.missing_on_destination, result.missing_on_source) == (
        2,
        ["only-src"],
        ["only-dst"],
    )
    assert (result.changed, result.errors, result.ok) == (["changed file"], ["unreadable"], False)
    assert parse_combined("= a\n", "download").summary() == "check (download): all 1 files match"


def test_endpoint_without_access_is_an_error() -> None:
    with pytest.raises(JobValidationError, match="no access configured"):
        rclone_endpoint(parse_location("s3://bkt/x", allow=ALL_KINDS), "jbsrc")
    assert rclone_endpoint(parse_location("/data", allow=ALL_KINDS), "jbsrc") == RcloneEndpoint(
        "/data", "/data"
    )


# --------------------------------------------------------------------------------------------------
# Hashing while copying


class Dribble(io.RawIOBase):
    """A reader that returns at most ``step`` bytes per call (like a socket)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def read(self, size: int = -1) -> bytes:
        piece = self.data[self.pos : self.pos + min(self.step, size if size >= 0 else self.step)]
        self.pos += len(piece)
        return piece


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
def test_copy_stream_hashes_exactly_what_it_writes(size: int) -> None:
    data = os.urandom(size)
    out = io.BytesIO()
    seen: list[int] = []
    digest, copied = copy_stream(io.BytesIO(data), out, seen.append)
    assert (digest, copied) == (hashlib.sha256(data).hexdigest(), size)
    assert out.getvalue() == data and sum(seen) == size


def test_sha256_pipe_matches_hashlib_for_small_pieces() -> None:
    data = os.urandom(200_000)
    pipe = Sha256Pipe()
    reader = Dribble(data, 777)
    while piece := reader.read(1 << 20):
        pipe.update(piece)
    assert pipe.hexdigest() == hashlib.sha256(data).hexdigest()
    pipe.close()  # idempotent


def test_s3_part_sizes_grow_so_that_5_tb_fit_in_10000_parts() -> None:
    assert (part_size(1), part_size(1000), part_size(1001)) == (16 << 20, 16 << 20, 32 << 20)
    assert sum(part_size(n) for n in range(1, 10_001)) > 5 * 10**12
    assert all(part_size(n) >= 5 << 20 for n in range(1, 10_001))


def test_manifest_text_round_trips_and_refuses_duplicates() -> None:
    lines = [("b/c.txt", "b" * 64), ("a.txt", "a" * 64), ("new\nline", "c" * 64)]
    text = manifest_text(lines)
    assert text.splitlines()[0] == f"{'a' * 64}  a.txt"
    assert parse_manifest_text(text, "m") == {rel: digest for rel, digest in lines}
    with pytest.raises(JobValidationError, match=r"line 2: 'a\.txt' is listed twice"):
        parse_manifest_text(f"{'a' * 64}  a.txt\n{'b' * 64}  a.txt\n", "m")


# --------------------------------------------------------------------------------------------------
# Local sources and sinks


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(1000))
    (tmp_path / "secret.txt").write_text("outside")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "sub" / "dir-escape").symlink_to(tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        yield root


def test_local_source_lists_files_and_skips_links_and_special_files(tree: Path) -> None:
    listing = LocalSource(tree).listing()
    assert [item.rel for item in listing.files] == ["a.txt", "sub/b.bin"]
    assert sorted(listing.skipped) == ["escape", "sock", "sub/dir-escape"]
    assert listing.bytes == 1005 and not listing.single
    single = LocalSource(tree / "a.txt").listing()
    assert single.single and [item.rel for item in single.files] == ["a.txt"]


def test_local_sink_publishes_all_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "store" / "ds"
    sink = LocalSink(final, merge=True)
    with sink.open("sub/one.txt") as out:
        out.write(b"one")
    with pytest.raises(RuntimeError), sink.open("two.txt") as out:
        out.write(b"half")
        raise RuntimeError("dropped")
    assert not final.exists()
    sink.abort()
    assert list((tmp_path / "store").iterdir()) == []

    sink = LocalSink(final, merge=True)
    with sink.open("sub/one.txt") as out:
        out.write(b"one")
    sink.commit()
    assert (final / "sub" / "one.txt").read_bytes() == b"one"
    again = LocalSink(final, merge=True)  # a second upload into the same dataset adds and replaces
    with again.open("sub/one.txt") as out:
        out.write(b"ONE")
    with again.open("two.txt") as out:
        out.write(b"two")
    again.commit()
    assert (final / "sub" / "one.txt").read_bytes() == b"ONE" and (final / "two.txt").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["ds"]
    with pytest.raises(JobValidationError, match="is not empty"):
        LocalSink(final, merge=False)


def test_local_sink_adopts_files_by_rename_only_at_commit(tmp_path: Path) -> None:
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"data")
    inode = staged.stat().st_ino
    sink = LocalSink(tmp_path / "store" / "ds", merge=True)
    assert sink.can_adopt(staged)
    sink.adopt("staged.bin", staged)
    sink.abort()
    assert staged.exists()  # an aborted upload leaves the staged file where it was
    sink = LocalSink(tmp_path / "store" / "ds", merge=True)
    sink.adopt("staged.bin", staged)
    sink.commit()
    assert not staged.exists() and (tmp_path / "store" / "ds" / "staged.bin").stat().st_ino == inode
