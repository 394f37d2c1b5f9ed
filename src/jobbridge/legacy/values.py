"""Value conversions every legacy codec needs: DynamoDB numbers, timestamps and field readers.

The four legacy systems store numbers, times and nested fields in the same few ways (boto3 Decimals,
ISO 8601 strings that may be naive, epoch seconds, JSON strings or native maps). The conversions live here
once so that they cannot drift apart; what is specific to one system (which zone a naive time is in, how
it writes a time back, the words of its error messages) stays in that system's module and wraps these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Any


class BadField(ValueError):
    """A field that cannot be read. Raised below the codec, which adds the system and record id."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(problem)
        self.field_name, self.problem = field_name, problem


# --- numbers ------------------------------------------------------------------------------------------


def plain_number(value: Decimal) -> int | float:
    """A DynamoDB number as int when integral, else float: what the legacy code had put in."""
    return int(value) if value == value.to_integral_value() else float(value)


def plain(value: Any) -> Any:
    """Decimal -> int/float recursively (sets become lists), so decoded Jobs hold plain JSON values."""
    if isinstance(value, Decimal):
        return plain_number(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    return value


def to_decimal(value: int | float) -> Decimal:
    """A Python number as boto3 stores it: floats via repr, so 0.1 is Decimal('0.1'), not its binary value."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def dynamo(value: Any) -> Any:
    """int/float -> Decimal recursively (boto3's resource API refuses floats); anything else as it is."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return to_decimal(value)
    if isinstance(value, Mapping):
        return {str(k): dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dynamo(v) for v in value]
    return value


# --- times --------------------------------------------------------------------------------------------


def parse_timestamp(value: Any, naive_tz: tzinfo = UTC, *, noun: str = "timestamp") -> datetime | None:
    """A datetime, ISO 8601 string or epoch seconds as aware UTC; None and '' mean "not set".

    A naive value is in ``naive_tz``: every system wrote UTC except receipt_trainer, whose zone is
    configurable. Anything else raises ValueError (``{value!r} is not a {noun}``); a malformed string raises
    ``fromisoformat``'s ValueError and a huge number OverflowError, which each codec words its own way.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value.strip())
    else:
        raise ValueError(f"{value!r} is not a {noun}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=naive_tz)
    return moment.astimezone(UTC)


# --- fields -------------------------------------------------------------------------------------------


def text_field(data: Mapping[str, Any], name: str, *, blank_ok: bool = False) -> str:
    """A required non-empty string; ``blank_ok`` accepts whitespace-only text (receipt_trainer did)."""
    value = data.get(name)
    if not isinstance(value, str) or not (value if blank_ok else value.strip()):
        raise BadField(name, "is missing" if value is None else f"is {value!r}, not a non-empty string")
    return value


def map_field(data: Mapping[str, Any], name: str, *, noun: str = "map") -> dict[str, Any]:
    """An optional nested map (absent -> {}); ``noun`` is what the system calls one in errors."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadField(name, f"is {type(value).__name__}, not a {noun}")
    return dict(value)


def json_value(value: Any) -> Any:
    """A field stored as a JSON string, or natively (decoded with :func:`plain`); '' means "not set".

    Legacy writers disagree on nested fields: code writes ``json.dumps`` strings, documentation samples
    native maps. Invalid JSON raises ValueError for the codec to name the field.
    """
    if isinstance(value, str):
        return json.loads(value) if value.strip() else None
    return plain(value)
