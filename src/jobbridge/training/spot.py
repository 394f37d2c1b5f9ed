"""Watch for an EC2 spot interruption notice, in a background thread, so training can stop in time.

EC2 announces a spot interruption about two minutes ahead on the instance metadata endpoint
``/latest/meta-data/spot/instance-action``: 404 while there is none, then 200 with
``{"action": "terminate" | "stop" | "hibernate", "time": "<ISO 8601>"}``. A job that sees it has those two
minutes to checkpoint and hand itself back (see :mod:`jobbridge.training.handback`); waiting for the
kill would lose everything since the last periodic checkpoint.

Instances that require IMDSv2 answer 401 to a plain GET; the watcher then fetches a session token
(``PUT /latest/api/token``) and asks again with it. Anything else (a connection error off EC2, 403 from a
proxy, a 200 whose body is not a notice) means "no notice": a watcher must never stop a job by mistake.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import httpx

__all__ = ["SpotNotice", "SpotWatcher"]

log = logging.getLogger("jobbridge.training.spot")

#: Seconds one metadata request may take; the endpoint is link-local and answers in milliseconds.
REQUEST_TIMEOUT = 2.0
#: Lifetime asked for an IMDSv2 session token (the maximum, six hours).
TOKEN_TTL_SECONDS = 21600
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


@dataclass(frozen=True)
class SpotNotice:
    """An interruption notice: what EC2 will do to the instance, and when."""

    action: str
    time: str

    def describe(self) -> str:
        """``spot interruption notice: terminate at 2026-01-01T00:02:00Z``, for logs and state messages."""
        return f"spot interruption notice: {self.action} at {self.time or 'an unknown time'}"


def parse_notice(body: bytes) -> SpotNotice | None:
    """The notice in a 200 response body, or None when the body is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("action"), str) or not data["action"]:
        return None
    return SpotNotice(action=data["action"], time=str(data.get("time") or ""))


class SpotWatcher:
    """Polls ``url`` every ``poll_seconds`` until a notice appears or :meth:`stop` is called.

    Use as a context manager around the training; :meth:`is_set` is what ``TrainContext.should_stop``
    calls. The first poll happens at once, so a job started on an instance that already got its
    notice stops before doing any work.
    """

    def __init__(self, url: str, poll_seconds: float, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self._notice: SpotNotice | None = None
        self._noticed = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: str | None = None
        self._reported: set[str] = set()

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> SpotWatcher:
        """Start polling in a daemon thread (a stuck request never keeps a finished job alive)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jobbridge-spot-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; returns without waiting for a request in flight (it ends within ``timeout``)."""
        self._stopped.set()

    def __enter__(self) -> SpotWatcher:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- reading

    @property
    def notice(self) -> SpotNotice | None:
        """The notice seen, once there is one."""
        return self._notice

    def is_set(self) -> bool:
        """True once a notice has been seen (it stays true: the instance is going away)."""
        return self._noticed.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a notice is seen or ``timeout`` seconds pass; returns :meth:`is_set`."""
        return self._noticed.wait(timeout)

    # ---------------------------------------------------------------------------------- polling

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            delay = 0.0
            while not self._stopped.wait(delay):
                delay = self.poll_seconds
                notice = self.poll_once(client)
                if notice is not None:
                    self._notice = notice
                    self._noticed.set()
                    log.warning("%s (from %s)", notice.describe(), self.url)
                    return

    def poll_once(self, client: httpx.Client) -> SpotNotice | None:
        """Ask the endpoint once; None unless it answered with a notice."""
        try:
            response = self._get(client)
            if response.status_code == 401:  # IMDSv2 required: get a session token and ask again
                self._token = self._fetch_token(client)
                response = self._get(client)
        except httpx.HTTPError as exc:
            self._report_once("unreachable", f"spot notice endpoint {self.url} unreachable ({exc!r})")
            return None
        if response.status_code != 200:
            if response.status_code != 404:
                self._report_once(
                    f"status-{response.status_code}",
                    f"spot notice endpoint {self.url} answered {response.status_code}: read as no notice",
                )
            return None
        notice = parse_notice(response.content)
        if notice is None:
            self._report_once("body", f"spot notice endpoint {self.url} answered 200 without a notice")
        return notice

    def _get(self, client: httpx.Client) -> httpx.Response:
        headers = {_TOKEN_HEADER: self._token} if self._token else {}
        return client.get(self.url, headers=headers)

    def _fetch_token(self, client: httpx.Client) -> str | None:
        parts = urlsplit(self.url)
        token_url = f"{parts.scheme}://{parts.netloc}/latest/api/token"
        response = client.put(token_url, headers={_TOKEN_TTL_HEADER: str(TOKEN_TTL_SECONDS)})
        if response.status_code != 200:
            self._report_once("token", f"IMDSv2 token request to {token_url} answered {response.status_code}")
            return None
        return response.text.strip() or None

    def _report_once(self, kind: str, message: str) -> None:
        """Log each kind of non-notice once per watcher (off EC2 every poll would say the same)."""
        if kind not in self._reported:
            self._reported.add(kind)
            log.info(message)
