"""The embedded stack as ``jobbridge stack up|down|status`` runs it: real processes on loopback ports.

These tests use stacks of their own (own home, own free ports), never the session stack of conftest.
Full starts are few because each Prefect server start costs about 10 s on two cores: one module-wide
stack for up/up/status/down, and one start that fails half-way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from pymongo import MongoClient

from jobbridge.errors import StackError
from jobbridge.settings import Settings
from jobbridge.stack import ServiceStatus, Stack, running_api_url
from tests.support.helpers import free_port

pytestmark = pytest.mark.slow

FLOWS_FILE = Path(__file__).with_name("worker_flows.py")


def stack_settings(home: Path) -> Settings:
    """Settings of a private stack: conftest's JOBBRIDGE_* variables point at the session stack."""
    prefect_port = free_port()
    return Settings(
        home=home,
        prefect_port=prefect_port,
        moto_port=free_port(),
        mongo_port=free_port(),
        prefect_api_url=f"http://127.0.0.1:{prefect_port}/api",
        work_pool="local",
    )


def live_processes_of(home: Path) -> list[int]:
    """Pids of live processes started for the stack at ``home`` (all inherit JOBBRIDGE_HOME=home)."""
    marker = f"JOBBRIDGE_HOME={home.resolve()}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2]
        if state not in "ZXx" and marker in environ.split(b"\0"):
            found.append(int(entry))
    return found


