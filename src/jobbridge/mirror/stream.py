"""Reading Prefect's flow-run events: catch up through the REST API, then follow the websocket.

Why both: the websocket replays at most the last minutes after a (re)connect, and only through a private
attribute; anything older is read from ``POST /api/events/filter`` (50 a page, then ``next_page``). The
mirror service therefore catches up from its durable cursor over REST first, then follows live; the live
stream's own one-minute backfill covers the moment between the two, and duplicates are dropped by the
outbox.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx

from jobbridge.jobs import as_utc
from jobbridge.mirror.events import EVENT_PREFIX

__all__ = ["catch_up", "follow"]

log = logging.getLogger("jobbridge.mirror")

PAGE_SIZE = 50
_RECONNECT_SECONDS = 1.0


def _filter(since: datetime, until: datetime) -> dict[str, Any]:
    return {
        "occurred": {"since": as_utc(since).isoformat(), "until": as_utc(until).isoformat()},
        "event": {"prefix": [EVENT_PREFIX]},
        "order": "ASC",
    }


def catch_up(
    api_url: str, since: datetime, until: datetime, timeout: float = 30.0
) -> Iterator[dict[str, Any]]:
    """Every flow-run event that occurred in [since, until], oldest first, page by page."""
    with httpx.Client(timeout=timeout) as http:
        response = http.post(
            f"{api_url.rstrip('/')}/events/filter", json={"filter": _filter(since, until), "limit": PAGE_SIZE}
        )
        while True:
            response.raise_for_status()
            page = response.json()
            yield from page.get("events") or []
            next_page = page.get("next_page")
            if not next_page:
                return
            response = http.get(next_page)


def follow(on_event: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    """Call ``on_event`` with each live flow-run event (as JSON) until ``stop`` is set; reconnects forever.

    Runs its own event loop: call it from a dedicated thread.
    """
    asyncio.run(_follow(on_event, stop))


async def _follow(on_event: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter

    event_filter = EventFilter(event=EventNameFilter(prefix=[EVENT_PREFIX]))  # type: ignore[call-arg]
    while not stop.is_set():
        try:
            async with get_events_subscriber(filter=event_filter, reconnect_on_clean_close=True) as events:
                log.info("following Prefect's event stream")
                iterator = events.__aiter__()
                while not stop.is_set():
                    try:
                        event = await asyncio.wait_for(iterator.__anext__(), timeout=0.5)
                    except TimeoutError:
                        continue
                    on_event(event.model_dump(mode="json"))
        except StopAsyncIteration:
            pass
        except Exception as exc:  # the server is restarting or unreachable: try again shortly
            log.warning("event stream interrupted (%s: %s); reconnecting", type(exc).__name__, exc)
        if not stop.is_set():
            await asyncio.sleep(_RECONNECT_SECONDS)


def overlap_since(cursor: str | None, default_age: timedelta) -> datetime:
    """Where a catch-up starts: the stored cursor, else ``default_age`` ago."""
    from jobbridge.jobs import utcnow

    if cursor:
        return as_utc(datetime.fromisoformat(cursor))
    return utcnow() - default_age
