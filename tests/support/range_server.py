"""A real HTTP file server on a free loopback port, with Range requests and a switch to drop a connection.

Serves the files of one directory (``GET /<name>``), with ``ETag``, ``Content-Length`` and single-range
``Range: bytes=N-`` / ``bytes=N-M`` answers (206 + ``Content-Range``; ``If-Range`` honoured), like a
static file server or S3. ``drop_after(n)`` makes the next response stop after ``n`` body bytes and close
the socket without finishing (what a dropped network connection looks like to the client), once.
``ranges_ignored = True`` makes it answer every request with the whole file (a server without Range
support). Every request's ``Range`` header is recorded, so a test can check how a download resumed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024


class RangeServer:
    """Serves ``root`` at ``url``; see the module docstring for the switches."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[dict[str, Any]] = []
        self.ranges_ignored = False
        self.extra_headers: dict[str, str] = {}
        self._drop_after: int | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-server", daemon=True)

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def drop_after(self, count: int) -> None:
        """Cut the next response after ``count`` body bytes (once)."""
        with self._lock:
            self._drop_after = count

    def _take_drop(self) -> int | None:
        with self._lock:
            drop, self._drop_after = self._drop_after, None
            return drop

    def start(self) -> RangeServer:
        """Start serving on a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: tests read ``requests`` instead."""

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                path = server.root / self.path.lstrip("/").split("?", 1)[0]
                if not path.is_file() or ".." in self.path:
                    self.send_error(404)
                    return
                size = path.stat().st_size
                etag = (
                    '"'
                    + hashlib.sha256(f"{path.name}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
                    + '"'
                )
                start, end = 0, size - 1
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                partial = bool(wanted) and not server.ranges_ignored and if_range in (None, etag)
                if partial:
                    parsed = _parse_range(wanted or "", size)
                    if parsed is None:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start, end = parsed
                self.send_response(206 if partial else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "none" if server.ranges_ignored else "bytes")
                self.send_header("ETag", etag)
                for name, value in server.extra_headers.items():
                    self.send_header(name, value)
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                try:
                    self._send_body(path, start, end - start + 1, server._take_drop())
                except (ConnectionError, BrokenPipeError):
                    self.close_connection = True  # the client went away: nothing to report

            def _send_body(self, path: Path, start: int, length: int, drop: int | None) -> None:
                limit = length if drop is None else min(drop, length)
                with open(path, "rb") as handle:
                    handle.seek(start)
                    sent = 0
                    while sent < limit:
                        data = handle.read(min(CHUNK, limit - sent))
                        if not data:
                            break
                        self.wfile.write(data)
                        sent += len(data)
                if drop is not None and drop < length:
                    self.wfile.flush()
                    # Close right after those bytes: the client sees the body end before Content-Length.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        return Handler


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first.isdigit():
        return None
    start = int(first)
    end = int(last) if last.isdigit() else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@contextmanager
def serving(root: Path) -> Iterator[RangeServer]:
    """A started server over ``root``, stopped on exit."""
    server = RangeServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns their SHA-256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
