"""What every legacy codec provides: records of a legacy layout <-> canonical Jobs, one status table.

A legacy record rarely fits a Job exactly: its id may not be a UUID, and it carries fields jobbridge has
no place for. Decoding therefore returns a :class:`LegacyRecord`: the Job, the record's own id, and the
leftover fields, which encoding puts back so that decode -> encode -> decode keeps the record's meaning.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import ValidationError

from jobbridge.errors import JobbridgeError
from jobbridge.jobs import Job, JobStatus

#: Namespace of the UUIDs jobbridge derives from legacy ids that are not UUIDs (stable across runs).
LEGACY_ID_NAMESPACE = uuid.UUID("6f1d3b1e-52f4-4c47-9a55-0c1f6a0d7e21")


class LegacyDecodeError(JobbridgeError):
    """A legacy record cannot be read as a job."""

    def __init__(self, system: str, record_id: str, field_name: str, problem: str) -> None:
        self.system, self.record_id, self.field_name = system, record_id, field_name
        super().__init__(f"{system} record {record_id!r}: field '{field_name}' {problem}")


@dataclass(frozen=True)
class LegacyRecord:
    """A decoded legacy record: the canonical Job plus what only the legacy layout holds."""

    job: Job
    legacy_id: str
    extra: dict[str, Any] = field(default_factory=dict)


def job_id_for(legacy_id: str) -> str:
    """The Job id of a legacy id: the id itself when it is a UUID, else a stable UUID5 derived from it."""
    try:
        return str(uuid.UUID(legacy_id))
    except ValueError:
        return str(uuid.uuid5(LEGACY_ID_NAMESPACE, legacy_id))


def build_job(
    fields: Mapping[str, Any],
    *,
    system: str,
    record_id: str,
    legacy_names: Mapping[str, str],
    fallback: str,
    problem: str = "is not valid",
) -> Job:
    """The Job, or a LegacyDecodeError naming the legacy field behind pydantic's first complaint.

    The user fixes the legacy record, not the Job, so the error names the record's field
    (``legacy_names``: Job field -> legacy name; ``fallback`` when pydantic names none).
    """
    try:
        return Job(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else fallback
        raise LegacyDecodeError(
            system, record_id, legacy_names.get(name, name), f"{problem}: {first['msg']}"
        ) from None


class LegacyCodec(Protocol):
    """Encode Jobs into one legacy layout and decode that layout back."""

    system: ClassVar[str]
    #: legacy status string -> canonical status (every spelling the legacy code wrote or documented).
    to_canonical: ClassVar[Mapping[str, JobStatus]]
    #: canonical status -> the status string the legacy readers expect.
    from_canonical: ClassVar[Mapping[JobStatus, str]]

    def decode(self, record: Mapping[str, Any]) -> LegacyRecord:
        """Read one record (plain Python values, as boto3's resource API or pymongo return them)."""
        ...

    def encode(self, record: LegacyRecord) -> list[dict[str, Any]]:
        """The record(s) the legacy layout stores for this job (plain Python values; Decimal numbers)."""
        ...


@dataclass
class BatchResult:
    """Outcome of decoding many records: what decoded, and one error per record that did not."""

    decoded: list[LegacyRecord] = field(default_factory=list)
    errors: list[LegacyDecodeError] = field(default_factory=list)


def decode_all(codec: LegacyCodec, records: Iterable[Mapping[str, Any]]) -> BatchResult:
    """Decode every record; a record that cannot be read is reported and never stops the batch."""
    result = BatchResult()
    for record in records:
        try:
            result.decoded.append(codec.decode(record))
        except LegacyDecodeError as exc:
            result.errors.append(exc)
    return result


def iter_statuses(codec: LegacyCodec) -> Iterator[tuple[str, JobStatus]]:
    """Every (legacy, canonical) pair of the codec's table, for tests and docs."""
    yield from codec.to_canonical.items()
