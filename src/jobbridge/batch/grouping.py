"""How a batch's items travel: read lazily, grouped into tasks, their outcomes gathered into a report.

Why groups: a Prefect task run costs about 70-78 ms of orchestration, which for a tiny item is far more
than the work. Items therefore go to tasks in groups (about four groups per concurrent slot, 1..1000
items each), so ten thousand small items cost a few dozen task runs while a slow item still leaves the
other slots busy. Why a bounded report: counts are always exact, but the per-item records kept for the
job (``Job.items``) stop at :data:`RECORD_LIMIT`, failures first, so a million-item batch does not put a
million rows into one artifact.

Prefect-free, so that it is cheap to import (``control`` reads :data:`ITEMS_ARTIFACT_TYPE`) and to test.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobbridge.batch.handlers import ItemHandler

#: Items per group when nothing else decides: about this many groups per concurrent slot.
GROUPS_PER_SLOT = 4
#: Bounds of a chosen group size (a configured one is taken as given).
MAX_GROUP_SIZE = 1000
#: Per-item records kept in the job's items artifact (failures first); counts are always complete.
RECORD_LIMIT = 10_000
#: Failures quoted in the job's result (the items artifact has up to RECORD_LIMIT).
RESULT_FAILURE_LIMIT = 100
#: A handler result whose JSON is longer than this is not kept per item (only its size is).
ITEM_RESULT_MAX_CHARS = 2000
#: Prefect artifact type of the per-item records (``Job.items``).
ITEMS_ARTIFACT_TYPE = "batch-items"

Outcome = Literal["completed", "completed_with_errors", "failed"]


def choose_group_size(total: int, concurrency: int, configured: int | None = None) -> int:
    """Items per task: ``configured`` when given (> 0), else ~total / (concurrency * 4) in [1, 1000]."""
    if configured:
        return configured
    return max(1, min(MAX_GROUP_SIZE, math.ceil(total / (max(concurrency, 1) * GROUPS_PER_SLOT))))


# --------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True, slots=True)
class Entry:
    """One item on its way to a handler: where it was, its id, its value, or why it cannot be read."""

    position: int
    id: str
    value: Any = None
    error: str | None = None


def item_id(value: Any, fallback: int) -> str:
    """An item's own ``id`` field when it is an object with one, else ``fallback`` (its position)."""
    if isinstance(value, dict):
        own = value.get("id")
        if isinstance(own, str | int) and not isinstance(own, bool):
            return str(own)
    return str(fallback)


def entries_from_list(items: Iterable[Any]) -> Iterator[Entry]:
    """Entries of inline items; an item without an ``id`` is known by its index (0-based)."""
    for position, value in enumerate(items):
        yield Entry(position, item_id(value, position), value)


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def count_file_items(path: Path) -> int:
    """Items of a JSON-lines file (its non-blank lines), counted without parsing them."""
    return sum(1 for _ in _file_lines(path))


def entries_from_file(path: Path) -> Iterator[Entry]:
    """Entries of a JSON-lines file, read lazily; blank lines are skipped.

    An item without an ``id`` is known by its line number (1-based). A line that is not JSON becomes
    a failed item rather than failing the batch: one bad line is one bad item.
    """
    for position, (number, line) in enumerate(_file_lines(path)):
        try:
            value = json.loads(line)
        except ValueError as exc:
            yield Entry(position, str(number), error=f"line {number} is not JSON: {exc}")
            continue
        yield Entry(position, item_id(value, number), value)


class Group:
    """Consecutive entries on their way to one task, numbered from 0.

    A plain object rather than a list on purpose: neither Prefect (which walks task parameters looking
    for futures) nor Dask (which walks arguments looking for tasks, and rebuilds dataclasses inside
    tuples as lists) looks inside it, so a thousand items travel as one pickled value.
    """

    __slots__ = ("entries", "number")

    def __init__(self, number: int, entries: list[Entry]) -> None:
        self.number = number
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Group({self.number}, {len(self.entries)} items)"


def groups(entries: Iterable[Entry], size: int) -> Iterator[Group]:
    """Consecutive groups of ``size`` entries (the last may be shorter), without reading ahead."""
    if size < 1:
        raise ValueError("group size must be at least 1")
    iterator = iter(entries)
    for number in itertools.count():
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield Group(number, chunk)


