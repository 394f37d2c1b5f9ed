"""``jobbridge api``: the upload API under uvicorn, in the foreground.

Everything that can stop it from starting is checked before uvicorn runs, so it is reported as one line
with the fix: the port in use, or the upload area served by another API process (the store is opened,
and its lock taken, here; the app gets it ready-made).
"""

from __future__ import annotations

import errno
import logging
import socket

import uvicorn

from jobbridge.api.app import create_app, open_store
from jobbridge.errors import StackError
from jobbridge.settings import Settings


def check_port(host: str, port: int) -> None:
    """Fail with the setting to change when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise StackError(
                f"port {port} on {host} {reason}: pass --port or set JOBBRIDGE_API_PORT"
            ) from None


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """Run the API until SIGINT/SIGTERM (which finish the requests in flight, then stop)."""
    check_port(host, port)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # Prefect's calls
    store = open_store(settings)  # the app closes it when it shuts down
    logging.getLogger("jobbridge.api").info(
        "upload API on http://%s:%d (OpenAPI: /docs), upload area %s", host, port, store.root
    )
    try:
        config = uvicorn.Config(
            create_app(settings, store=store),
            host=host,
            port=port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=30,
        )
        server = uvicorn.Server(config)
        server.run()
    finally:
        store.close()  # harmless when the app closed it already
    if not server.started:
        raise StackError(f"the upload API did not start on {host}:{port}; see the log above")
