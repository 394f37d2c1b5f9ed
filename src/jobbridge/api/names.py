"""What a client may name: file names, folders, dataset and team ids, upload ids, form booleans.

Everything a client sends that could end up in a path is checked here and nowhere else. The rule is to
refuse rather than repair: a name holding a separator, a ``..``, a NUL, a control character, or something
that *decodes* into one of those (``%2e%2e%2f``, overlong UTF-8, fullwidth solidus under NFKC) is an error
that says what was wrong, so a client never finds its file stored under a name it did not send.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from urllib.parse import unquote

from jobbridge.errors import JobValidationError

#: ScientistCloud's sensor types (SCLib_UploadJobTypes.SensorType), in its spelling.
SENSORS = ("IDX", "TIFF", "TIFF RGB", "NETCDF", "HDF5", "4D_NEXUS", "RGB", "MAPIR", "OTHER")
_SENSOR_KEYS = {s.replace("_", " ").lower(): s for s in SENSORS}

MAX_NAME_BYTES = 255
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_EMAIL = re.compile(r"^[^@\s/\\]{1,128}@[^@\s/\\]{1,255}$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


class UnsafeNameError(JobValidationError):
    """A name sent by the client could escape the upload area or is not valid text."""


def _has_control(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _decoded_forms(text: str, what: str) -> list[str]:
    """``text`` and what it becomes under percent-decoding (up to 3 rounds) and NFKC normalisation.

    A later tool (a browser, a shell, an object store, rclone) may decode a name once more; every form it
    could turn into must be safe too. Percent sequences that are not valid UTF-8 (``%c0%ae``, an overlong
    '.') are refused outright.
    """
    forms = [text]
    current = text
    for _ in range(3):
        if "%" not in current:
            break
        try:
            decoded = unquote(current, errors="strict")
        except UnicodeDecodeError:
            raise UnsafeNameError(
                f"{what} {text!r} holds percent-escapes that are not valid UTF-8 (e.g. overlong '%c0%ae')"
            ) from None
        if decoded == current:
            break
        forms.append(decoded)
        current = decoded
    forms += [unicodedata.normalize("NFKC", form) for form in list(forms)]
    return forms


def safe_filename(name: str | bytes, what: str = "filename") -> str:
    """``name`` if it is a plain file name (no directory part, nothing that decodes into one).

    Bytes are decoded as strict UTF-8, so overlong encodings and stray bytes are refused.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise UnsafeNameError(f"{what} is not valid UTF-8 (overlong or stray bytes)") from None
    if not name or not name.strip():
        raise UnsafeNameError(f"{what} is empty: send the file's name, e.g. 'scan_001.tif'")
    if "\x00" in name:
        raise UnsafeNameError(f"{what} {name!r} holds a NUL byte")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UnsafeNameError(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    for form in _decoded_forms(name, what):
        if _has_control(form) or "\x00" in form:
            raise UnsafeNameError(f"{what} {name!r} holds a control character")
        if "/" in form or "\\" in form:
            raise UnsafeNameError(
                f"{what} {name!r} must be a plain file name without '/' or '\\' (send the base name only)"
            )
        if form.strip() in (".", ".."):
            raise UnsafeNameError(f"{what} {name!r} is not a file name")
    return name


def safe_folder(folder: str | None) -> str | None:
    """A dataset folder: a relative path of safe names ('raw/day1'), or None when empty."""
    if folder is None or not folder.strip():
        return None
    if folder.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", folder):
        raise UnsafeNameError(f"folder {folder!r} must be relative, e.g. 'raw/day1'")
    parts = [part for part in folder.split("/") if part not in ("", ".")]
    for part in parts:
        safe_filename(part, what=f"folder {folder!r}: component")
    return "/".join(parts) or None


def safe_token(value: str | None, what: str) -> str | None:
    """An identifier that may become a directory name (dataset uuid, team uuid); None when empty."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    if not _TOKEN.match(text):
        raise UnsafeNameError(
            f"{what} {text!r} is not an identifier: use letters, digits, '.', '_' or '-' (at most 128)"
        )
    return text


def parse_upload_id(value: str) -> str:
    """The canonical form of a server-issued upload id (a UUID4); anything else is refused."""
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise UnsafeNameError(
            f"'{value}' is not an upload id (upload ids are UUIDs issued by the server)"
        ) from None
    if parsed.version != 4 or str(parsed) != value.lower():
        raise UnsafeNameError(f"'{value}' is not an upload id (upload ids are UUIDs issued by the server)")
    return str(parsed)


def new_upload_id() -> str:
    """A fresh upload id."""
    return str(uuid.uuid4())


def parse_bool(value: bool | str | int | None, what: str, default: bool = False) -> bool:
    """A form boolean as legacy clients send it: 'true'/'false', 'True'/'False' (str of a bool), 1/0."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False if text else default
    raise JobValidationError(f"{what} is {value!r}: use true or false")


def parse_sensor(value: str) -> str:
    """A sensor type in ScientistCloud's spelling ('tiff rgb' -> 'TIFF RGB', '4d nexus' -> '4D_NEXUS')."""
    key = str(value).strip().replace("_", " ").lower()
    if key not in _SENSOR_KEYS:
        raise JobValidationError(f"sensor {value!r} is not one of {', '.join(SENSORS)}")
    return _SENSOR_KEYS[key]


def parse_email(value: str) -> str:
    """A user's e-mail address (the job's owner); only its shape is checked."""
    text = str(value).strip()
    if not _EMAIL.match(text) or _has_control(text):
        raise JobValidationError(f"user_email {value!r} is not an e-mail address")
    return text
