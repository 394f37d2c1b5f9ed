"""Prefect Blocks that describe the status mirror's targets: one block = one store in one layout.

Why blocks: where the mirror writes is configured in the Prefect UI (or with ``Block.save``), with the
credentials in Prefect's own ``AwsCredentials`` and ``Secret`` blocks rather than in each host's environment.
Without saved blocks the same targets follow from the settings, so nothing needs the UI:
:func:`mirror_blocks_from_settings` builds the equivalent unsaved blocks and :func:`mirror_targets` turns
either kind into :class:`~jobbridge.mirror.target.MirrorTarget` objects for the mirror service.

Clients fail fast (2 s to connect, few retries): the mirror service keeps every change in its outbox and
retries on its own, so a store that is down must not hang the service.

Target names are unique, since the service keys its outbox by them. A target keeps its plain name
(``dynamodb:jobbridge``) when that is unique, so moving from settings to saved blocks keeps the outbox;
same-named targets in different places get ``@<saved block name>`` (unsaved: ``@<table>`` or
``@<database.collection>``). Two blocks writing one layout to one DynamoDB table, or anything to one Mongo
collection, are an error.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

import httpx
from prefect.blocks.core import Block
from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials
from pydantic import ConfigDict, Field, SecretStr, model_validator

from jobbridge.errors import JobbridgeError, PrefectUnavailableError
from jobbridge.mirror.target import JOBBRIDGE_LAYOUT, LEGACY_LAYOUTS, MirrorTarget
from jobbridge.settings import Settings, get_settings

if TYPE_CHECKING:
    from pymongo import MongoClient

__all__ = [
    "DynamoDBMirror",
    "MirrorBlock",
    "MirrorConfigError",
    "MongoDBMirror",
    "build_targets",
    "load_mirror_blocks",
    "mirror_blocks_from_settings",
    "mirror_targets",
]

DynamoDBLayout = Literal["jobbridge", "receipt_trainer", "delphi", "argoitny"]
MongoDBLayout = Literal["jobbridge", "scientistcloud"]

#: botocore client options: fail within seconds, and leave retrying to the mirror service's outbox.
BOTO_TIMEOUTS: Mapping[str, Any] = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 2}}
#: pymongo client options, for the same reason; a URL that sets one of them keeps its own value.
MONGO_TIMEOUTS: Mapping[str, int] = {
    "serverSelectionTimeoutMS": 2000,
    "connectTimeoutMS": 2000,
    "socketTimeoutMS": 5000,
}
_PREFECT_KEYS = frozenset({"block_type_slug"})  # what Prefect adds to block data besides the fields
_EMULATOR_KEY = "testing"  # moto and DynamoDB Local accept any key (boto3 will not sign without one)
_Clients = dict[Hashable, Any]  # clients per store, so that targets on one store share a connection pool


class MirrorConfigError(JobbridgeError):
    """The mirror's blocks or settings do not describe a usable set of targets."""

    exit_code = 2


def _reject_unknown(cls: type[Block], values: Any) -> Any:
    """Refuse misspelt fields: Prefect blocks accept extra keys silently, which would drop a setting."""
    if isinstance(values, dict):
        unknown = sorted(
            key
            for key in values
            if key not in cls.model_fields and key not in _PREFECT_KEYS and not str(key).startswith("_")
        )
        if unknown:
            accepted = ", ".join(cls.model_fields)
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; {cls.__name__} accepts {accepted}")
    return values


