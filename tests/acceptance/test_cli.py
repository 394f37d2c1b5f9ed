"""Every CLI command end to end, as a user runs it: a real `jobbridge` process against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import free_port, pid_alive, wait_for

pytestmark = pytest.mark.usefixtures("prefect_api")

JOBBRIDGE = str(Path(sys.executable).with_name("jobbridge"))


def run_cli(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [JOBBRIDGE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def cli_json(*args: str, expect: int = 0) -> Any:
    done = run_cli(*args, "--json")
    assert done.returncode == expect, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def make_tree(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "d" / "x.txt").write_text("x" * 1000)
    (root / "y.bin").write_bytes(os.urandom(4096))
    return root


def test_submit_wait_status_list_logs(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data")
    archive = tmp_path / "data.tar.gz"
    job = cli_json(
        "submit",
        "compress",
        "--name",
        "cli pack",
        "--org",
        "cli-org",
        "--priority",
        "low",
        "--param",
        f"source={data}",
        "--param",
        f"destination={archive}",
        "--params-json",
        '{"format": "tar.gz"}',
        "--wait",
    )
    assert job["status"] == "COMPLETED" and job["priority"] == 3 and job["org"] == "cli-org"
    assert archive.exists() and job["result"]["files"] == 2

    shown = cli_json("status", job["id"])
    assert shown["id"] == job["id"] and shown["type"] == "compress"
    human = run_cli("status", job["id"])
    assert human.returncode == 0 and "COMPLETED" in human.stdout and "/runs/flow-run/" in human.stdout

    listed = cli_json("list", "--org", "cli-org", "--type", "compress", "--status", "COMPLETED")
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]

    lines = run_cli("logs", job["id"], "--json")
    assert lines.returncode == 0
    assert all(json.loads(line)["message"] is not None for line in lines.stdout.splitlines())


def test_submit_without_wait_prints_the_id(tmp_path: Path) -> None:
    done = run_cli("submit", "test-noop", "--param", "value=3")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 36
    final = run_cli("status", job_id, "--json")
    assert json.loads(final.stdout)["parameters"] == {"value": 3}


def test_submit_wait_exits_non_zero_when_the_job_fails(tmp_path: Path) -> None:
    done = run_cli("submit", "test-flaky", "--param", f"marker={tmp_path / 'absent'}", "--wait")
    assert done.returncode == 1
    job_id, status = done.stdout.split()[:2]
    assert status.startswith("FAILED")

    retried = cli_json("retry", job_id)
    assert retried["id"] == job_id


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("submit", "extract", "--param", "source=/nowhere"), "destination", "required"
    )
    assert_one_line_error(run_cli("submit", "teleport"), "unknown job type 'teleport'", "extract")
    assert_one_line_error(run_cli("submit", "extract", "--priority", "urgent"), "priority")
    assert_one_line_error(run_cli("submit", "extract", "--param", "novalue"), "KEY=VALUE")
    assert_one_line_error(run_cli("submit", "extract", "--params-json", "{oops"), "--params-json")
    assert_one_line_error(run_cli("status", "not-a-job"), "not a job id")
    assert_one_line_error(run_cli("list", "--status", "DONE"), "status 'DONE'")
    unreachable = {"PREFECT_API_URL": "http://127.0.0.1:1/api"}
    assert_one_line_error(run_cli("list", env=unreachable), "does not answer", "jobbridge stack up")


def test_extract_of_an_unsafe_archive_fails_the_job_and_says_why(tmp_path: Path) -> None:
    import tarfile

    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("owned")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../escaped.txt")
    done = run_cli(
        "submit",
        "extract",
        "--param",
        f"source={evil}",
        "--param",
        f"destination={tmp_path / 'out'}",
        "--wait",
        "--json",
    )
    assert done.returncode == 1
    job = json.loads(done.stdout)
    assert job["status"] == "FAILED" and "escaped.txt" in job["error"]
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_cancel_from_the_cli(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    submitted = cli_json("submit", "test-sleep", "--param", "seconds=300", "--param", f"pid_file={pid_file}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and cli_json("status", submitted["id"])["status"] != "RUNNING":
        time.sleep(0.2)
    cancelled = cli_json("cancel", submitted["id"], "--wait", "--timeout", "30")
    assert cancelled["status"] == "CANCELLED"


def test_settings_types_and_stack_status() -> None:
    done = run_cli("settings", "--json", env={"AWS_SECRET_ACCESS_KEY": "hunter2"})
    assert done.returncode == 0
    settings = json.loads(done.stdout)
    assert settings["aws_secret_access_key"] == "**********" and "hunter2" not in done.stdout

    types = {t["type"] for t in cli_json("types")}
    assert {"extract", "compress", "validate"} <= types

    services = {s["name"]: s for s in cli_json("stack", "status")}
    assert set(services) == {"prefect", "moto", "mongo", "worker", "mirror"}
    assert all(s["healthy"] for s in services.values())
    assert services["prefect"]["url"].startswith("http://127.0.0.1:")


def test_demo_runs_the_pipeline_through_the_pool(tmp_path: Path) -> None:
    jobs = cli_json("demo", "--workdir", str(tmp_path / "demo"))
    assert [j["type"] for j in jobs] == ["validate", "compress", "extract", "validate"]
    assert all(j["status"] == "COMPLETED" for j in jobs), jobs


def test_relative_paths_mean_the_submitters_directory(tmp_path: Path) -> None:
    make_tree(tmp_path / "work")
    done = run_cli(
        "submit", "compress", "--param", "source=work", "--param", "destination=work.tar.zst",
        "--wait", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["parameters"]["source"] == str(tmp_path / "work")
    assert (tmp_path / "work.tar.zst").exists()


def test_stack_up_status_down_from_the_cli(tmp_path: Path) -> None:
    env = {
        "JOBBRIDGE_HOME": str(tmp_path / "stack"),
        "JOBBRIDGE_PREFECT_PORT": str(free_port()),
        "JOBBRIDGE_MOTO_PORT": str(free_port()),
        "JOBBRIDGE_MONGO_PORT": str(free_port()),
        "PREFECT_API_URL": "",
    }
    up = run_cli("stack", "up", "--json", env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert {s["name"] for s in json.loads(up.stdout) if s["healthy"]} == {
            "prefect",
            "moto",
            "mongo",
            "worker",
            "mirror",
        }
        again = run_cli("stack", "up", "--json", env=env)
        assert [s["pid"] for s in json.loads(again.stdout)] == [s["pid"] for s in json.loads(up.stdout)]
        status = run_cli("stack", "status", env=env)
        assert status.returncode == 0 and "healthy" in status.stdout
    finally:
        down = run_cli("stack", "down", "--json", env=env)
    assert down.returncode == 0, down.stderr
    assert set(json.loads(down.stdout)["stopped"]) == {"prefect", "moto", "mongo", "worker", "mirror"}
    pids = [s["pid"] for s in json.loads(up.stdout)]
    wait_for("every stack process to be gone", lambda: not any(pid_alive(p) for p in pids), 10)
    stopped = run_cli("stack", "status", "--json", env=env)
    assert stopped.returncode == 1 and not any(s["running"] for s in json.loads(stopped.stdout))


def test_worker_start_serves_a_pool_and_drains_on_sigint(tmp_path: Path) -> None:
    import signal

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPoolStatus

    from jobbridge.deployments import ensure_work_pool
    from jobbridge.settings import reload_settings

    pool = f"cli-{tmp_path.name[-10:]}"
    ensure_work_pool(reload_settings().model_copy(update={"work_pool": pool}))
    worker = subprocess.Popen(
        [JOBBRIDGE, "worker", "start", "--pool", pool, "--name", pool],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("wb"),
        stdin=subprocess.DEVNULL,
    )
    try:

        def online() -> bool:
            with get_client(sync_client=True) as client:
                return client.read_work_pool(pool).status == WorkPoolStatus.READY

        wait_for(f"pool {pool} to have an online worker", online, 60, interval=0.25)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(30) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