# --------------------------------------------------------------------------------------------------
# Running a group


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What became of one item: done with a (JSON) result, or failed with an error."""

    position: int
    id: str
    ok: bool
    error: str | None = None
    result: Any = None

    def record(self) -> dict[str, Any]:
        """The item as ``Job.items`` holds it (a :class:`jobbridge.jobs.JobItem`)."""
        return {
            "id": self.id,
            "status": "COMPLETED" if self.ok else "FAILED",
            "error": self.error,
            "result": self.result,
        }


def compact_result(value: Any) -> Any:
    """``value`` as plain JSON, or a note of its size when it is too big to keep per item."""
    text = json.dumps(value, default=str)
    if len(text) > ITEM_RESULT_MAX_CHARS:
        return {"omitted": f"result of {len(text)} characters is too large to keep per item"}
    return json.loads(text)


def describe_error(exc: BaseException) -> str:
    """``ValueError: the message`` (the type tells a handler bug from a bad item)."""
    return f"{type(exc).__name__}: {exc}"


def run_group(handler: ItemHandler, entries: Iterable[Entry]) -> list[ItemOutcome]:
    """Run ``handler`` over each entry; an exception fails that item and the others carry on."""
    outcomes = []
    for entry in entries:
        if entry.error is not None:
            outcomes.append(ItemOutcome(entry.position, entry.id, False, entry.error))
            continue
        try:
            result = compact_result(handler(entry.value))
        except Exception as exc:
            outcomes.append(ItemOutcome(entry.position, entry.id, False, describe_error(exc)))
            continue
        outcomes.append(ItemOutcome(entry.position, entry.id, True, result=result))
    return outcomes


def group_failed(entries: Iterable[Entry], exc: BaseException) -> list[ItemOutcome]:
    """Every item of a group whose task failed as a whole (say, its handler is missing on the worker)."""
    error = f"the group's task failed: {describe_error(exc)}"
    return [ItemOutcome(entry.position, entry.id, False, error) for entry in entries]


# --------------------------------------------------------------------------------------------------
# The report


@dataclass
class BatchReport:
    """Exact counts of a batch, plus per-item records up to :data:`RECORD_LIMIT` (failures first)."""

    total: int
    limit: int = RECORD_LIMIT
    done: int = 0
    failed: int = 0
    _failures: list[ItemOutcome] = field(default_factory=list)
    _successes: list[ItemOutcome] = field(default_factory=list)

    def add(self, outcomes: Iterable[ItemOutcome]) -> None:
        """Count ``outcomes`` and keep their records while there is room."""
        for outcome in outcomes:
            if outcome.ok:
                self.done += 1
                if len(self._successes) < self.limit:
                    self._successes.append(outcome)
            else:
                self.failed += 1
                if len(self._failures) < self.limit:
                    self._failures.append(outcome)

    @property
    def outcome(self) -> Outcome:
        """``completed`` (no failure), ``failed`` (nothing done) or ``completed_with_errors``."""
        if self.failed == 0:
            return "completed"
        if self.done == 0:
            return "failed"
        return "completed_with_errors"

    def failures(self, limit: int | None = None) -> list[ItemOutcome]:
        """Recorded failures in item order (at most ``limit``)."""
        ordered = sorted(self._failures, key=lambda o: o.position)
        return ordered if limit is None else ordered[:limit]

    def records(self) -> list[dict[str, Any]]:
        """Per-item records for ``Job.items``, in item order: every recorded failure, then as many
        successes as fit under the limit."""
        kept = self._failures[: self.limit] + self._successes[: max(self.limit - len(self._failures), 0)]
        return [outcome.record() for outcome in sorted(kept, key=lambda o: o.position)]

    @property
    def records_truncated(self) -> bool:
        """True when some items have no per-item record (the counts still include them)."""
        return self.done + self.failed > len(self.records())

    def summary(self) -> str:
        """One line: ``3 of 10 items failed (first: #4 ValueError: ...)`` or ``all 10 items done``."""
        processed = self.done + self.failed
        if self.failed == 0:
            return f"all {processed} items done"
        first = self.failures(1)
        quoted = f" (first: item {first[0].id}: {(first[0].error or '')[:300]})" if first else ""
        if self.done == 0:
            return f"all {self.failed} items failed{quoted}"
        return f"completed with errors: {self.failed} of {processed} items failed{quoted}"

    def as_result(self, **details: Any) -> dict[str, Any]:
        """The job's JSON result: counts, outcome, the first failures, plus ``details``."""
        return {
            **details,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "outcome": self.outcome,
            "failures": [{"id": o.id, "error": o.error} for o in self.failures(RESULT_FAILURE_LIMIT)],
            "items_recorded": len(self.records()),
            "items_truncated": self.records_truncated,
        }
