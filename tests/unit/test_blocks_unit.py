"""The mirror blocks without servers: fields, settings equivalence, clients' options, names, secrets.

Building a target makes a boto3 client or a MongoClient but sends nothing (pymongo connects in the
background; every MongoClient made here is closed), so these tests need no store.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.blocks.system import Secret
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_aws import AwsCredentials
from prefect_aws.client_parameters import AwsClientParameters
from pydantic import ValidationError

from jobbridge.blocks import (
    DynamoDBMirror,
    MirrorConfigError,
    MongoDBMirror,
    build_targets,
    load_mirror_blocks,
    mirror_blocks_from_settings,
)
from jobbridge.errors import PrefectUnavailableError
from jobbridge.mirror.dynamodb import DynamoDBJobStore
from jobbridge.mirror.mongodb import MongoJobStore
from jobbridge.mirror.target import MirrorTarget
from jobbridge.settings import DEFAULT_MIRROR_LAYOUTS, ProcessingMode, Settings
from tests.support.helpers import free_port

PASSWORD = "hunter2-Pa55"
SECRET_URL = f"mongodb://jb:{PASSWORD}@127.0.0.1:1/?authSource=admin"
NO_MONGO = "mongodb://127.0.0.1:1/"


@pytest.fixture
def close_clients() -> Iterator[list[MirrorTarget]]:
    """Targets a test built; their MongoClients are closed afterwards (their monitor threads stop)."""
    built: list[MirrorTarget] = []
    yield built
    for target in built:
        database = getattr(target, "database", None)
        if database is not None:
            database.client.close()


def settings(**fields: Any) -> Settings:
    """Settings that ignore the environment's AWS keys and mirror settings."""
    values: dict[str, Any] = {
        "moto_port": 4599,
        "mongodb_url": NO_MONGO,
        "mirror_blocks": [],
        "aws_access_key_id": None,
        "aws_secret_access_key": None,
        "aws_endpoint_url": None,
        "aws_region": "us-east-1",
        "mirror_layouts": DEFAULT_MIRROR_LAYOUTS,
    }
    values.update(fields)
    return Settings(**values)


def test_block_types_have_stable_slugs_descriptions_and_documented_fields() -> None:
    for block, slug in ((DynamoDBMirror, "dynamodb-mirror"), (MongoDBMirror, "mongodb-mirror")):
        assert block.get_block_type_slug() == slug
        assert block._logo_url is None and block._description
        properties = block.model_json_schema()["properties"]
        assert all(prop.get("description") for prop in properties.values()), slug
    schema = MongoDBMirror._to_block_schema()
    assert set(schema.fields["secret_fields"]) == {"url", "url_secret.value"}  # obfuscated by the API
    # A plain Secret reference, so the UI offers the user's existing Secret blocks.
    assert schema.fields["block_schema_references"]["url_secret"]["block_type_slug"] == "secret"
    references = DynamoDBMirror._to_block_schema().fields["block_schema_references"]
    assert references["aws_credentials"]["block_type_slug"] == "aws-credentials"


def test_settings_give_jobbridge_layout_per_enabled_store_and_one_block_per_legacy_layout() -> None:
    blocks = mirror_blocks_from_settings(settings(mode=ProcessingMode.TEST, test_prefix="ci_"))
    described = [(type(block).__name__, block.layout) for block in blocks]
    assert described == [
        ("DynamoDBMirror", "jobbridge"),
        ("MongoDBMirror", "jobbridge"),
        ("MongoDBMirror", "scientistcloud"),
        ("DynamoDBMirror", "receipt_trainer"),
        ("DynamoDBMirror", "delphi"),
        ("DynamoDBMirror", "argoitny"),
    ]
    dynamo, mongo = blocks[0], blocks[1]
    assert isinstance(dynamo, DynamoDBMirror) and isinstance(mongo, MongoDBMirror)
    assert (dynamo.endpoint_url, dynamo.region_name) == ("http://127.0.0.1:4599", "us-east-1")
    assert dynamo.table_name == "ci_jobbridge_jobs"
    assert (mongo.database, mongo.collection, mongo.events_collection) == (
        "jobbridge",
        "ci_jobs",
        "ci_job_events",
    )
    assert mongo.url is None and mongo.url_secret is None  # the URL stays in the settings

    only_mongo = mirror_blocks_from_settings(
        settings(mirror_dynamodb=False, mirror_layouts={"delphi": []}, aws_endpoint_url="")
    )
    assert [(type(block).__name__, block.layout) for block in only_mongo] == [
        ("MongoDBMirror", "jobbridge"),
        ("DynamoDBMirror", "delphi"),
    ]
    delphi = only_mongo[1]
    assert isinstance(delphi, DynamoDBMirror) and delphi.endpoint_url is None  # "" means AWS itself
    assert mirror_blocks_from_settings(settings(mirror_mongodb=False, mirror_layouts={})) == [
        DynamoDBMirror(
            endpoint_url="http://127.0.0.1:4599", region_name="us-east-1", table_name="jobbridge_jobs"
        )
    ]


