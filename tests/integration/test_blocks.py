"""The mirror blocks against the session's real Prefect server, moto_server and nx-27017.

Registration goes through the real ``prefect block register`` command; saved blocks are loaded by name the
way the mirror service loads them (``mirror_blocks`` in the settings); each target then writes a real
transition that is read back from the store. Every test uses its own block names, tables and collections.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_aws import AwsCredentials
from pymongo.errors import PyMongoError

from jobbridge.blocks import (
    DynamoDBMirror,
    MirrorConfigError,
    MongoDBMirror,
    load_mirror_blocks,
    mirror_blocks_from_settings,
    mirror_targets,
)
from jobbridge.jobs import Job
from jobbridge.mirror.dynamodb import DynamoDBJobStore
from jobbridge.mirror.mongodb import MongoJobStore
from jobbridge.mirror.target import MirrorTarget
from jobbridge.mirror.transition import Transition
from jobbridge.settings import DEFAULT_MIRROR_LAYOUTS, ProcessingMode, Settings

PREFECT = Path(sys.executable).with_name("prefect")
DATABASE = "jobbridge_block_tests"


def moto_url() -> str:
    return f"http://127.0.0.1:{os.environ['JOBBRIDGE_MOTO_PORT']}"


def mongo_url() -> str:
    return f"mongodb://127.0.0.1:{os.environ['JOBBRIDGE_MONGO_PORT']}/"


@pytest.fixture
def suffix() -> str:
    """Block, table and collection names of this test only."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def built() -> Iterator[list[MirrorTarget]]:
    """Targets a test built; their MongoClients are closed afterwards."""
    targets: list[MirrorTarget] = []
    yield targets
    for target in targets:
        database = getattr(target, "database", None)
        if database is not None:
            database.client.close()


def a_transition() -> Transition:
    job = Job(name="block test", type="sync", org="acme", status="RUNNING", progress=42.5)
    return Transition.of(job, datetime.now(UTC))


def read_back(target: MirrorTarget, job: Job) -> Job | None:
    if isinstance(target, DynamoDBJobStore):
        return target.get(job.type, job.id)
    assert isinstance(target, MongoJobStore)
    return target.get(job.id)


