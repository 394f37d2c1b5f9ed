"""Benchmark of the batch job's grouping against one Prefect task run per item, in the same run.

    python bench/bench_batch.py [--items 10000] [--baseline-items 1000] [--rounds 1] [--concurrency 4]

Both sides run the same tiny work (the ``echo`` item handler) on the same thread-pool width, against the
same Prefect API (an ephemeral one in a temporary PREFECT_HOME unless PREFECT_API_URL is set):

* ours: the ``batch`` flow over ``--items`` items (default 10,000), grouped as the flow chooses
  (about four groups per concurrent slot, so a few dozen task runs), given inline (``items``: Prefect
  validates and stores them as flow-run parameters) and again as a JSON-lines ``items_file`` (the
  big-batch path: only a path crosses Prefect);
* baseline: a plain Prefect flow that maps one task run per item (``echo_item.map(items)``) on a
  ``ThreadPoolTaskRunner`` of the same width, over ``--baseline-items`` items (default 1,000: at tens of
  milliseconds per task run, 10,000 would take minutes). Its items/s is *extrapolated* to the full count
  (a per-item task run costs the same whatever the batch size).

Rates are items/s over the whole flow call (creating the run, the fan-out, the artifacts, the exit);
"of which the fan-out" is the batch flow's own measure of the fan-out alone. The ratio is ours (inline
items, the slower of our two) / baseline (target >= 10). Results go to ``bench/results/batch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "batch.json"
TARGET_RATIO = 10.0


def _prepare_environment(home: Path) -> None:
    """Prefect reads its settings at import: fix its home and quiet its logs first."""
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a shared, busy machine
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")  # no shutdown noise at exit
    os.environ.setdefault("JOBBRIDGE_HOME", str(home / "jobbridge"))


def measure(items: int, baseline_items: int, rounds: int, concurrency: int, work: Path) -> dict[str, Any]:
    """Interleaved rounds of ours and the baseline; every run's time and the medians."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ThreadPoolTaskRunner

    from jobbridge.batch.handlers import echo
    from jobbridge.flows.batch import batch
    from jobbridge.settings import reload_settings

    os.environ["JOBBRIDGE_BATCH_CONCURRENCY"] = str(concurrency)
    os.environ.pop("JOBBRIDGE_DASK_ADDRESS", None)
    os.environ.pop("JOBBRIDGE_BATCH_GROUP_SIZE", None)
    reload_settings()

    @task(name="echo-item", cache_policy=NO_CACHE)
    def echo_item(item: Any) -> Any:
        return echo(item)

    @flow(name="per-item-baseline", task_runner=ThreadPoolTaskRunner(max_workers=concurrency))
    def per_item(values: list[Any]) -> int:
        futures = echo_item.map(values)
        return len([future.result() for future in futures])

    def recorded(flow_run_id: Any) -> int:
        """Task runs of the flow run the server has recorded as completed (it records them from
        events, after the client has moved on)."""
        body = {
            "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        }
        with get_client(sync_client=True) as client:
            return int(client.request("POST", "/task_runs/count", json=body).json())

    def drain(flow_run_id: Any, expected: int) -> float:
        """Poll until the server has caught up with the baseline's task runs; how long that took."""
        started = time.perf_counter()
        deadline = started + 600
        while recorded(flow_run_id) < expected:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the server recorded fewer than {expected} task runs in 600 s")
            time.sleep(0.5)
        return time.perf_counter() - started

    with get_client(sync_client=True) as client:  # start (or reach) the API before timing
        client.hello()
    ours_items = [{"id": f"doc-{n}", "n": n} for n in range(items)]
    base_items = ours_items[:baseline_items]
    items_file = work / "items.jsonl"
    items_file.write_text("".join(json.dumps(item) + "\n" for item in ours_items))
    ours_runs: list[float] = []
    fan_out_runs: list[float] = []
    file_runs: list[float] = []
    base_runs: list[float] = []
    drain_runs: list[float] = []
    details: dict[str, Any] = {}
    for round_number in range(rounds):
        started = time.perf_counter()
        result = batch(handler="echo", items=ours_items)
        ours_runs.append(time.perf_counter() - started)
        assert isinstance(result, dict) and result["done"] == items, result
        fan_out_runs.append(result["seconds"])
        details = {key: result[key] for key in ("group_size", "groups", "concurrency", "runner")}
        started = time.perf_counter()
        from_file = batch(handler="echo", items_file=items_file)
        file_runs.append(time.perf_counter() - started)
        assert isinstance(from_file, dict) and from_file["done"] == items, from_file
        started = time.perf_counter()
        state = per_item(base_items, return_state=True)
        base_runs.append(time.perf_counter() - started)
        assert state.is_completed() and state.result() == baseline_items
        # Not part of the baseline's time, but a cost of it: the server is still recording its task
        # runs; the next round must not start against a backlog (SQLite answers 503 meanwhile).
        drain_runs.append(drain(state.state_details.flow_run_id, baseline_items))
        print(
            f"round {round_number + 1}: ours {ours_runs[-1]:.2f} s for {items} items "
            f"(fan-out {fan_out_runs[-1]:.2f} s; from a file {file_runs[-1]:.2f} s), "
            f"baseline {base_runs[-1]:.2f} s for {baseline_items} items "
            f"(+{drain_runs[-1]:.1f} s until the server had recorded them)",
            flush=True,
        )
    return {
        "ours_seconds": statistics.median(ours_runs),
        "ours_fan_out_seconds": statistics.median(fan_out_runs),
        "ours_file_seconds": statistics.median(file_runs),
        "baseline_seconds": statistics.median(base_runs),
        "ours_runs": [round(t, 3) for t in ours_runs],
        "ours_fan_out_runs": [round(t, 3) for t in fan_out_runs],
        "ours_file_runs": [round(t, 3) for t in file_runs],
        "baseline_runs": [round(t, 3) for t in base_runs],
        "baseline_server_drain_runs": [round(t, 3) for t in drain_runs],
        "grouping": details,
    }


def report(measured: dict[str, Any], items: int, baseline_items: int) -> dict[str, Any]:
    """Print the table and return the JSON document."""
    ours_rate = items / measured["ours_seconds"]
    fan_out_rate = items / measured["ours_fan_out_seconds"]
    base_rate = baseline_items / measured["baseline_seconds"]
    ratio = ours_rate / base_rate
    grouping = measured["grouping"]
    rows = [
        (
            f"ours: batch flow ({grouping['groups']} groups of {grouping['group_size']})",
            items,
            measured["ours_seconds"],
        ),
        ("  of which the fan-out", items, measured["ours_fan_out_seconds"]),
        ("ours: the same from an items_file", items, measured["ours_file_seconds"]),
        ("baseline: one task run per item", baseline_items, measured["baseline_seconds"]),
        (f"  extrapolated to {items} items", items, items / base_rate),
    ]
    print(f"\n{'':42} {'items':>7} {'seconds':>9} {'items/s':>9}")
    for label, count, seconds in rows:
        print(f"{label:42} {count:7} {seconds:9.2f} {count / seconds:9.0f}")
    print(f"\nratio ours / baseline: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x)")
    extrapolated = items / base_rate
    return {
        "benchmark": "batch",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "handler": "echo",
        "items": items,
        "baseline_items": baseline_items,
        "baseline_extrapolated": baseline_items != items,
        "ours_items_per_s": round(ours_rate, 1),
        "ours_fan_out_items_per_s": round(fan_out_rate, 1),
        "ours_file_items_per_s": round(items / measured["ours_file_seconds"], 1),
        "ratio_items_file": round(items / measured["ours_file_seconds"] / base_rate, 2),
        "baseline_items_per_s": round(base_rate, 1),
        "baseline_extrapolated_seconds": round(extrapolated, 2),
        "ratio": round(ratio, 2),
        "target_met": ratio >= TARGET_RATIO,
        **measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000, help="items in our batch (default 10000)")
    parser.add_argument(
        "--baseline-items", type=int, default=1_000, help="items of the per-item baseline (extrapolated)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians kept)")
    parser.add_argument("--concurrency", type=int, default=4, help="thread-pool width of both sides")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jobbridge-bench-batch-") as home:
        _prepare_environment(Path(home))
        measured = measure(args.items, args.baseline_items, args.rounds, args.concurrency, Path(home))
    document = report(measured, args.items, args.baseline_items)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