def test_load_mirror_blocks_without_names_needs_no_prefect_api() -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: unreachable}):
        assert load_mirror_blocks(settings()) == mirror_blocks_from_settings(settings())


def test_named_blocks_with_prefect_down_fail_fast_and_say_so() -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: unreachable}), pytest.raises(PrefectUnavailableError) as caught:
        load_mirror_blocks(settings(mirror_blocks=["somewhere"]))
    assert time.monotonic() - started < 10
    assert "Prefect API" in str(caught.value)


def test_dynamodb_clients_fail_fast_and_use_emulator_keys_only_without_credentials() -> None:
    target = DynamoDBMirror(endpoint_url="http://127.0.0.1:4599", table_name="t").target(settings())
    assert isinstance(target, DynamoDBJobStore) and target.table_name == "t"
    client: Any = target.client
    config = client.meta.config
    # max_attempts=2 retries: 3 attempts in all, then the mirror service's outbox takes over.
    assert (config.connect_timeout, config.read_timeout, config.retries["total_max_attempts"]) == (2, 5, 3)
    assert client.meta.endpoint_url == "http://127.0.0.1:4599"
    assert client._request_signer._credentials.access_key == "testing"

    keyed = settings(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key="s3cr3t", aws_region="eu-west-1")
    client = DynamoDBMirror(endpoint_url="http://127.0.0.1:4599").target(keyed).client  # type: ignore[attr-defined]
    assert client._request_signer._credentials.access_key == "AKIAEXAMPLE"
    assert client.meta.region_name == "eu-west-1"


def test_credentials_block_supplies_session_region_and_client_parameters() -> None:
    credentials = AwsCredentials(
        aws_access_key_id="AKIACREDBLOCK",
        aws_secret_access_key="from-block",
        region_name="ap-south-1",
        aws_client_parameters=AwsClientParameters(
            endpoint_url="http://127.0.0.1:4577", config={"read_timeout": 9}
        ),
    )
    client: Any = DynamoDBMirror(aws_credentials=credentials).target(settings()).client  # type: ignore[attr-defined]
    assert client._request_signer._credentials.access_key == "AKIACREDBLOCK"
    assert (client.meta.region_name, client.meta.endpoint_url) == ("ap-south-1", "http://127.0.0.1:4577")
    assert (client.meta.config.read_timeout, client.meta.config.connect_timeout) == (9, 2)  # theirs win

    mine = DynamoDBMirror(
        aws_credentials=credentials, endpoint_url="http://127.0.0.1:4588", region_name="eu-north-1"
    )
    client = mine.target(settings()).client  # type: ignore[attr-defined]
    assert (client.meta.region_name, client.meta.endpoint_url) == ("eu-north-1", "http://127.0.0.1:4588")


def test_mongo_target_uses_short_timeouts_and_layout_default_collections(
    close_clients: list[MirrorTarget],
) -> None:
    target = MongoDBMirror(url=SECRET_URL, database="db1", collection="mine").target(settings())
    close_clients.append(target)
    assert isinstance(target, MongoJobStore)
    assert (target.database.name, target.jobs_name, target.events_name) == ("db1", "mine", "mine_events")
    options = target.database.client.options
    assert options.server_selection_timeout == 2 and options.pool_options.connect_timeout == 2
    assert options.pool_options.socket_timeout == 5

    own_timeout = MongoDBMirror(url_secret=Secret(value=NO_MONGO + "?serverSelectionTimeoutMS=700"))
    defaults = own_timeout.target(settings(mirror_database="mirror", mode="TEST", test_prefix="ci_"))
    close_clients.append(defaults)
    assert isinstance(defaults, MongoJobStore)
    assert defaults.database.client.options.server_selection_timeout == 0.7  # the URL's own value wins
    assert (defaults.database.name, defaults.jobs_name, defaults.events_name) == (
        "mirror",
        "ci_jobs",
        "ci_job_events",
    )


def test_targets_in_one_layout_get_unique_names_and_duplicates_are_refused(
    close_clients: list[MirrorTarget],
) -> None:
    endpoint = "http://127.0.0.1:4599"
    blocks = [
        DynamoDBMirror(endpoint_url=endpoint, table_name="first"),
        DynamoDBMirror(endpoint_url=endpoint, table_name="second"),
        MongoDBMirror(database="a", collection="jobs"),
        MongoDBMirror(database="b", collection="jobs"),
    ]
    targets = build_targets(blocks, settings())
    close_clients.extend(targets)
    assert [target.name for target in targets] == [
        "dynamodb:jobbridge@first",
        "dynamodb:jobbridge@second",
        "mongodb:jobbridge@a.jobs",
        "mongodb:jobbridge@b.jobs",
    ]
    assert DynamoDBJobStore.name == "dynamodb:jobbridge"  # renamed instances, not the class
    # Targets on one store share one client (one connection pool).
    assert targets[0].client is targets[1].client  # type: ignore[attr-defined]
    assert targets[2].database.client is targets[3].database.client  # type: ignore[attr-defined]

    alone = build_targets([DynamoDBMirror(endpoint_url=endpoint), MongoDBMirror()], settings())
    close_clients.extend(alone)
    assert [target.name for target in alone] == ["dynamodb:jobbridge", "mongodb:jobbridge"]

    with pytest.raises(
        MirrorConfigError,
        match=r"blocks #1 and #2 both write the jobbridge layout to table jobbridge_jobs at http://127",
    ):
        build_targets(
            [DynamoDBMirror(endpoint_url=endpoint), DynamoDBMirror(endpoint_url=endpoint)], settings()
        )
    same_place = [MongoDBMirror(url=NO_MONGO, database="d"), MongoDBMirror(url_secret=Secret(value=NO_MONGO))]
    with pytest.raises(MirrorConfigError, match=r"#1 and #2 both write their layouts to collection d\.jobs"):
        build_targets(same_place, settings(mirror_database="d"))


