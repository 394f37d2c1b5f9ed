"""The batch job's pure parts: grouping, reading items, running a group, the report, the handler registry."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobbridge.batch.grouping import (
    BatchReport,
    Entry,
    ItemOutcome,
    choose_group_size,
    count_file_items,
    entries_from_file,
    entries_from_list,
    groups,
    run_group,
)
from jobbridge.batch.handlers import (
    UnknownItemHandlerError,
    checksum,
    fail_if,
    get_item_handler,
    item_handler,
    known_item_handlers,
)
from jobbridge.errors import JobValidationError
from jobbridge.jobs import JobItem, JobStatus
from jobbridge.registry import get_spec
from jobbridge.settings import reload_settings

# --------------------------------------------------------------------------------------------------
# Grouping


@pytest.mark.parametrize(
    ("total", "concurrency", "configured", "size"),
    [
        (10_000, 4, None, 625),  # ~4 groups per slot
        (10, 4, None, 1),
        (0, 4, None, 1),
        (10_000_000, 4, None, 1000),  # bounded above
        (10_000, 4, 50, 50),  # a configured size wins
        (17, 1, None, 5),
    ],
)
def test_group_size_is_chosen_from_the_count(
    total: int, concurrency: int, configured: int | None, size: int
) -> None:
    assert choose_group_size(total, concurrency, configured) == size


def test_groups_are_consecutive_and_never_read_ahead() -> None:
    consumed = []

    def endless() -> Iterator[Entry]:
        for n in itertools.count():
            consumed.append(n)
            yield Entry(n, str(n), n)

    chunks = groups(endless(), 3)
    first, second = next(chunks), next(chunks)
    assert (first.number, [e.value for e in first.entries]) == (0, [0, 1, 2])
    assert (second.number, [e.value for e in second.entries]) == (1, [3, 4, 5])
    assert consumed == [0, 1, 2, 3, 4, 5]
    assert [len(g) for g in groups(entries_from_list(range(7)), 3)] == [3, 3, 1]
    with pytest.raises(ValueError, match="at least 1"):
        next(groups([], 0))


def test_inline_items_are_named_by_their_id_else_their_index() -> None:
    entries = list(entries_from_list([{"id": "doc-7"}, "plain", {"id": 12}, {"id": True}, {"name": "x"}]))
    assert [e.id for e in entries] == ["doc-7", "1", "12", "3", "4"]
    assert [e.position for e in entries] == [0, 1, 2, 3, 4]


def test_a_json_lines_file_is_read_lazily_and_a_bad_line_is_one_bad_item(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a", "n": 1}\n\n"second"\n{not json\n  \n42\n')
    assert count_file_items(path) == 4
    entries = list(entries_from_file(path))
    assert [(e.position, e.id) for e in entries] == [(0, "a"), (1, "3"), (2, "4"), (3, "6")]
    assert entries[1].value == "second" and entries[3].value == 42
    assert entries[2].error is not None and entries[2].error.startswith("line 4 is not JSON")


# --------------------------------------------------------------------------------------------------
# Running a group


def test_a_failing_item_fails_alone() -> None:
    entries = [
        Entry(0, "0", {"n": 1}),
        Entry(1, "bad", {"fail": True, "message": "corrupt"}),
        Entry(2, "2", 3),
    ]
    entries.append(Entry(3, "line 9", error="line 9 is not JSON"))
    outcomes = run_group(fail_if, entries)
    assert [o.ok for o in outcomes] == [True, False, True, False]
    assert outcomes[0].result == {"n": 1} and outcomes[2].result == 3
    assert outcomes[1].error == "ValueError: corrupt"
    assert outcomes[3].error == "line 9 is not JSON"


def test_results_are_kept_as_json_unless_too_big() -> None:
    (small,) = run_group(lambda item: {"path": Path("/x"), "n": 1}, [Entry(0, "0", None)])
    (big,) = run_group(lambda item: "x" * 10_000, [Entry(0, "0", None)])
    assert small.result == {"path": "/x", "n": 1}
    assert "too large" in big.result["omitted"]


# --------------------------------------------------------------------------------------------------
# The report


def outcomes(ok: int, failed: int, start: int = 0) -> list[ItemOutcome]:
    made = [ItemOutcome(start + n, str(start + n), True, result=n) for n in range(ok)]
    made += [ItemOutcome(start + ok + n, str(start + ok + n), False, f"E: {n}") for n in range(failed)]
    return made


@pytest.mark.parametrize(
    ("ok", "failed", "outcome", "summary"),
    [
        (3, 0, "completed", "all 3 items done"),
        (0, 2, "failed", "all 2 items failed (first: item 0: E: 0)"),
        (2, 1, "completed_with_errors", "completed with errors: 1 of 3 items failed (first: item 2: E: 0)"),
        (0, 0, "completed", "all 0 items done"),
    ],
)
def test_the_outcome_tells_partial_failure_apart(ok: int, failed: int, outcome: str, summary: str) -> None:
    report = BatchReport(ok + failed)
    report.add(outcomes(ok, failed))
    assert report.outcome == outcome and report.summary() == summary


def test_records_keep_failures_first_and_counts_stay_exact() -> None:
    report = BatchReport(30, limit=5)
    report.add(outcomes(20, 0))
    report.add(outcomes(0, 3, start=20))
    report.add(outcomes(7, 0, start=23))
    records = report.records()
    assert len(records) == 5 and report.records_truncated
    assert [r["id"] for r in records] == ["0", "1", "20", "21", "22"]  # every failure kept, in item order
    assert (report.done, report.failed) == (27, 3)
    for record in records:
        JobItem.model_validate(record)  # what Job.items reads
    result = report.as_result(handler="echo")
    assert result["handler"] == "echo" and result["outcome"] == "completed_with_errors"
    assert result["failures"] == [
        {"id": "20", "error": "E: 0"},
        {"id": "21", "error": "E: 1"},
        {"id": "22", "error": "E: 2"},
    ]
    assert result["items_recorded"] == 5 and result["items_truncated"]
    assert JobItem.model_validate(records[2]).status is JobStatus.FAILED


# --------------------------------------------------------------------------------------------------
# Handlers


def test_builtin_handlers_are_registered() -> None:
    assert {"echo", "checksum", "fail-if"} <= set(known_item_handlers())
    assert get_item_handler("echo")({"a": 1}) == {"a": 1}


def test_checksum_hashes_the_file_an_item_names(tmp_path: Path) -> None:
    path = tmp_path / "doc.bin"
    path.write_bytes(b"jobbridge" * 1000)
    expected = {"path": str(path), "sha256": hashlib.sha256(b"jobbridge" * 1000).hexdigest(), "bytes": 9000}
    assert checksum(str(path)) == expected
    assert checksum({"path": str(path), "id": "d1"}) == expected
    with pytest.raises(FileNotFoundError, match="not an existing regular file"):
        checksum(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="file path"):
        checksum({"name": "x"})


def test_a_decorated_handler_registers_and_unknown_names_list_the_known_ones() -> None:
    @item_handler("unit-double")
    def double(item: Any) -> Any:
        return item * 2

    assert get_item_handler("unit-double") is double
    with pytest.raises(
        UnknownItemHandlerError, match=r"unknown item handler 'nope'; known item handlers: .*echo"
    ):
        get_item_handler("nope")
    with pytest.raises(ValueError, match="lower-case"):
        item_handler("Bad Name")


def test_handlers_of_plugin_modules_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "unit_batch_plugin.py").write_text(
        "from jobbridge.batch import item_handler\n\n"
        "@item_handler('unit-from-plugin')\n"
        "def shout(item):\n"
        "    return str(item).upper()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("JOBBRIDGE_PLUGINS", "unit_batch_plugin")
    reload_settings()
    try:
        assert get_item_handler("unit-from-plugin")("hi") == "HI"
    finally:
        monkeypatch.undo()
        reload_settings()
        sys.modules.pop("unit_batch_plugin", None)


def test_batch_parameters_name_the_field_at_fault(tmp_path: Path) -> None:
    spec = get_spec("batch")
    with pytest.raises(JobValidationError, match="parameter 'handler' unknown item handler 'nope'"):
        spec.validate_parameters({"handler": "nope", "items": [1]})
    with pytest.raises(
        JobValidationError, match="parameter 'items' give exactly one of items and items_file"
    ):
        spec.validate_parameters({"handler": "echo"})
    with pytest.raises(JobValidationError, match="parameter 'items_file' must be an existing file"):
        spec.validate_parameters({"handler": "echo", "items_file": str(tmp_path / "none.jsonl")})
    with pytest.raises(JobValidationError, match="parameter 'items' holds 10001 items, more than 10000"):
        spec.validate_parameters({"handler": "echo", "items": list(range(10_001))})
    with pytest.raises(JobValidationError, match="parameter 'group_size'"):
        spec.validate_parameters({"handler": "echo", "items": [1], "group_size": 0})
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": 1}) + "\n")
    assert spec.validate_parameters({"handler": "echo", "items_file": str(items)})["items_file"] == str(items)