class DynamoDBMirror(Block):
    """Where the mirror writes in DynamoDB: endpoint, region, table and layout, with optional credentials."""

    # Validation errors never echo their input: a nested AwsCredentials may hold a secret key.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "DynamoDB Mirror"
    _block_type_slug = "dynamodb-mirror"
    _description = "A DynamoDB table the jobbridge status mirror writes job transitions to, in one layout."

    endpoint_url: str | None = Field(
        default=None,
        description="DynamoDB endpoint (e.g. http://127.0.0.1:4566 for moto); empty for AWS itself.",
    )
    region_name: str | None = Field(
        default=None,
        description="AWS region; empty for the credentials block's region, else JOBBRIDGE_AWS_REGION.",
    )
    table_name: str | None = Field(
        default=None,
        description="Table to write; empty for the layout's default (jobbridge_jobs, Delphi_JobQueue, ...).",
    )
    layout: DynamoDBLayout = Field(
        default="jobbridge",
        description="Item layout: jobbridge's own, or the legacy system whose readers use this table.",
    )
    aws_credentials: AwsCredentials | None = Field(
        default=None,
        description="prefect-aws credentials; empty for the JOBBRIDGE_AWS_*/AWS_* environment credentials.",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, values: Any) -> Any:
        return _reject_unknown(cls, values)

    def target(self, settings: Settings | None = None) -> MirrorTarget:
        """The mirror target this block describes, with its own fail-fast boto3 client."""
        return self._target(settings or get_settings(), {})

    def _target(self, settings: Settings, clients: _Clients) -> MirrorTarget:
        client = self._client(settings, clients)
        if self.layout == JOBBRIDGE_LAYOUT:
            from jobbridge.mirror.dynamodb import DynamoDBJobStore, default_table_name

            return DynamoDBJobStore(client, self.table_name or default_table_name(settings))
        from jobbridge.mirror import legacy_dynamodb  # lazily: only a legacy layout needs its codec

        table = self.table_name or legacy_dynamodb.default_table_name(self.layout, settings)
        legacy: MirrorTarget = legacy_dynamodb.LegacyDynamoDBTarget(self.layout, client, table)
        return legacy

    def _client(self, settings: Settings, clients: _Clients) -> Any:
        """A boto3 DynamoDB client: credentials block session, or settings/environment credentials.

        The block's endpoint and region win over the credentials block's client parameters; its botocore
        ``config`` wins over our timeouts (whoever set it meant it).
        """
        from botocore.config import Config

        credentials = self.aws_credentials
        region = self.region_name or (credentials.region_name if credentials else None) or settings.aws_region
        key: tuple[Hashable, ...] = ("dynamodb", self.endpoint_url, region, credentials)
        if credentials is None:
            secret = settings.aws_secret_access_key
            key += (settings.aws_access_key_id, secret.get_secret_value() if secret else None)
        if key in clients:
            return clients[key]
        config = Config(**BOTO_TIMEOUTS)
        if credentials is not None:
            session = credentials.get_boto3_session()
            params = credentials.aws_client_parameters.get_params_override()
            if "config" in params:
                config = config.merge(params.pop("config"))
            endpoint = self.endpoint_url or params.pop("endpoint_url", None)
            params.pop("endpoint_url", None)
        else:
            import boto3

            session = boto3.session.Session(**_settings_credentials(settings, self.endpoint_url))
            params, endpoint = {}, self.endpoint_url
        clients[key] = session.client(
            "dynamodb", region_name=region, endpoint_url=endpoint, config=config, **params
        )
        return clients[key]

    def _site(self, target: MirrorTarget, settings: Settings) -> tuple[tuple[Hashable, ...], str, str]:
        """(key, short label, place): equal keys mean two targets writing the same rows."""
        table = str(getattr(target, "table_name", self.table_name))
        meta = getattr(getattr(target, "client", None), "meta", None)  # where the client really points
        endpoint, region = getattr(meta, "endpoint_url", None), getattr(meta, "region_name", None)
        key = ("dynamodb", endpoint, region, table, self.layout)
        return key, table, f"table {table} at {endpoint}"


