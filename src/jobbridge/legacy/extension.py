"""The ``jobbridge`` extension: canonical Job fields a legacy layout has no place for, stored beside it.

Every codec writes the extension only when the legacy fields alone would decode to a different Job, and
the legacy readers ignore it. Each entry is a pair ``[wanted, implied]``: the exact (JSON) value of the
Job field, and the value the legacy fields implied when the entry was written. Decoding applies an entry
only while the legacy fields still imply that value, so a legacy writer's later change (a poller claiming
or finishing the job, a worker setting its status) always wins over what jobbridge wrote before it.

The rule is the same in every system; only the encoding differs with what suits the store:

* **overrides** (ScientistCloud, receipt_trainer): a native map ``{field: [wanted, implied]}`` (a Mongo
  sub-document, a DynamoDB map), so the exact values stay readable in the store's own tools;
* **sidecar** (Delphi, argoitny, whose items hold JSON strings already): the same map as a JSON string.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jobbridge.jobs import Job
from jobbridge.legacy.codec import LegacyDecodeError
from jobbridge.legacy.values import BadField

#: The attribute / sub-document name, in every system.
EXTENSION = "jobbridge"
#: Job fields the overrides may hold: all but the id, which the legacy record's own id determines.
OVERRIDABLE = frozenset(Job.model_fields) - {"id"}


def _same(value: Any) -> Any:
    return value


def _entries(
    job: Job, derived: Job, names: Iterable[str], normalize: Callable[[Any], Any] | None = None
) -> dict[str, list[Any]]:
    """``{field: [wanted, implied]}`` (JSON values) for each field in which ``job`` differs from ``derived``.

    Without ``normalize`` the JSON values are compared; with it, ``normalize(job value)`` and the derived
    value are (a layout that truncates a value then needs no entry for what it cannot hold anyway).
    """
    wanted, implied = job.model_dump(mode="json"), derived.model_dump(mode="json")

    def differs(name: str) -> bool:
        if normalize is None:
            return bool(wanted[name] != implied[name])
        return bool(normalize(getattr(job, name)) != getattr(derived, name))

    return {name: [wanted[name], implied[name]] for name in names if differs(name)}


def _apply(base: Job, entries: Mapping[str, Any]) -> Job:
    """``base`` with each entry's wanted value where ``base`` still holds the entry's implied value."""
    data = base.model_dump(mode="json")
    for name, pair in entries.items():
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"entry {name!r} is not a [wanted, implied] pair")
        wanted, implied = pair
        if name in data and data[name] == implied:
            data[name] = wanted
    return Job.model_validate(data)


# --- overrides: a native map (ScientistCloud, receipt_trainer) --------------------------------------------


def overrides_for(job: Job, derived: Job, normalize: Callable[[Any], Any] = _same) -> dict[str, list[Any]]:
    """The entries for fields where ``job`` differs from ``derived``, what the legacy fields alone read as.

    ``normalize`` maps a value of ``job`` to the precision the layout keeps (Mongo dates keep milliseconds),
    so a difference the layout cannot hold anyway does not force an extension onto every record.
    """
    names = [name for name in Job.model_fields if name in OVERRIDABLE]
    return _entries(job, derived, names, normalize)


def read_overrides(
    record: Mapping[str, Any], *, noun: str = "map", fields_noun: str = "overridable Job fields"
) -> dict[str, Any]:
    """The overrides map of a record ({} when absent); raises BadField for anything but Job field pairs."""
    value = record.get(EXTENSION) or {}
    if not isinstance(value, Mapping):
        raise BadField(EXTENSION, f"is {type(value).__name__}, not a {noun} of Job fields")
    unknown = set(value) - OVERRIDABLE
    if unknown:
        raise BadField(EXTENSION, f"holds {sorted(unknown)}, which are not {fields_noun}")
    for name, pair in value.items():
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise BadField(EXTENSION, f"entry {name!r} is {pair!r}, not a [wanted, implied] pair")
    return dict(value)


def apply_overrides(base: Job, overrides: Mapping[str, Any], system: str, record_id: str) -> Job:
    """Restore entries whose implied value the record still implies (so a legacy writer's change wins)."""
    if not overrides:
        return base
    try:
        return _apply(base, overrides)
    except (ValueError, TypeError) as exc:
        raise LegacyDecodeError(system, record_id, EXTENSION, f"cannot be applied ({exc})") from None


# --- sidecar: a JSON string (Delphi, argoitny) ----------------------------------------------------------


def sidecar_for(job: Job, derived: Job) -> str | None:
    """Fields where ``job`` differs from what the layout alone implies (the id too), as a JSON string."""
    diff = _entries(job, derived, Job.model_fields)
    return json.dumps(diff, sort_keys=True, separators=(",", ":")) if diff else None


def apply_sidecar(base: Job, raw: Any, system: str, record_id: str) -> Job:
    """Restore sidecar fields whose implied value the layout still implies (a legacy writer's change wins)."""
    if raw is None or raw == "":
        return base
    try:
        diff = json.loads(raw) if isinstance(raw, str) else None
        if not isinstance(diff, dict):
            raise ValueError("not a JSON object")
        return _apply(base, diff)
    except (ValueError, TypeError) as exc:
        raise LegacyDecodeError(system, record_id, EXTENSION, f"cannot be applied ({exc})") from None
