"""The extract, compress and validate flows, run in-process against the session's real Prefect server."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from jobbridge.errors import JobValidationError
from jobbridge.flows.compress import compress
from jobbridge.flows.extract import extract
from jobbridge.flows.validate import validate
from jobbridge.registry import get_spec

# --------------------------------------------------------------------------------------------------
# Helpers


def make_tree(root: Path) -> Path:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(2 * (1 << 20) + 3))
    (root / "sub" / "deep" / "c.csv").write_text("x,y\n" * 5000)
    return root


def flow_run_id(state: State[Any]) -> UUID:
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id


def artifacts(state: State[Any], kind: str) -> list[Any]:
    """The flow run's artifacts of type ``kind`` ('result' or 'progress'), as stored by the server."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id(state)]),
                type=ArtifactFilterType(any_=[kind]),
            )
        )


def task_runs(state: State[Any]) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)]))
        )


def assert_completed_with_artifacts(state: State[Any]) -> dict[str, Any]:
    """The run completed, its result artifact holds the returned dict, its progress reached 100."""
    assert state.is_completed(), state.message
    result = state.result()
    assert isinstance(result, dict)
    (recorded,) = artifacts(state, "result")
    assert recorded.data == result
    (progress,) = artifacts(state, "progress")
    assert progress.data == 100
    return result


def failure_message(state: State[Any]) -> str:
    assert state.is_failed(), f"expected FAILED, got {state.type}: {state.message}"
    return state.message or ""


# --------------------------------------------------------------------------------------------------
# Registration and parameters (no server needed)


@pytest.mark.parametrize(
    ("legacy", "name"),
    [("file_extraction", "extract"), ("data_compression", "compress"), ("data_validation", "validate")],
)
def test_job_types_are_registered_under_their_scientistcloud_names(legacy: str, name: str) -> None:
    spec = get_spec(legacy)
    assert spec.name == name
    assert spec.entrypoint == f"jobbridge.flows.{name}:{name}"


