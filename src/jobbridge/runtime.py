"""Which Prefect API a jobbridge call talks to, and whether a worker is there to run jobs.

Order: ``JOBBRIDGE_PREFECT_API_URL`` / ``PREFECT_API_URL`` when set; else the embedded stack's server when it
is up; else Prefect's own default (an ephemeral local API, in which jobs run in-process).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import WorkPoolStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from jobbridge.errors import PrefectUnavailableError
from jobbridge.settings import Settings, get_settings


def resolve_api_url(settings: Settings | None = None) -> str | None:
    """The Prefect API URL jobbridge should use, or None for Prefect's default."""
    settings = settings or get_settings()
    if settings.prefect_api_url:
        return settings.prefect_api_url.rstrip("/")
    from jobbridge.stack import running_api_url

    url: str | None = running_api_url(settings)
    return url


_overridden: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}


@contextmanager
def settings_override(updates: Mapping[Any, Any]) -> Iterator[None]:
    """Like Prefect's ``temporary_settings``, but the derived settings are built once and reused.

    Building a Prefect ``Settings`` object costs about 0.1 s; jobbridge overrides the same few settings
    on every call, so the result is cached per base settings object and update.
    """
    import prefect.context

    context = prefect.context.get_settings_context()
    key = (id(context.settings), tuple(sorted((s.name, repr(v)) for s, v in updates.items())))
    cached = _overridden.get(key)
    if cached is None or cached[0] is not context.settings:
        cached = (context.settings, context.settings.copy_with_update(updates=updates))
        _overridden[key] = cached
    with prefect.context.SettingsContext(profile=context.profile, settings=cached[1]):
        yield


@contextmanager
def prefect_api(settings: Settings | None = None, api_url: str | None = None) -> Iterator[str | None]:
    """Run the body against the resolved Prefect API (``api_url`` wins when given)."""
    url = api_url or resolve_api_url(settings)
    current = PREFECT_API_URL.value()
    if url is None or (current and current.rstrip("/") == url):
        yield url or current
        return
    with settings_override({PREFECT_API_URL: url}):
        yield url


_pool_cache: dict[tuple[str, str], tuple[float, bool]] = {}
_POOL_CACHE_SECONDS = 5.0


def pool_is_online(client: SyncPrefectClient, pool: str) -> bool:
    """True when ``pool`` exists and a worker is polling it (cached for a few seconds)."""
    key = (str(client.api_url), pool)
    cached = _pool_cache.get(key)
    now = time.monotonic()
    if cached and now - cached[0] < _POOL_CACHE_SECONDS:
        return cached[1]
    try:
        online = client.read_work_pool(pool).status == WorkPoolStatus.READY
    except ObjectNotFound:
        online = False
    _pool_cache[key] = (now, online)
    return online


_clients: dict[tuple[str, int], SyncPrefectClient] = {}
_clients_lock = threading.Lock()


def _shared_client() -> SyncPrefectClient:
    """One open client per API URL and thread, kept for the life of the process.

    A new Prefect client costs about 25 ms (it builds an SSL context and a connection pool); a CLI
    command or a service makes several calls, so they share one.
    """
    key = (str(PREFECT_API_URL.value()), threading.get_ident())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = get_client(sync_client=True)
            client.__enter__()
            _clients[key] = client
            if len(_clients) == 1:
                atexit.register(_close_clients)
        return client


def _close_clients() -> None:
    with _clients_lock:
        for client in _clients.values():
            with suppress(Exception):
                client.__exit__(None, None, None)
        _clients.clear()


@contextmanager
def prefect_client(settings: Settings | None = None) -> Iterator[SyncPrefectClient]:
    """A sync Prefect client on the resolved API; an unreachable API becomes one clear error.

    No health check up front (it would cost a round trip per call): the first real request tells.
    """
    with prefect_api(settings) as url:
        client = _shared_client()
        try:
            yield client
        except httpx.TransportError as exc:
            raise PrefectUnavailableError(
                f"the Prefect API at {url or client.api_url} does not answer ({type(exc).__name__}); "
                "start the embedded stack with `jobbridge stack up` or set PREFECT_API_URL"
            ) from None
