"""What the routes share: the app's settings and upload store, and running blocking work off the loop."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Request

from jobbridge.api.staging import UploadStore
from jobbridge.settings import Settings

T = TypeVar("T")


def get_store(request: Request) -> UploadStore:
    """The upload store the app serves."""
    store: UploadStore = request.app.state.store
    return store


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call (Prefect client, SQLite, file system) in a worker thread."""
    return await anyio.to_thread.run_sync(partial(call, *args, **kwargs))
