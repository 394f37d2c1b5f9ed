"""Benchmark: what jobbridge adds to a job's life, against bare Prefect measured in the same run.

(a) a no-op job submitted in-process (``submit(..., wait=True)``) vs the same body as a bare Prefect flow
    call, median of N calls each (the bare flow with Prefect's default heartbeat, and with heartbeats off);
(b) submit -> RUNNING and submit -> COMPLETED through the local work pool, p50 and p90, with jobbridge's
    worker vs a stock ``prefect worker start --type process`` (default settings) on the same server.

Run: ``python bench/bench_submit.py [--runs 20]``. Starts its own embedded stack on free ports in a temporary
home and stops it at the end. Prints a table with ratios and writes bench/results/submit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_environment(home: Path) -> None:
    """Fix ports, homes and plugins before Prefect is imported (it reads settings at import)."""
    port = _free_port()
    os.environ.update(
        {
            "PREFECT_HOME": str(home / "prefect-client"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "JOBBRIDGE_HOME": str(home / "stack"),
            "JOBBRIDGE_PREFECT_PORT": str(port),
            "JOBBRIDGE_MOTO_PORT": str(_free_port()),
            "JOBBRIDGE_MONGO_PORT": str(_free_port()),
            "JOBBRIDGE_PLUGINS": "bench_jobs",
            "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p),
        }
    )
    sys.path.insert(0, str(BENCH_DIR))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def timed(call: Any, runs: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``call()`` over ``runs`` calls, after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def bench_in_process(runs: int) -> dict[str, Any]:
    """(a): jobbridge in-process submit vs a bare Prefect flow call with the same body."""
    from bench_jobs import bare_noop
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from jobbridge import control
    from jobbridge.jobs import Job, JobStatus
    from jobbridge.settings import get_settings

    settings = get_settings().model_copy(update={"execution": "inprocess"})

    def ours() -> None:
        job = control.submit(Job(name="noop", type="bench-noop"), wait=True, settings=settings)
        assert job.status is JobStatus.COMPLETED, job

    def bare() -> None:
        assert bare_noop(1) == {"value": 2}

    # Heartbeats off for the whole loop, so the baseline does not pay for building settings per call.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        bare_without_heartbeat = statistics.median(timed(bare, runs))
    result = {
        "jobbridge_submit_inprocess_s": statistics.median(timed(ours, runs)),
        "bare_flow_default_s": statistics.median(timed(bare, runs)),
        "bare_flow_no_heartbeat_s": bare_without_heartbeat,
        "runs": runs,
    }
    result["ratio_vs_bare_default"] = result["jobbridge_submit_inprocess_s"] / result["bare_flow_default_s"]
    result["ratio_vs_bare_no_heartbeat"] = (
        result["jobbridge_submit_inprocess_s"] / result["bare_flow_no_heartbeat_s"]
    )
    return result


def _latencies(client: Any, run_id: Any, submitted: float, deadline_s: float = 120) -> tuple[float, float]:
    """Seconds from ``submitted`` (epoch) to the run's RUNNING and COMPLETED timestamps on the server."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            if run.state.type.value != "COMPLETED" or run.start_time is None or run.end_time is None:
                raise RuntimeError(f"run {run_id} ended {run.state.type.value}: {run.state.message}")
            return run.start_time.timestamp() - submitted, run.end_time.timestamp() - submitted
        time.sleep(0.05)
    raise TimeoutError(f"run {run_id} did not finish within {deadline_s} s")


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    running = [s[0] for s in samples]
    completed = [s[1] for s in samples]
    return {
        "running_p50_s": percentile(running, 50),
        "running_p90_s": percentile(running, 90),
        "completed_p50_s": percentile(completed, 50),
        "completed_p90_s": percentile(completed, 90),
        "runs": len(samples),
    }


def bench_pool_ours(runs: int) -> dict[str, float]:
    """(b), ours: ``submit`` through the stack's pool and jobbridge worker."""
    from prefect.client.orchestration import get_client

    from jobbridge import control
    from jobbridge.jobs import Job
    from jobbridge.settings import get_settings

    settings = get_settings().model_copy(update={"execution": "pool"})
    samples = []
    with get_client(sync_client=True) as client:
        for index in range(runs + 1):
            submitted = time.time()
            job = control.submit(Job(name=f"lat-{index}", type="bench-noop"), settings=settings)
            sample = _latencies(client, job.id, submitted)
            if index:  # the first run also creates the deployment: not measured
                samples.append(sample)
    return _summary(samples)