class MongoDBMirror(Block):
    """Where the mirror writes in MongoDB: server URL (kept secret), database, collection and layout."""

    # Validation errors never echo their input, which holds the URL and perhaps its password.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name = "MongoDB Mirror"
    _block_type_slug = "mongodb-mirror"
    _description = "A MongoDB database the jobbridge status mirror writes job transitions to, in one layout."

    url: SecretStr | None = Field(
        default=None,
        description="MongoDB URL (may hold a password, so it is secret); or use url_secret; neither: "
        "JOBBRIDGE_MONGODB_URL, else the embedded server.",
    )
    # Unparameterised on purpose: ``Secret[str]`` would be a block type of its own ("secret-str"), and the
    # UI would not offer the user's existing Secret blocks for this field.
    url_secret: Secret | None = Field(  # type: ignore[type-arg]
        default=None, description="A Secret block holding the MongoDB URL, instead of url."
    )
    database: str | None = Field(
        default=None,
        description="Database; empty for JOBBRIDGE_MIRROR_DATABASE (jobbridge layout) or scientistcloud.",
    )
    collection: str | None = Field(
        default=None, description="Jobs collection; empty for the layout's default (jobs)."
    )
    events_collection: str | None = Field(
        default=None,
        description="jobbridge layout only: history collection; empty for <collection>_events, or "
        "job_events when collection is empty too.",
    )
    datasets_collection: str | None = Field(
        default=None,
        description="scientistcloud layout only: dataset status collection; empty for visstoredatas.",
    )
    layout: MongoDBLayout = Field(
        default="jobbridge", description="Document layout: jobbridge's own, or ScientistCloud's."
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, values: Any) -> Any:
        return _reject_unknown(cls, values)

    @model_validator(mode="after")
    def _consistent(self) -> MongoDBMirror:
        """One URL source at most, and only the collections the layout has."""
        if self.url is not None and self.url_secret is not None:
            raise ValueError("give the MongoDB URL as url or as url_secret, not both")
        if self.events_collection and self.layout != JOBBRIDGE_LAYOUT:
            raise ValueError("events_collection belongs to the jobbridge layout; leave it empty")
        if self.datasets_collection and self.layout != "scientistcloud":
            raise ValueError("datasets_collection belongs to the scientistcloud layout; leave it empty")
        return self

    def target(self, settings: Settings | None = None) -> MirrorTarget:
        """The mirror target this block describes, with its own fail-fast MongoClient."""
        return self._target(settings or get_settings(), {})

    def _target(self, settings: Settings, clients: _Clients) -> MirrorTarget:
        database = self._client(settings, clients)[self.resolved_database(settings)]
        if self.layout == JOBBRIDGE_LAYOUT:
            from jobbridge.mirror.mongodb import MongoJobStore, default_collection_names

            jobs, events = default_collection_names(settings)
            if self.collection:
                jobs, events = self.collection, f"{self.collection}_events"
            return MongoJobStore(database, jobs, self.events_collection or events)
        from jobbridge.mirror import legacy_mongodb  # lazily: only a legacy layout needs its codec

        jobs, datasets = legacy_mongodb.default_collection_names(settings)
        legacy: MirrorTarget = legacy_mongodb.ScientistCloudTarget(
            database, self.collection or jobs, self.datasets_collection or datasets
        )
        return legacy

    def resolved_database(self, settings: Settings) -> str:
        """The database: the block's, else the settings' mirror database or ScientistCloud's own."""
        if self.database:
            return self.database
        return (
            settings.mirror_database
            if self.layout == JOBBRIDGE_LAYOUT
            else settings.mirror_scientistcloud_database
        )

    def resolved_url(self, settings: Settings | None = None) -> str:
        """The URL to connect to: url, else url_secret's value, else the settings' (never log it)."""
        if self.url is not None and self.url.get_secret_value():
            return self.url.get_secret_value()
        if self.url_secret is not None:
            value = self.url_secret.get()
            if not isinstance(value, str) or not value:
                raise MirrorConfigError("MongoDBMirror url_secret must hold the MongoDB URL as a string")
            return value
        return (settings or get_settings()).mongodb_uri

    def _client(self, settings: Settings, clients: _Clients) -> MongoClient[dict[str, Any]]:
        """A MongoClient with short timeouts; construction errors come back with the secrets scrubbed."""
        from pymongo import MongoClient

        url = self.resolved_url(settings)
        key = ("mongodb", url)
        if key not in clients:
            given = {name.lower() for name in _query_keys(url)}
            options: dict[str, Any] = {
                name: value for name, value in MONGO_TIMEOUTS.items() if name.lower() not in given
            }
            try:
                clients[key] = MongoClient(url, **options)
            except Exception as error:
                message = scrub(str(error), url)
                raise MirrorConfigError(f"MongoDB URL {redact_url(url)} is not usable: {message}") from None
        client: MongoClient[dict[str, Any]] = clients[key]
        return client

    def _site(self, target: MirrorTarget, settings: Settings) -> tuple[tuple[Hashable, ...], str, str]:
        """(key, short label, place); the key holds the URL in memory only, it is never shown."""
        database = getattr(target, "database", None)
        short = f"{getattr(database, 'name', self.database)}.{getattr(target, 'jobs_name', self.collection)}"
        return ("mongodb", self.resolved_url(settings), short), short, f"collection {short}"