def test_parameters_are_checked_at_submission_with_the_field_named(tmp_path: Path) -> None:
    spec = get_spec("extract")
    with pytest.raises(JobValidationError, match="parameter 'source' must be an existing file"):
        spec.validate_parameters({"source": str(tmp_path / "missing.zip"), "destination": "x"})
    (tmp_path / "a.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(JobValidationError, match=r"parameter 'destination' .* is not empty"):
        spec.validate_parameters({"source": str(tmp_path / "a.zip"), "destination": str(tmp_path / "full")})
    with pytest.raises(JobValidationError, match="parameter 'bogus' is not a parameter"):
        spec.validate_parameters({"source": str(tmp_path / "a.zip"), "destination": "y", "bogus": 1})


def test_compress_parameters_check_level_and_destination(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    spec = get_spec("compress")
    with pytest.raises(JobValidationError, match=r"parameter 'level' .*1\.\.9"):
        spec.validate_parameters(
            {"source": str(source), "destination": str(tmp_path / "a.tgz"), "format": "tar.gz", "level": 19}
        )
    with pytest.raises(JobValidationError, match=r"parameter 'destination' .*inside the source"):
        spec.validate_parameters({"source": str(source), "destination": str(source / "x.tar.zst")})
    with pytest.raises(JobValidationError, match="parameter 'format'"):
        spec.validate_parameters({"source": str(source), "destination": "a.7z", "format": "7z"})


def test_validate_parameters_depend_on_the_mode(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    spec = get_spec("validate")
    with pytest.raises(JobValidationError, match="parameter 'manifest' must be an existing file"):
        spec.validate_parameters({"path": str(source), "manifest": str(tmp_path / "none.sha256")})
    (tmp_path / "m.sha256").write_text("")
    existing = {"path": str(source), "manifest": str(tmp_path / "m.sha256"), "create": True}
    with pytest.raises(JobValidationError, match=r"parameter 'manifest' .*overwrite=true"):
        spec.validate_parameters(existing)
    with pytest.raises(JobValidationError, match="parameter 'path' must be an existing directory"):
        spec.validate_parameters({"path": str(tmp_path / "m.sha256"), "manifest": "m"})


# --------------------------------------------------------------------------------------------------
# The flows against the real server


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_compress_extract_validate_round_trip(tmp_path: Path, fmt: str) -> None:
    source = make_tree(tmp_path / "src")
    archive = tmp_path / f"data.{fmt}"

    packed = assert_completed_with_artifacts(
        compress(source=source, destination=archive, format=fmt, return_state=True)
    )
    assert packed["files"] == 3
    assert packed["archive_bytes"] == archive.stat().st_size
    assert packed["manifest"] == f"{archive}.sha256"

    unpacked = assert_completed_with_artifacts(
        extract(source=str(archive), destination=str(tmp_path / "dest"), return_state=True)
    )
    assert unpacked == {
        "destination": str(tmp_path / "dest"),
        "format": fmt,
        "members": 5,  # 3 files, 2 directories
        "bytes": packed["bytes"],
    }
    subprocess.run(["sha256sum", "-c", "--quiet", packed["manifest"]], cwd=tmp_path / "dest", check=True)

    checked = assert_completed_with_artifacts(
        validate(path=tmp_path / "dest", manifest=Path(packed["manifest"]), return_state=True)
    )
    assert checked["ok"] is True
    assert checked["files"] == 3
    assert (checked["missing"], checked["extra"], checked["changed"]) == ([], [], [])


@pytest.mark.usefixtures("prefect_api")
def test_flows_return_their_result_when_called_directly(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    manifest = tmp_path / "src.sha256"
    created = validate(path=source, manifest=manifest, create=True)
    assert created == {
        "mode": "create",
        "path": str(source),
        "manifest": str(manifest),
        "files": 3,
        "bytes": sum(p.stat().st_size for p in source.rglob("*") if p.is_file()),
        "ok": True,
    }
    assert validate(path=source, manifest=manifest)["ok"] is True


@pytest.mark.usefixtures("prefect_api")
def test_validate_fails_on_differences_after_recording_them(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    manifest = source / "MANIFEST.sha256"
    validate(path=source, manifest=manifest, create=True)
    (source / "a.txt").write_text("changed\n")
    (source / "sub" / "deep" / "c.csv").unlink()
    (source / "extra.txt").write_text("extra")

    state = validate(path=source, manifest=manifest, return_state=True)
    message = failure_message(state)
    assert "3 files differ from the manifest: 1 missing, 1 extra, 1 changed" in message
    (recorded,) = artifacts(state, "result")
    assert recorded.data["ok"] is False
    assert recorded.data["missing"] == ["sub/deep/c.csv"]
    assert recorded.data["extra"] == ["extra.txt"]  # the manifest itself is not extra
    assert recorded.data["changed"] == ["a.txt"]
    assert "3 files differ" in recorded.description
    (check,) = task_runs(state)
    assert check.state is not None and check.state.is_completed()
    assert check.run_count == 1  # differences are not retried


@pytest.mark.usefixtures("prefect_api")
def test_unsafe_archive_fails_the_job_without_retries_or_output(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("ok.txt", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"x\n"))
    source = tmp_path / "evil.tar"
    source.write_bytes(buffer.getvalue())
    destination = tmp_path / "out" / "dest"
    destination.parent.mkdir()

    state = extract(source=source, destination=destination, return_state=True)
    message = failure_message(state)
    assert "member '../evil.txt'" in message
    assert list(destination.parent.iterdir()) == []  # no output, no staging dir
    assert not (tmp_path / "out" / "evil.txt").exists()
    unpack = [run for run in task_runs(state) if run.name.startswith("unpack-archive")]
    assert len(unpack) == 1
    assert unpack[0].run_count == 1  # a user error is not retried
    assert source.read_bytes() == buffer.getvalue()


@pytest.mark.usefixtures("prefect_api")
def test_bad_parameters_fail_before_any_task_runs(tmp_path: Path) -> None:
    state = extract(source=tmp_path / "missing.tar.zst", destination=tmp_path / "dest", return_state=True)
    assert "parameter 'source' must be an existing file" in failure_message(state)
    assert task_runs(state) == []


@pytest.mark.usefixtures("prefect_api")
def test_archive_limits_fail_the_job(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    archive = tmp_path / "a.tar.zst"
    compress(source=source, destination=archive)
    state = extract(source=archive, destination=tmp_path / "dest", max_total_bytes=1 << 20, return_state=True)
    assert "max_total_bytes" in failure_message(state)
    assert not (tmp_path / "dest").exists()


@pytest.mark.usefixtures("prefect_api")
def test_compress_refuses_to_overwrite(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    archive = tmp_path / "a.tar.zst"
    archive.write_bytes(b"precious")
    state = compress(source=source, destination=archive, return_state=True)
    assert "overwrite=true" in failure_message(state)
    assert archive.read_bytes() == b"precious"
    replaced = compress(source=source, destination=archive, overwrite=True)
    assert replaced["files"] == 3