def test_fields_are_checked_by_name() -> None:
    with pytest.raises(ValidationError, match=r"unknown field.*tabel_name.*accepts endpoint_url"):
        DynamoDBMirror(tabel_name="x")
    with pytest.raises(ValidationError, match="layout"):
        DynamoDBMirror(layout="scientistcloud")
    with pytest.raises(ValidationError, match="events_collection belongs to the jobbridge layout"):
        MongoDBMirror(layout="scientistcloud", events_collection="e")
    with pytest.raises(ValidationError, match="datasets_collection belongs to the scientistcloud layout"):
        MongoDBMirror(datasets_collection="d")
    with pytest.raises(MirrorConfigError, match="url_secret must hold the MongoDB URL as a string"):
        MongoDBMirror(url_secret=Secret(value={"url": "x"})).resolved_url()


def test_the_mongo_url_never_shows_in_repr_dumps_or_errors() -> None:
    by_url = MongoDBMirror(url=SECRET_URL)
    by_secret = MongoDBMirror(url_secret=Secret(value=SECRET_URL))
    for block in (by_url, by_secret):
        shown = [repr(block), str(block), block.model_dump_json(), str(block.model_dump())]
        assert all(PASSWORD not in text for text in shown), shown
        assert block.resolved_url() == SECRET_URL

    with pytest.raises(ValidationError) as both:
        MongoDBMirror(url=SECRET_URL, url_secret=Secret(value=SECRET_URL))
    assert "not both" in str(both.value) and PASSWORD not in str(both.value) + repr(both.value)
    with pytest.raises(ValidationError) as typo:
        MongoDBMirror(uri=SECRET_URL)
    assert "uri" in str(typo.value) and PASSWORD not in str(typo.value)

    bad_port = f"mongodb://jb:{PASSWORD}@127.0.0.1:notaport/?authSource=admin"
    with pytest.raises(MirrorConfigError) as unusable:
        MongoDBMirror(url=bad_port).target(settings())
    text = "".join(traceback.format_exception(unusable.value))
    assert "mongodb://***@127.0.0.1:notaport/" in text and "port" in text.lower()
    assert PASSWORD not in text and "jb:" not in text and "authSource" not in text


def test_a_legacy_dynamodb_block_builds_the_legacy_target_in_the_settings_namespace() -> None:
    legacy = pytest.importorskip("jobbridge.mirror.legacy_dynamodb")
    test_mode = settings(mode=ProcessingMode.TEST, test_prefix="ci_")
    target = DynamoDBMirror(endpoint_url="http://127.0.0.1:4599", layout="delphi").target(test_mode)
    assert isinstance(target, legacy.LegacyDynamoDBTarget)
    assert (target.name, target.layout, target.table_name) == (
        "dynamodb:delphi",
        "delphi",
        "ci_Delphi_JobQueue",
    )
    named = DynamoDBMirror(endpoint_url="http://127.0.0.1:4599", layout="argoitny", table_name="mine")
    assert named.target(test_mode).table_name == "mine"  # type: ignore[attr-defined]


def test_scientistcloud_gets_its_own_database_and_may_not_share_a_collection(
    close_clients: list[MirrorTarget],
) -> None:
    legacy = pytest.importorskip("jobbridge.mirror.legacy_mongodb")
    test_mode = settings(mode=ProcessingMode.TEST, test_prefix="ci_")
    scientistcloud = [b for b in mirror_blocks_from_settings(test_mode) if b.layout == "scientistcloud"]
    targets = build_targets(scientistcloud, test_mode)
    close_clients.extend(targets)
    (target,) = targets
    assert isinstance(target, legacy.ScientistCloudTarget) and target.name == "mongodb:scientistcloud"
    assert (target.database.name, target.jobs_name, target.datasets_name) == (
        "scientistcloud",
        "ci_jobs",
        "ci_visstoredatas",
    )
    # Both layouts' default jobs collection is "jobs": one database for both would mix their documents.
    shared = [MongoDBMirror(database="one"), MongoDBMirror(database="one", layout="scientistcloud")]
    with pytest.raises(MirrorConfigError, match=r"both write their layouts to collection one\.jobs"):
        build_targets(shared, settings())
