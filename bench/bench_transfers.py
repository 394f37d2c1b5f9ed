"""Benchmark of the transfer jobs (sync, upload) against rclone and cp of the same data, in the same run.

    python bench/bench_transfers.py [--size-mb 1024] [--repeat 3] [--workdir /tmp/jobbridge-bench-transfers]

Generates (once, reused while its size matches) a tree under the workdir: half the bytes in 64 MiB files,
half in 256 KiB - 8 MiB files, random content. Starts its own moto_server (S3) on a free port. Then, on a
warm page cache, in ``--repeat`` interleaved rounds with an untimed ``sync`` (and a wipe of the
destination) before every run, it times:

1. local -> local: our ``sync`` (jobbridge's rclone driver: argv, environment, JSON log and stats parsing,
   progress) against plain ``rclone copy``; our ``upload`` (copy with SHA-256 in the same pass into a
   staged dataset directory, published by rename) against ``cp -r`` and ``rclone copy``;
2. local -> moto S3: our ``sync`` against ``rclone copy`` to the same endpoint; our ``upload`` into an
   ``s3://`` dataset store against ``rclone copy``.

"Ours" is the task code without Prefect (``task.fn``); then each flow runs once in-process (an ephemeral
Prefect API unless PREFECT_API_URL is set, heartbeats off as jobbridge runs in-process jobs) to show what
orchestration adds, and ``sync`` once more with its ``rclone check`` pass. MB/s is input bytes (10^6) per
second; ratio is ours / baseline in speed (higher is better), as a ratio of medians and as the median of
per-round ratios ("paired", the steadier one on a shared machine). Target: sync >= 0.9x rclone. Results,
every run's time included, go to ``bench/results/transfers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "transfers.json"
SEED = 20261126
BUCKET = "jobbridge-bench"
Step = Callable[[], None]


# --------------------------------------------------------------------------------------------------
# Data


def generate_tree(tree: Path, size_bytes: int) -> int:
    """Half the bytes in 64 MiB files, half in 256 KiB - 8 MiB files; returns the file count."""
    rng = random.Random(SEED)
    count = 0
    big, written = size_bytes // 2, 0
    while written < big:
        size = min(64 << 20, big - written)
        _write(tree / "volumes" / f"vol-{count:03d}.raw", rng, size)
        written, count = written + size, count + 1
    written = 0
    while written < size_bytes - big:
        size = min(rng.randint(256 << 10, 8 << 20), size_bytes - big - written)
        _write(tree / "frames" / f"d{count // 50:02d}" / f"frame-{count:05d}.tif", rng, size)
        written, count = written + size, count + 1
    return count


def _write(path: Path, rng: random.Random, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            piece = min(remaining, 16 << 20)
            out.write(rng.randbytes(piece))
            remaining -= piece


def ensure_tree(workdir: Path, size_mb: int) -> tuple[Path, dict[str, Any]]:
    """The benchmark tree, generated only when missing or of another size."""
    tree, marker = workdir / "tree", workdir / "tree.json"
    size_bytes = size_mb * (1 << 20)
    if marker.exists():
        info: dict[str, Any] = json.loads(marker.read_text())
        if info.get("size_bytes") == size_bytes and tree.is_dir():
            return tree, info
    shutil.rmtree(tree, ignore_errors=True)
    print(f"generating {size_mb} MiB under {tree} ...", flush=True)
    info = {"size_bytes": size_bytes, "files": generate_tree(tree, size_bytes)}
    marker.write_text(json.dumps(info))
    return tree, info


# --------------------------------------------------------------------------------------------------
# moto


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A moto_server on a free port; returns it and its URL once it answers."""
    port = free_port()
    script = Path(sys.executable).with_name("moto_server")
    log = open(workdir / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [sys.executable, str(script), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return process, url
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"moto_server did not start; see {workdir / 'moto.log'}") from None
            time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One operation: our runs and each baseline's runs (interleaved rounds), and the flow's runs."""

    name: str
    ours_times: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    flows: dict[str, float] = field(default_factory=dict)

    @property
    def ours(self) -> float:
        """Median of our runs (medians resist this shared machine's noise both ways)."""
        return statistics.median(self.ours_times)


def timed(run: Step, reset: Step) -> float:
    """Wall time of ``run`` after the untimed ``reset``."""
    reset()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare(name: str, rounds: int, ours: Step, baselines: dict[str, Step], reset: Step) -> Row:
    """``rounds`` rounds of ours and each baseline, interleaved so that drift hits all alike, and in
    alternating order (ours first in odd rounds, last in even ones) so neither always runs first."""
    row = Row(name, baselines={label: [] for label in baselines})
    for number in range(rounds):
        if number % 2 == 0:
            row.ours_times.append(timed(ours, reset))
        for label, run in baselines.items():
            row.baselines[label].append(timed(run, reset))
        if number % 2 == 1:
            row.ours_times.append(timed(ours, reset))
    return row


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median over rounds of baseline time / our time: runs of one round ran seconds apart, so their
    ratio is less exposed to the load other users put on this shared machine than a ratio of medians."""
    return statistics.median(b / o for o, b in zip(ours, baseline, strict=True))


def command(argv: list[str], env: dict[str, str] | None = None) -> Step:
    def run() -> None:
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)

    return run


def wipe_local(path: Path) -> Step:
    def reset() -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()

    return reset


def wipe_bucket(s3: Any) -> Step:
    def reset() -> None:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
        os.sync()

    return reset


def rclone_s3_env(endpoint: str) -> dict[str, str]:
    """Plain rclone's environment for the moto remote (what a user would configure by hand)."""
    env = {key: value for key, value in os.environ.items() if key != "AWS_CA_BUNDLE"}
    env.update(
        {
            "RCLONE_CONFIG": os.devnull,
            "RCLONE_CONFIG_MOTO_TYPE": "s3",
            "RCLONE_CONFIG_MOTO_PROVIDER": "Other",
            "RCLONE_CONFIG_MOTO_ENDPOINT": endpoint,
            "RCLONE_CONFIG_MOTO_ACCESS_KEY_ID": "testing",
            "RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY": "testing",
            "RCLONE_CONFIG_MOTO_REGION": "us-east-1",
            "RCLONE_CONFIG_MOTO_FORCE_PATH_STYLE": "true",
        }
    )
    return env


def upload_parameters(tree: Path, destination: str) -> dict[str, Any]:
    return {
        "source": str(tree),
        "user_email": "bench@example.org",
        "dataset_name": "bench",
        "sensor": "OTHER",
        "convert": False,
        "is_public": False,
        "destination": destination,
        "dataset_uuid": "bench",
    }


def measure(tree: Path, work: Path, repeat: int, endpoint: str | None) -> list[Row]:
    """Every comparison, pure task code against the baseline commands."""
    from jobbridge.flows.sync import SyncParameters, rclone_transfer
    from jobbridge.flows.upload import UploadParameters, upload_to_store

    rows = []
    out = work / "out"
    sync_local = SyncParameters(source=str(tree), destination=str(out / "synced"), checksum=False)
    rows.append(
        compare(
            "sync local -> local",
            repeat,
            lambda: rclone_transfer.fn(sync_local),
            {"rclone copy": command(["rclone", "copy", str(tree), str(out / "rclone")])},
            wipe_local(out),
        )
    )
    upload_local = UploadParameters.model_validate(upload_parameters(tree, str(out / "store")))
    rows.append(
        compare(
            "upload local -> local (+SHA-256)",
            repeat,
            lambda: upload_to_store.fn(upload_local),
            {
                "cp -r": command(["cp", "-r", str(tree), str(out)]),
                "rclone copy": command(["rclone", "copy", str(tree), str(out / "rclone")]),
            },
            wipe_local(out),
        )
    )
    if endpoint is None:
        return rows
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    env = rclone_s3_env(endpoint)
    sync_s3 = SyncParameters(source=str(tree), destination=f"s3://{BUCKET}/synced", checksum=False)
    rclone_to_s3 = command(["rclone", "copy", str(tree), f"moto:{BUCKET}/rclone"], env)
    rows.append(
        compare(
            "sync local -> moto S3",
            repeat,
            lambda: rclone_transfer.fn(sync_s3),
            {"rclone copy": rclone_to_s3},
            wipe_bucket(s3),
        )
    )
    upload_s3 = UploadParameters.model_validate(upload_parameters(tree, f"s3://{BUCKET}/store"))
    rows.append(
        compare(
            "upload local -> moto S3 (+SHA-256)",
            repeat,
            lambda: upload_to_store.fn(upload_s3),
            {"rclone copy": rclone_to_s3},
            wipe_bucket(s3),
        )
    )
    return rows


def measure_flows(tree: Path, work: Path, rows: list[Row], endpoint: str | None) -> None:
    """Each flow once, in-process through Prefect (heartbeats off, as jobbridge runs in-process jobs)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from jobbridge.flows.sync import sync
    from jobbridge.flows.upload import upload

    with get_client(sync_client=True) as client:  # start (or reach) the API before timing
        client.hello()
    out = work / "out"
    runs: dict[str, list[tuple[str, Callable[[], object], Step]]] = {
        "sync local -> local": [
            (
                "flow",
                lambda: sync(source=str(tree), destination=str(out / "f"), checksum=False),
                wipe_local(out),
            ),
            ("flow + check", lambda: sync(source=str(tree), destination=str(out / "f")), wipe_local(out)),
        ],
        "upload local -> local (+SHA-256)": [
            ("flow", lambda: upload(**upload_parameters(tree, str(out / "store"))), wipe_local(out)),
        ],
    }
    if endpoint is not None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        runs["sync local -> moto S3"] = [
            (
                "flow",
                lambda: sync(source=str(tree), destination=f"s3://{BUCKET}/f", checksum=False),
                wipe_bucket(s3),
            ),
            ("flow + check", lambda: sync(source=str(tree), destination=f"s3://{BUCKET}/f"), wipe_bucket(s3)),
        ]
        runs["upload local -> moto S3 (+SHA-256)"] = [
            ("flow", lambda: upload(**upload_parameters(tree, f"s3://{BUCKET}/store")), wipe_bucket(s3)),
        ]
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for row in rows:
            for label, run, reset in runs.get(row.name, []):
                row.flows[label] = timed(run, reset)  # type: ignore[arg-type]
                reset()


# --------------------------------------------------------------------------------------------------
# Reporting


def report(rows: list[Row], data_bytes: int, info: dict[str, Any]) -> dict[str, Any]:
    """Print the table and return the JSON document."""
    mb = data_bytes / 1e6
    header = (
        f"{'operation':36} {'ours MB/s':>9} {'baseline':>12} {'MB/s':>7} {'ratio':>6} {'paired':>6}   "
        "flows (MB/s, ratio)"
    )
    print(header)
    print("-" * (len(header) + 10))
    out_rows = []
    for row in rows:
        first = True
        for label, times in row.baselines.items():
            base = statistics.median(times)
            flows = ", ".join(f"{name} {mb / t:.0f} ({base / t:.2f}x)" for name, t in row.flows.items())
            ours = f"{mb / row.ours:9.0f}" if first else " " * 9
            name, shown = (row.name, flows) if first else ("", "")
            pair = paired_ratio(row.ours_times, times)
            print(
                f"{name:36} {ours} {label:>12} {mb / base:7.0f} {base / row.ours:6.2f} {pair:6.2f}   {shown}"
            )
            first = False
        out_rows.append(
            {
                "operation": row.name,
                "ours_seconds": round(row.ours, 3),
                "ours_runs": [round(t, 3) for t in row.ours_times],
                "ours_mb_per_s": round(mb / row.ours, 1),
                "baselines": {
                    label: {
                        "seconds": round(statistics.median(times), 3),
                        "runs": [round(t, 3) for t in times],
                        "mb_per_s": round(mb / statistics.median(times), 1),
                        "ratio": round(statistics.median(times) / row.ours, 3),
                        "paired_ratio": round(paired_ratio(row.ours_times, times), 3),
                    }
                    for label, times in row.baselines.items()
                },
                "flows": {
                    name: {"seconds": round(t, 3), "mb_per_s": round(mb / t, 1)}
                    for name, t in row.flows.items()
                },
            }
        )
    sync_ratios = [
        r["baselines"]["rclone copy"]["paired_ratio"] for r in out_rows if r["operation"].startswith("sync")
    ]
    paired = ", ".join(f"{x:.2f}x" for x in sync_ratios)
    print(f"\nsync vs rclone copy, median of per-round ratios: {paired} (target >= 0.9x)")
    return {
        "benchmark": "transfers",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rclone": subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.splitlines()[
            0
        ],
        "tree": info,
        "data_bytes": data_bytes,
        "rows": out_rows,
        "sync_target_met": all(ratio >= 0.9 for ratio in sync_ratios),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="data size in MiB (default 1024)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jobbridge-bench-transfers"))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians kept)")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 comparisons")
    parser.add_argument("--no-flows", action="store_true", help="skip the in-process flow runs")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["RCLONE_CONFIG"] = os.devnull  # plain rclone reads no user config either
    os.environ["JOBBRIDGE_HOME"] = str(workdir / "home")
    tree, info = ensure_tree(workdir, args.size_mb)
    work = workdir / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    moto, endpoint = (None, None) if args.no_s3 else start_moto(workdir)
    try:
        if endpoint is not None:
            os.environ["JOBBRIDGE_AWS_ENDPOINT_URL"] = endpoint  # the jobs' default S3 endpoint
        rows = measure(tree, work, args.repeat, endpoint)
        if not args.no_flows:
            measure_flows(tree, work, rows, endpoint)
    finally:
        if moto is not None:
            stop(moto)
        shutil.rmtree(work, ignore_errors=True)
    document = report(rows, info["size_bytes"], info)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