def _start_stock_worker(pool: str, log: Path) -> subprocess.Popen[bytes]:
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_WORKER_")}
    return subprocess.Popen(
        [prefect, "worker", "start", "--pool", pool, "--type", "process"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Signal, wait, signal again, then SIGKILL the whole group (see ARCHITECTURE.md)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def bench_pool_stock(runs: int, home: Path) -> dict[str, float]:
    """(b), baseline: ``run_deployment`` of the bare flow through a stock process worker."""
    from bench_jobs import bare_noop
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.deployments import run_deployment

    from jobbridge.deployments import create_work_pool
    from jobbridge.settings import get_settings

    stock = get_settings().model_copy(update={"work_pool": "bench-stock"})
    worker = None
    with get_client(sync_client=True) as client:
        create_work_pool(client, stock)
        flow_id = client.create_flow(bare_noop)
        client.create_deployment(
            flow_id=flow_id,
            name="stock",
            work_pool_name="bench-stock",
            entrypoint="bench_jobs:bare_noop",
        )
        try:
            worker = _start_stock_worker("bench-stock", home / "stock-worker.log")
            deadline = time.monotonic() + 60
            while client.read_work_pool("bench-stock").status != WorkPoolStatus.READY:
                if time.monotonic() > deadline:
                    raise TimeoutError("the stock worker did not come online in 60 s")
                time.sleep(0.2)
            samples = []
            for index in range(runs + 1):
                submitted = time.time()
                run = run_deployment("bare-noop/stock", timeout=0, parameters={"value": index})
                sample = _latencies(client, run.id, submitted)
                if index:
                    samples.append(sample)
        finally:
            if worker is not None:
                _stop(worker)
    return _summary(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="measured runs per variant (default 20)")
    parser.add_argument("--skip-stock", action="store_true", help="skip the stock-worker baseline")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="jobbridge-bench-"))
    _prepare_environment(home)
    from jobbridge.settings import reload_settings
    from jobbridge.stack import Stack

    stack = Stack(reload_settings())
    started = time.perf_counter()
    stack.up()
    results: dict[str, Any] = {"stack_up_s": time.perf_counter() - started}
    try:
        results["in_process"] = bench_in_process(args.runs)
        results["pool_jobbridge"] = bench_pool_ours(args.runs)
        if not args.skip_stock:
            results["pool_stock_prefect"] = bench_pool_stock(args.runs, home)
    finally:
        stack.down()
    _report(results)
    out = BENCH_DIR / "results" / "submit.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


def _report(results: dict[str, Any]) -> None:
    a = results["in_process"]
    print(f"\n(a) no-op job in-process, median of {a['runs']} calls")
    print(f"  jobbridge submit(wait=True)        {a['jobbridge_submit_inprocess_s'] * 1000:8.1f} ms")
    print(f"  bare Prefect flow (default)        {a['bare_flow_default_s'] * 1000:8.1f} ms")
    print(f"  bare Prefect flow (no heartbeat)   {a['bare_flow_no_heartbeat_s'] * 1000:8.1f} ms")
    print(
        f"  ratio vs default: {a['ratio_vs_bare_default']:.2f}x   "
        f"vs no heartbeat: {a['ratio_vs_bare_no_heartbeat']:.2f}x   (target <= 1.1x)"
    )
    ours = results["pool_jobbridge"]
    print(f"\n(b) through the local work pool, {ours['runs']} sequential runs")
    print(f"  {'':28} {'RUNNING p50':>12} {'p90':>8} {'COMPLETED p50':>14} {'p90':>8}")
    rows = [("jobbridge worker", ours)]
    if "pool_stock_prefect" in results:
        rows.append(("stock prefect process worker", results["pool_stock_prefect"]))
    for label, row in rows:
        print(
            f"  {label:28} {row['running_p50_s']:11.2f}s {row['running_p90_s']:7.2f}s "
            f"{row['completed_p50_s']:13.2f}s {row['completed_p90_s']:7.2f}s"
        )
    if "pool_stock_prefect" in results:
        stock = results["pool_stock_prefect"]
        print(
            f"  ratio stock/jobbridge, RUNNING p50: {stock['running_p50_s'] / ours['running_p50_s']:.1f}x "
            f"(target: jobbridge RUNNING p50 <= 2 s)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
