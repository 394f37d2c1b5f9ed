"""Where a transfer reads or writes, parsed from what a user typed, and names kept inside their sandbox.

Every transfer job (``sync``, ``upload``, ``backup``) takes locations as strings: a local path,
``s3://bucket/key``, ``gdrive://...``, ``sftp://user@host/path`` or an ``http(s)://`` URL. They are parsed
once, here, at parameter validation, so a typo fails the submission with a message naming the field and
the accepted forms instead of failing a worker an hour later.

Names that come from users or from remote sources (a dataset id, a folder, a file name from a URL or an
S3 key) end up as path components under the dataset store. :func:`safe_segment` and
:func:`safe_relative_path` refuse anything that could leave that place: ``..``, absolute paths, NUL bytes
and control characters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

LocationKind = Literal["local", "s3", "gdrive", "sftp", "http"]

#: What each kind looks like, for error messages.
LOCATION_FORMS: dict[LocationKind, str] = {
    "local": "an absolute or relative local path (or file:///path)",
    "s3": "s3://bucket/key-or-prefix",
    "gdrive": "gdrive://<path in the drive> (sync) or gdrive://<file id> (upload)",
    "sftp": "sftp://user@host[:port]/path",
    "http": "http(s)://host/path",
}

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DRIVE_FILE_ID = re.compile(r"^[A-Za-z0-9_\-]{10,200}$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]{1,253}$|^\[[0-9A-Fa-f:.]+\]$")
_USER = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Longest file-name component most filesystems and S3 accept.
MAX_SEGMENT = 255


class LocationError(ValueError):
    """A location or a name is not acceptable; the message says what is accepted."""


@dataclass(frozen=True)
class Location:
    """One parsed location. ``path`` is kind-specific (see :func:`parse_location`)."""

    kind: LocationKind
    path: str
    host: str = ""
    user: str = ""
    port: int | None = None
    url: str = ""

    @property
    def bucket(self) -> str:
        """S3: the bucket."""
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """S3: the key or prefix inside the bucket (may be empty)."""
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    def label(self) -> str:
        """How the location is shown to users: never with credentials (none are ever accepted in it)."""
        if self.kind == "local":
            return self.path
        if self.kind == "s3":
            return f"s3://{self.path}"
        if self.kind == "gdrive":
            return f"gdrive://{self.path}"
        if self.kind == "sftp":
            port = f":{self.port}" if self.port else ""
            return f"sftp://{self.user + '@' if self.user else ''}{self.host}{port}{self.path}"
        return self.url


def parse_location(value: str, *, allow: Collection[LocationKind]) -> Location:
    """Parse a user's location string into a :class:`Location` of one of the ``allow``-ed kinds.

    ``path`` holds: local, the absolute path (``~`` expanded, made absolute against the current
    directory: at submission, that is the submitter's); s3, ``bucket/key``; gdrive, what follows
    ``gdrive://``; sftp, the path on the host (absolute, or relative to the login directory after
    ``/~/``); http, the path of the URL (``url`` holds the whole URL).
    """
    if not isinstance(value, str) or not value.strip():
        raise LocationError(f"must not be empty; use {_forms(allow)}")
    if "\x00" in value:
        raise LocationError("must not contain a NUL byte")
    scheme, sep, _ = value.partition("://")
    kind: LocationKind
    if not sep:
        kind, location = "local", _local(value)
    else:
        scheme = scheme.lower()
        parsers = {
            "file": ("local", _file_url),
            "s3": ("s3", _s3),
            "gdrive": ("gdrive", _gdrive),
            "sftp": ("sftp", _sftp),
            "http": ("http", _http),
            "https": ("http", _http),
        }
        if scheme not in parsers:
            raise LocationError(f"scheme '{scheme}://' is not supported; use {_forms(allow)}")
        kind, parser = parsers[scheme]  # type: ignore[assignment]
        location = parser(value)
    if kind not in allow:
        raise LocationError(f"{LOCATION_FORMS[kind]} is not accepted here; use {_forms(allow)}")
    return location


def _forms(allow: Collection[LocationKind]) -> str:
    return ", ".join(LOCATION_FORMS[kind] for kind in LOCATION_FORMS if kind in allow)


def _local(value: str) -> Location:
    return Location("local", os.path.abspath(os.path.expanduser(value)))


def _file_url(value: str) -> Location:
    parts = urlsplit(value)
    if parts.netloc not in ("", "localhost"):
        raise LocationError(f"file URL {value!r} names host '{parts.netloc}'; use file:///absolute/path")
    return _local(unquote(parts.path))


def _s3(value: str) -> Location:
    rest = value.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise LocationError(
            f"'{bucket}' is not an S3 bucket name (3-63 lower-case letters, digits, dots and hyphens): "
            "use s3://bucket/key"
        )
    key = key.lstrip("/")
    if key and (".." in key.split("/") or _CONTROL.search(key)):
        raise LocationError(f"S3 key '{key}' holds a '..' segment or a control character")
    return Location("s3", f"{bucket}/{key}" if key else bucket)


def _gdrive(value: str) -> Location:
    rest = value.split("://", 1)[1].strip("/")
    if _CONTROL.search(rest) or ".." in rest.split("/"):
        raise LocationError("a gdrive:// path must not hold '..' segments or control characters")
    return Location("gdrive", rest)


def _sftp(value: str) -> Location:
    parts = urlsplit(value)
    if parts.password is not None:
        raise LocationError(
            "an sftp:// URL must not hold a password: give the key file in 'sftp_key_file' instead"
        )
    host = parts.hostname or ""
    if not host or not _HOST.match(host):
        raise LocationError(f"{value!r} has no valid host: use sftp://user@host[:port]/path")
    user = unquote(parts.username or "")
    if user and not _USER.match(user):
        raise LocationError(f"sftp user '{user}' is not a valid login name")
    try:
        port = parts.port
    except ValueError:
        raise LocationError(f"{value!r} has an invalid port") from None
    path = unquote(parts.path) or "/"
    if path.startswith("/~/") or path == "/~":
        path = path[3:]  # relative to the login directory
    if _CONTROL.search(path):
        raise LocationError("an sftp:// path must not hold control characters")
    return Location("sftp", path, host=host, user=user, port=port)


def _http(value: str) -> Location:
    parts = urlsplit(value)
    if not parts.hostname:
        raise LocationError(f"{value!r} has no host: use http(s)://host/path")
    if parts.username is not None or parts.password is not None:
        raise LocationError(
            "a URL must not hold a user name or password: credentials never go into job parameters"
        )
    if _CONTROL.search(value) or " " in value:
        raise LocationError("a URL must not hold spaces or control characters (percent-encode them)")
    return Location("http", unquote(parts.path), host=parts.hostname, url=value)


# --------------------------------------------------------------------------------------------------
# Names inside the sandbox


def segment_problem(name: str) -> str | None:
    """Why ``name`` cannot be one path component under the dataset store, or ``None`` when it can."""
    if not name:
        return "must not be empty"
    if "\x00" in name:
        return "must not contain a NUL byte"
    if name in (".", ".."):
        return f"must not be '{name}'"
    if "/" in name or "\\" in name:
        return "must be a single name, without '/' or '\\'"
    if _CONTROL.search(name):
        return "must not contain control characters"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_SEGMENT:
        return f"must be at most {MAX_SEGMENT} bytes long"
    return None


def safe_segment(name: str) -> str:
    """``name`` when it is one safe path component; else :class:`LocationError` saying why."""
    problem = segment_problem(name)
    if problem is not None:
        raise LocationError(problem)
    return name


def safe_relative_path(value: str) -> str:
    """A clean relative posix path (``a//b/`` -> ``a/b``) whose every component is safe.

    Absolute paths, ``..`` anywhere and NUL bytes are refused rather than cleaned: a path that tries
    to leave its place is a mistake or an attack, and either way the user should hear about it.
    """
    if "\x00" in value:
        raise LocationError("must not contain a NUL byte")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        raise LocationError(f"'{value}' is an absolute path; give a path relative to the dataset")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if not parts:
        raise LocationError("must name at least one directory or file")
    for part in parts:
        problem = segment_problem(part)
        if problem is not None:
            raise LocationError(f"'{value}': component '{part}' {problem}")
    return "/".join(parts)


def name_from_remote(candidate: str, fallback: str) -> str:
    """A file name taken from a remote source (URL path, Content-Disposition): its last component,
    when that is a safe name, else ``fallback``. Remote names are data, not instructions: a server
    answering ``filename="../../etc/passwd"`` gets ``passwd``."""
    base = candidate.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base if segment_problem(base) is None else fallback