def test_prefect_block_register_creates_both_block_types(prefect_api: str) -> None:
    """The command, not an earlier save, creates the types: they are deleted first (with any documents)."""
    with get_client(sync_client=True) as client:
        for slug in ("dynamodb-mirror", "mongodb-mirror"):
            with contextlib.suppress(ObjectNotFound):  # start from nothing: the command must create them
                client.delete_block_type(client.read_block_type_by_slug(slug).id)

    result = subprocess.run(
        [str(PREFECT), "block", "register", "-m", "jobbridge.blocks"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successfully registered 2 blocks" in result.stdout  # ours only, not prefect-aws's or Secret

    with get_client(sync_client=True) as client:
        for slug, name in (("dynamodb-mirror", "DynamoDB Mirror"), ("mongodb-mirror", "MongoDB Mirror")):
            block_type = client.read_block_type_by_slug(slug)
            assert block_type.name == name and block_type.description
            schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
            assert schema is not None and "layout" in schema.fields["properties"]
        schema = client.get_most_recent_block_schema_for_block_type(
            client.read_block_type_by_slug("mongodb-mirror").id
        )
        assert schema is not None and "url" in schema.fields["secret_fields"]


def test_saved_blocks_load_by_name_and_mirror_a_transition(
    prefect_api: str, suffix: str, built: list[MirrorTarget]
) -> None:
    AwsCredentials(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).save(f"aws-{suffix}")
    Secret(value=mongo_url()).save(f"mongo-url-{suffix}")
    credentials = AwsCredentials.load(f"aws-{suffix}")
    for letter in "ab":
        DynamoDBMirror(
            endpoint_url=moto_url(), table_name=f"t{suffix}_{letter}", aws_credentials=credentials
        ).save(f"dyn-{letter}-{suffix}")
    MongoDBMirror(
        url_secret=Secret.load(f"mongo-url-{suffix}"), database=DATABASE, collection=f"t{suffix}_jobs"
    ).save(f"mongo-{suffix}")

    settings = Settings(
        mirror_blocks=[f"dyn-a-{suffix}", f"dynamodb-mirror/dyn-b-{suffix}", f"mongodb-mirror/mongo-{suffix}"]
    )
    blocks = load_mirror_blocks(settings)
    assert [type(block) for block in blocks] == [DynamoDBMirror, DynamoDBMirror, MongoDBMirror]
    dynamo, mongo = blocks[0], blocks[2]
    assert isinstance(dynamo, DynamoDBMirror) and isinstance(mongo, MongoDBMirror)
    assert dynamo.aws_credentials is not None and dynamo.aws_credentials.aws_access_key_id == "testing"
    assert mongo.url_secret is not None and mongo.resolved_url() == mongo_url()

    targets = mirror_targets(settings)
    built.extend(targets)
    assert [target.name for target in targets] == [
        f"dynamodb:jobbridge@dyn-a-{suffix}",
        f"dynamodb:jobbridge@dyn-b-{suffix}",
        "mongodb:jobbridge",
    ]
    transition = a_transition()
    for target in targets:
        target.ensure()
        assert target.apply(transition) is True
        assert target.apply(transition) is False  # a duplicate writes nothing
        assert read_back(target, transition.job) == transition.job
    first = targets[0]
    assert isinstance(first, DynamoDBJobStore) and first.table_name == f"t{suffix}_a"
    last = targets[2]
    assert isinstance(last, MongoJobStore) and last.database.name == DATABASE

    # The saved URL is a secret field: the API does not hand it out without include_secrets.
    with get_client(sync_client=True) as client:
        secret_doc = client.read_block_document_by_name(
            f"mongo-url-{suffix}", "secret", include_secrets=False
        )
    assert mongo_url() not in str(secret_doc.data)


def test_settings_alone_build_the_expected_targets(
    stack: object, suffix: str, built: list[MirrorTarget]
) -> None:
    settings = Settings(
        mode=ProcessingMode.TEST,
        test_prefix=f"b{suffix}_",
        mirror_database=DATABASE,
        mirror_layouts={},
        mirror_blocks=[],
    )
    targets = mirror_targets(settings)
    built.extend(targets)
    assert [target.name for target in targets] == ["dynamodb:jobbridge", "mongodb:jobbridge"]
    dynamo, mongo = targets
    assert isinstance(dynamo, DynamoDBJobStore) and dynamo.table_name == f"b{suffix}_jobbridge_jobs"
    assert isinstance(mongo, MongoJobStore) and mongo.jobs_name == f"b{suffix}_jobs"
    transition = a_transition()
    for target in targets:
        target.ensure()
        assert target.apply(transition) is True
        assert read_back(target, transition.job) == transition.job

    only_mongo = mirror_targets(settings.model_copy(update={"mirror_dynamodb": False}))
    built.extend(only_mongo)
    assert [target.name for target in only_mongo] == ["mongodb:jobbridge"]


def test_settings_with_legacy_layouts_build_one_target_per_layout(
    stack: object, built: list[MirrorTarget]
) -> None:
    pytest.importorskip("jobbridge.mirror.legacy_dynamodb")
    pytest.importorskip("jobbridge.mirror.legacy_mongodb")
    settings = Settings(
        mode=ProcessingMode.TEST,
        test_prefix="legacy_",
        mirror_blocks=[],
        mirror_database=DATABASE,
        mirror_layouts=DEFAULT_MIRROR_LAYOUTS,
    )
    targets = mirror_targets(settings)
    built.extend(targets)
    assert sorted((target.name, target.layout) for target in targets) == [
        ("dynamodb:argoitny", "argoitny"),
        ("dynamodb:delphi", "delphi"),
        ("dynamodb:jobbridge", "jobbridge"),
        ("dynamodb:receipt_trainer", "receipt_trainer"),
        ("mongodb:jobbridge", "jobbridge"),
        ("mongodb:scientistcloud", "scientistcloud"),
    ]
    assert len(mirror_blocks_from_settings(settings)) == len(targets)
    for target in targets:  # each client reaches its real store: tables in moto, indexes in nx-27017
        target.ensure()
    tables = {target.layout: getattr(target, "table_name", None) for target in targets}
    assert tables["delphi"] == "legacy_Delphi_JobQueue"  # the settings' namespace, not the process's


def test_a_missing_or_ambiguous_block_name_is_a_clear_error(prefect_api: str, suffix: str) -> None:
    MongoDBMirror(database=DATABASE).save(f"same-{suffix}")
    DynamoDBMirror(endpoint_url=moto_url()).save(f"same-{suffix}")

    with pytest.raises(MirrorConfigError) as missing:
        load_mirror_blocks(Settings(mirror_blocks=[f"mongodb-mirror/same-{suffix}", f"gone-{suffix}"]))
    message = str(missing.value)
    assert f"'gone-{suffix}'" in message and "not saved in Prefect" in message
    assert f"dynamodb-mirror/same-{suffix}" in message and f"mongodb-mirror/same-{suffix}" in message
    with pytest.raises(
        MirrorConfigError, match=f"'same-{suffix}' exists as dynamodb-mirror and mongodb-mirror"
    ):
        load_mirror_blocks(Settings(mirror_blocks=[f"same-{suffix}"]))
    with pytest.raises(
        MirrorConfigError, match="unknown block type 'secret'; use dynamodb-mirror or mongodb-mirror"
    ):
        load_mirror_blocks(Settings(mirror_blocks=[f"secret/same-{suffix}"]))

    (loaded,) = load_mirror_blocks(Settings(mirror_blocks=f"mongodb-mirror/same-{suffix}"))
    assert isinstance(loaded, MongoDBMirror) and loaded.database == DATABASE


def test_the_mongo_url_secret_stays_hidden_and_a_dead_server_fails_fast(
    prefect_api: str, suffix: str, built: list[MirrorTarget]
) -> None:
    password = f"pw-{suffix}"
    with socket.socket() as silent:  # accepts connections, never answers: a hung MongoDB
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"mongodb://jobbridge:{password}@127.0.0.1:{port}/?authSource=admin"
        Secret(value=url).save(f"hung-url-{suffix}")
        MongoDBMirror(url_secret=Secret.load(f"hung-url-{suffix}"), database=DATABASE).save(f"hung-{suffix}")
        (block,) = load_mirror_blocks(Settings(mirror_blocks=[f"hung-{suffix}"]))
        assert all(password not in text for text in (repr(block), str(block), block.model_dump_json()))

        (target,) = mirror_targets(Settings(mirror_blocks=[f"hung-{suffix}"]))
        built.append(target)
        started = time.monotonic()
        with pytest.raises(PyMongoError) as failure:
            target.ensure()
        elapsed = time.monotonic() - started
    assert elapsed < 8, f"a hung MongoDB held the mirror for {elapsed:.1f} s"
    text = "".join(traceback.format_exception(failure.value))
    assert str(port) in text and password not in text  # says which server, never the password
