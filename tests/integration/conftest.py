"""Fixtures shared by the integration tests (the session's stack itself lives in tests/conftest.py)."""

from tests.support.stores import dynamodb_client, mongo_client

__all__ = ["dynamodb_client", "mongo_client"]
