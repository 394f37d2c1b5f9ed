"""Store clients for integration tests: the stack's moto_server and nx-27017, and write-counting wrappers.

The wrappers count write *requests* (not items), which is what "at most one write per store, per layout,
per transition" is about; everything else is forwarded untouched to the real client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from pymongo import MongoClient

DYNAMO_WRITES = {"put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item"}
MONGO_WRITES = {
    "insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one",
    "delete_many", "find_one_and_update", "find_one_and_replace", "bulk_write",
}  # fmt: skip


class CountingDynamo:
    """A boto3 client wrapper that counts write requests and forwards everything else."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        if name in DYNAMO_WRITES:
            self.writes += 1
        return getattr(self._client, name)


class _CountingProxy:
    def __init__(self, target: Any, counter: list[int]) -> None:
        self._target, self._counter = target, counter

    def __getattr__(self, name: str) -> Any:
        if name in MONGO_WRITES:
            self._counter[0] += 1
        return getattr(self._target, name)


class CountingDatabase:
    """A pymongo Database wrapper counting write calls made on its collections and its client."""

    def __init__(self, database: Any) -> None:
        self._database = database
        self._counter = [0]
        self.name = database.name
        self.client = _CountingProxy(database.client, self._counter)

    def __getitem__(self, name: str) -> _CountingProxy:
        return _CountingProxy(self._database[name], self._counter)

    @property
    def writes(self) -> int:
        return self._counter[0]


@pytest.fixture(scope="module")
def dynamodb_client(stack: object) -> Any:
    """A boto3 DynamoDB client on the stack's moto_server."""
    return boto3.client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{os.environ['JOBBRIDGE_MOTO_PORT']}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def mongo_client(stack: object) -> Iterator[MongoClient[dict[str, Any]]]:
    """A pymongo client on the stack's nx-27017."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://127.0.0.1:{os.environ['JOBBRIDGE_MONGO_PORT']}", serverSelectionTimeoutMS=10_000
    )
    yield client
    client.close()