MirrorBlock = DynamoDBMirror | MongoDBMirror
_BLOCK_TYPES: dict[str, type[DynamoDBMirror] | type[MongoDBMirror]] = {
    DynamoDBMirror.get_block_type_slug(): DynamoDBMirror,
    MongoDBMirror.get_block_type_slug(): MongoDBMirror,
}


def _settings_credentials(settings: Settings, endpoint: str | None) -> dict[str, Any]:
    """boto3 session arguments from the settings; emulator keys for an endpoint without credentials."""
    secret = settings.aws_secret_access_key
    if settings.aws_access_key_id and secret is not None:
        return {
            "aws_access_key_id": settings.aws_access_key_id,
            "aws_secret_access_key": secret.get_secret_value(),
        }
    if endpoint and not os.environ.get("AWS_PROFILE"):  # a profile counts as configured credentials
        return {"aws_access_key_id": _EMULATOR_KEY, "aws_secret_access_key": _EMULATOR_KEY}
    return {}


def _query_keys(url: str) -> list[str]:
    query = urlsplit(url).query
    return [part.split("=", 1)[0] for part in query.split("&") if part]


def redact_url(url: str) -> str:
    """``scheme://***@hosts/``: enough to tell which server, without user, password, path or options."""
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{hosts}/"


def scrub(text: str, url: str) -> str:
    """``text`` with the URL, its user info, password and options replaced by ``***``."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
    secrets = {url, userinfo, password, unquote(password), parts.query, unquote(parts.query)}
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mirror_blocks_from_settings(settings: Settings | None = None) -> list[MirrorBlock]:
    """Unsaved blocks equivalent to the settings: what the mirror writes when no blocks are named.

    jobbridge's layout goes to each store that ``mirror_dynamodb``/``mirror_mongodb`` enables; each legacy
    layout that is a key of ``mirror_layouts`` (even with no job types: tagged jobs still go there) gets
    one block in the store :data:`~jobbridge.mirror.target.LEGACY_LAYOUTS` assigns it (scientistcloud in
    its own database). Names follow the mode's namespace; the Mongo URL stays in the settings.
    """
    from jobbridge.mirror.dynamodb import default_table_name
    from jobbridge.mirror.mongodb import default_collection_names

    chosen = settings or get_settings()
    endpoint, region = chosen.dynamodb_endpoint, chosen.aws_region
    blocks: list[MirrorBlock] = []
    if chosen.mirror_dynamodb:
        blocks.append(
            DynamoDBMirror(endpoint_url=endpoint, region_name=region, table_name=default_table_name(chosen))
        )
    if chosen.mirror_mongodb:
        jobs, events = default_collection_names(chosen)
        blocks.append(
            MongoDBMirror(database=chosen.mirror_database, collection=jobs, events_collection=events)
        )
    for layout, store in LEGACY_LAYOUTS.items():
        if layout not in chosen.mirror_layouts:
            continue
        if store == "dynamodb":
            blocks.append(DynamoDBMirror(endpoint_url=endpoint, region_name=region, layout=layout))
        else:
            blocks.append(MongoDBMirror(database=chosen.mirror_scientistcloud_database, layout=layout))
    return blocks


def load_mirror_blocks(settings: Settings | None = None) -> list[MirrorBlock]:
    """The saved blocks that ``mirror_blocks`` names, or the settings' blocks when it names none.

    A name is ``name`` (looked up as both block types; it must be one of them only) or
    ``dynamodb-mirror/name`` / ``mongodb-mirror/name``. A missing name is an error that lists what exists.
    """
    chosen = settings or get_settings()
    if not chosen.mirror_blocks:
        return mirror_blocks_from_settings(chosen)
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            saved = {slug: _saved_names(client, slug) for slug in _BLOCK_TYPES}
            return [_load_one(reference, saved) for reference in chosen.mirror_blocks]
    except (OSError, httpx.HTTPError) as error:
        raise PrefectUnavailableError(
            f"cannot load the mirror blocks from the Prefect API: {error}"
        ) from None


def _saved_names(client: Any, slug: str) -> list[str]:
    """Saved (named) documents of a block type; none when the type is not registered."""
    from prefect.exceptions import ObjectNotFound

    try:
        documents = client.read_block_documents_by_type(slug, include_secrets=False)
    except ObjectNotFound:
        return []
    return sorted(doc.name for doc in documents if doc.name and not doc.is_anonymous)


def _load_one(reference: str, saved: Mapping[str, list[str]]) -> MirrorBlock:
    slug, _, name = reference.rpartition("/")
    if slug and slug not in _BLOCK_TYPES:
        raise MirrorConfigError(
            f"mirror block {reference!r}: unknown block type {slug!r}; use {' or '.join(_BLOCK_TYPES)}"
        )
    found = [s for s in ([slug] if slug else _BLOCK_TYPES) if name in saved[s]]
    if not found:
        existing = ", ".join(f"{s}/{n}" for s, names in saved.items() for n in names) or "none"
        raise MirrorConfigError(
            f"mirror block {reference!r} (JOBBRIDGE_MIRROR_BLOCKS) is not saved in Prefect; saved mirror "
            f"blocks: {existing}. Save it first, or fix the name."
        )
    if len(found) > 1:
        raise MirrorConfigError(
            f"mirror block {name!r} exists as {' and '.join(found)}; name it as {found[0]}/{name} or "
            f"{found[1]}/{name}"
        )
    # ``_sync``: load synchronously even when called from a thread that runs an event loop.
    block_type: Any = _BLOCK_TYPES[found[0]]
    loaded: MirrorBlock = block_type.load(name, _sync=True)
    return loaded


def build_targets(blocks: list[MirrorBlock], settings: Settings | None = None) -> list[MirrorTarget]:
    """Targets for ``blocks`` with unique names (see the module docstring); clients shared per store."""
    chosen = settings or get_settings()
    clients: _Clients = {}
    try:
        return _unique(blocks, [block._target(chosen, clients) for block in blocks], chosen)
    except BaseException:
        for client in clients.values():  # MongoClients run monitor threads until closed
            client.close()
        raise


def _unique(blocks: list[MirrorBlock], targets: list[MirrorTarget], settings: Settings) -> list[MirrorTarget]:
    """Refuse two targets writing the same place; tell apart same-named targets by block or place."""
    built = list(zip(blocks, targets, strict=True))
    sites = [block._site(target, settings) for block, target in built]
    first_at: dict[tuple[Hashable, ...], int] = {}
    for index, (key, _, place) in enumerate(sites):
        first = first_at.setdefault(key, index)
        if first != index:
            what = f"the {blocks[index].layout} layout" if key[0] == "dynamodb" else "their layouts"
            raise MirrorConfigError(
                f"mirror blocks {_who(blocks[first], first)} and {_who(blocks[index], index)} both write "
                f"{what} to {place}: remove one, or give one another table or collection"
            )
    counts = Counter(target.name for _, target in built)
    for (block, target), (_, short, _) in zip(built, sites, strict=True):
        if counts[target.name] > 1:
            target.name = f"{target.name}@{block._block_document_name or short}"  # this instance only
    names = Counter(target.name for _, target in built)
    clashes = sorted(name for name, count in names.items() if count > 1)
    if clashes:
        raise MirrorConfigError(
            f"mirror targets {', '.join(clashes)} are not unique: save the blocks under distinct names"
        )
    return [target for _, target in built]


def mirror_targets(settings: Settings | None = None) -> list[MirrorTarget]:
    """The mirror service's targets: from the saved blocks ``mirror_blocks`` names, else from settings."""
    chosen = settings or get_settings()
    return build_targets(load_mirror_blocks(chosen), chosen)


def _who(block: MirrorBlock, index: int) -> str:
    """A block as a user finds it: its saved name, else its place in the list."""
    name = block._block_document_name
    return repr(name) if name else f"#{index + 1}"