def family(pid: int) -> set[int]:
    """``pid``, its process group and all its descendants, as they are right now."""
    procs: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            procs[int(entry)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp
    members = {pid} | {p for p, (_, pgrp) in procs.items() if pgrp == pid}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in procs.items():
            if ppid == parent and child not in members:
                members.add(child)
                todo.append(child)
    return members


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZXx"


def start_sleepy_run(stack: Stack, workdir: Path) -> int:
    """Deploy ``worker_flows:sleepy`` to the stack's pool, run it, and return the pid running it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    code = workdir / "code"
    code.mkdir(parents=True)
    shutil.copy(FLOWS_FILE, code / FLOWS_FILE.name)
    marker = workdir / "sleepy.pid"
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name("sleepy"),
            name="stack-test-sleepy",
            entrypoint="worker_flows:sleepy",
            work_pool_name=stack.settings.work_pool,
            path=str(code),
        )
        client.create_flow_run_from_deployment(deployment, parameters={"seconds": 600, "marker": str(marker)})
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert time.monotonic() < deadline, "the worker did not start the flow run within 90 s"
        time.sleep(0.1)
    return int(marker.read_text())


def by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {status.name: status for status in statuses}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[ServiceStatus]]]:
    """One private stack for the module, with the statuses its first ``up`` returned."""
    stack = Stack(stack_settings(tmp_path_factory.mktemp("stack")))
    try:
        first = stack.up()
        yield stack, first
    finally:
        stack.down()


def test_up_starts_every_service_healthy(started: tuple[Stack, list[ServiceStatus]]) -> None:
    _, first = started
    assert [status.name for status in first] == list(Stack.SERVICES)
    for status in first:
        assert status.running and status.healthy, status
        assert status.pid is not None and is_alive(status.pid), status
        assert status.detail.startswith("started in"), status


def test_second_up_starts_nothing(started: tuple[Stack, list[ServiceStatus]]) -> None:
    stack, first = started
    again = stack.up()
    assert [(s.name, s.pid) for s in again] == [(s.name, s.pid) for s in first]
    assert all(s.healthy and s.detail == "already running" for s in again), again


def test_status_reports_urls_health_and_logs(started: tuple[Stack, list[ServiceStatus]]) -> None:
    stack, first = started
    statuses = by_name(stack.status())
    port = stack.settings.prefect_port
    assert stack.urls() == {
        "prefect": f"http://127.0.0.1:{port}",
        "moto": f"http://127.0.0.1:{stack.settings.moto_port}",
        "mongo": f"mongodb://127.0.0.1:{stack.settings.mongo_port}/",
        "worker": f"http://127.0.0.1:{port}/work-pools/work-pool/local",
        "mirror": "jobbridge mirror status",
    }
    for name, status in statuses.items():
        assert status.url == stack.urls()[name]
        assert (status.running, status.healthy, status.pid) == (True, True, by_name(first)[name].pid)
        assert (stack.state_dir / "logs" / f"{name}.log").stat().st_size > 0
    assert stack.api_url == f"http://127.0.0.1:{port}/api"
    assert running_api_url(stack.settings) == stack.api_url
    assert httpx.get(f"{stack.urls()['prefect']}/", timeout=5).status_code == 200  # the UI


def test_worker_is_online_in_the_pool(started: tuple[Stack, list[ServiceStatus]]) -> None:
    stack, _ = started
    response = httpx.post(f"{stack.api_url}/work_pools/local/workers/filter", json={}, timeout=5)
    response.raise_for_status()
    assert "ONLINE" in [worker["status"] for worker in response.json()]


def test_moto_answers_boto3(started: tuple[Stack, list[ServiceStatus]]) -> None:
    stack, _ = started
    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=stack.urls()["moto"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    table = f"stack-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.put_item(TableName=table, Item={"pk": {"S": "JOB#1"}, "status": {"S": "RUNNING"}})
    item = dynamodb.get_item(TableName=table, Key={"pk": {"S": "JOB#1"}})["Item"]
    assert item["status"] == {"S": "RUNNING"}
    assert table in dynamodb.list_tables()["TableNames"]


def test_mongo_answers_pymongo(started: tuple[Stack, list[ServiceStatus]]) -> None:
    stack, _ = started
    client: MongoClient[dict[str, Any]] = MongoClient(stack.urls()["mongo"], serverSelectionTimeoutMS=5000)
    try:
        jobs = client["jobbridge_stack_test"][f"jobs_{uuid.uuid4().hex[:8]}"]
        document = {"_id": "job-1", "status": "submitted", "priority": 2}
        jobs.insert_one(dict(document))
        assert jobs.find_one({"status": "submitted"}) == document
    finally:
        client.close()


def test_down_leaves_no_process_behind(started: tuple[Stack, list[ServiceStatus]], tmp_path: Path) -> None:
    """Runs last in this module: it stops the module's stack, with a flow run in progress."""
    stack, first = started
    flow_run_pid = start_sleepy_run(stack, tmp_path)
    live = live_processes_of(stack.state_dir)
    before = set().union(*(family(s.pid) for s in first if s.pid is not None))
    assert before >= {s.pid for s in first}
    assert flow_run_pid in family(by_name(first)["worker"].pid or 0)
    assert [pid for pid in live if pid not in before and is_alive(pid)] == []  # nothing escaped

    assert stack.down() == list(reversed(Stack.SERVICES))

    assert [pid for pid in before if is_alive(pid)] == []
    assert live_processes_of(stack.state_dir) == []
    assert [s.running for s in stack.status()] == [False] * len(Stack.SERVICES)
    assert running_api_url(stack.settings) is None
    assert stack.down() == []  # idempotent
    for port in (stack.settings.prefect_port, stack.settings.moto_port, stack.settings.mongo_port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # free again


def test_port_in_use_is_a_clear_error_and_starts_nothing(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path / "home")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.prefect_port))
        squatter.listen()
        with pytest.raises(StackError) as caught:
            Stack(settings).up()
    message = str(caught.value)
    assert "prefect" in message
    assert str(settings.prefect_port) in message
    assert "JOBBRIDGE_PREFECT_PORT" in message
    assert live_processes_of(settings.state_dir) == []
    assert [s.running for s in Stack(settings).status()] == [False] * len(Stack.SERVICES)


def test_failed_start_stops_what_that_up_started(tmp_path: Path) -> None:
    """mongo cannot open its database, so the prefect and moto servers started before it are stopped."""
    settings = stack_settings(tmp_path / "home")
    database = settings.state_dir / "mongo" / "jobbridge.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"this is not an SQLite database " * 100)

    with pytest.raises(StackError) as caught:
        Stack(settings).up()

    message = str(caught.value)
    assert message.startswith("mongo (pid ")
    assert "file is not a database" in message  # the tail of logs/mongo.log
    assert live_processes_of(settings.state_dir) == []
    state = json.loads((settings.state_dir / "stack.json").read_text())
    assert state["services"] == {}
    assert running_api_url(settings) is None
