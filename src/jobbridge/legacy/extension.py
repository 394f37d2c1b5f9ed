"""The ``jobbridge`` extension: canonical Job fields a legacy layout has no place for, stored beside it.

Every codec writes the extension only when the legacy fields alone would decode to a different Job, and
the legacy readers ignore it. Two forms exist, because the systems differ in what may change the record
after jobbridge wrote it:

* **overrides** (ScientistCloud, receipt_trainer): a native map of the exact field values, merged over the
  decoded fields as they are.
* **sidecar** (Delphi, argoitny, whose pollers keep rewriting items jobbridge mirrors into): a JSON string of
  ``{field: [wanted, implied]}``. Each entry is applied only while the layout still implies what it implied
  when written, so a legacy writer's later change (claiming, finishing the job) always wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from jobbridge.jobs import Job
from jobbridge.legacy.codec import LegacyDecodeError
from jobbridge.legacy.values import BadField

#: The attribute / sub-document name, in every system.
EXTENSION = "jobbridge"
#: Job fields the extension may hold: all but the id, which the legacy record's own id determines.
OVERRIDABLE = frozenset(Job.model_fields) - {"id"}


def _same(value: Any) -> Any:
    return value


def overrides_for(job: Job, derived: Job, normalize: Callable[[Any], Any] = _same) -> dict[str, Any]:
    """The exact (JSON) values of the fields where ``job`` differs from ``derived``, what the layout reads.

    ``normalize`` maps a value of ``job`` to the precision the layout keeps (Mongo dates keep milliseconds),
    so a difference the layout cannot hold anyway does not force an extension onto every record.
    """
    exact = job.model_dump(mode="json")
    return {
        name: exact[name]
        for name in Job.model_fields
        if name in OVERRIDABLE and normalize(getattr(job, name)) != getattr(derived, name)
    }


def read_overrides(
    record: Mapping[str, Any], *, noun: str = "map", fields_noun: str = "overridable Job fields"
) -> dict[str, Any]:
    """The overrides map of a record ({} when absent); raises BadField for anything but Job fields."""
    value = record.get(EXTENSION) or {}
    if not isinstance(value, Mapping):
        raise BadField(EXTENSION, f"is {type(value).__name__}, not a {noun} of Job fields")
    unknown = set(value) - OVERRIDABLE
    if unknown:
        raise BadField(EXTENSION, f"holds {sorted(unknown)}, which are not {fields_noun}")
    return dict(value)


def sidecar_for(job: Job, derived: Job) -> str | None:
    """Fields where ``job`` differs from what the layout alone implies, each with that implied value."""
    wanted, implied = job.model_dump(mode="json"), derived.model_dump(mode="json")
    diff = {name: [wanted[name], implied[name]] for name in wanted if wanted[name] != implied[name]}
    return json.dumps(diff, sort_keys=True, separators=(",", ":")) if diff else None


def apply_sidecar(base: Job, raw: Any, system: str, record_id: str) -> Job:
    """Restore sidecar fields whose implied value the layout still implies (a legacy writer's change wins)."""
    if raw is None or raw == "":
        return base
    try:
        diff = json.loads(raw) if isinstance(raw, str) else None
        if not isinstance(diff, dict):
            raise ValueError("not a JSON object")
        data = base.model_dump(mode="json")
        for name, (wanted, implied) in diff.items():
            if name in data and data[name] == implied:
                data[name] = wanted
        return Job.model_validate(data)
    except (ValueError, TypeError) as exc:
        raise LegacyDecodeError(system, record_id, EXTENSION, f"cannot be applied ({exc})") from None
