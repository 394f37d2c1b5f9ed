"""Benchmark: a chunked upload through the upload API on loopback against ``cp`` of the same file.

    python bench/bench_upload_api.py [--size-gb 2] [--repeat 3] [--parallel 4] [--workdir DIR]

Starts its own embedded stack (Prefect server and worker, on free ports, in a temporary home) and a
``jobbridge api`` process, writes a file of random bytes (reused while its size matches), and then, in
``--repeat`` interleaved rounds on the same warm page cache, each after an untimed ``sync``:

1. ``cp FILE COPY`` (coreutils: an in-kernel ``copy_file_range``);
2. ``UploadClient.upload(FILE)``: initiate, 64 MiB chunks ``--parallel`` at a time each with its SHA-256,
   ``complete`` (the server's whole-file SHA-256, checked against the file's), until the job is submitted.
   The job (a rename into the dataset store) is timed apart.

Rates are MB/s (10^6 bytes); the ratio is cp time / upload time (higher is better, target >= 0.5), medians
compared. The API's resident memory is sampled every 20 ms during the uploads (peak), and VmHWM (the
process's high-water mark since start) is read at the end (target < 200 MB). CPU seconds of the API process
and of this (client) process per round show where the time goes. Results go to
``bench/results/upload_api.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "upload_api.json"
MB = 1_000_000
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_environment(home: Path) -> None:
    """Ports, homes and settings for the stack and the API, fixed before Prefect is imported."""
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
            "XDG_CACHE_HOME": str(home / "cache"),
        }
    )


def _make_file(path: Path, size: int) -> str:
    """A file of random bytes (kept for the next run while its size matches); returns its SHA-256."""
    digest = hashlib.sha256()
    if path.exists() and path.stat().st_size == size:
        with open(path, "rb") as handle:
            while block := handle.read(64 * MiB):
                digest.update(block)
        return digest.hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(64 * MiB, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's VmRSS every 20 ms while running; ``peak_mb`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def _start_api(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    log = open(home / "api.log", "wb")  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("jobbridge")),
            "api",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start: {(home / 'api.log').read_text()[-2000:]}")
        time.sleep(0.2)


def _upload_round(client: Any, source: Path, expected: str, parallel: int, api_pid: int) -> dict[str, Any]:
    api_cpu, own_cpu = _cpu_seconds(api_pid), _own_cpu()
    started = time.perf_counter()
    result = client.upload(
        source, user_email="bench@example.edu", dataset_name="bench", sensor="OTHER", parallel=parallel
    )
    elapsed = time.perf_counter() - started
    row = {
        "upload_s": elapsed,
        "api_cpu_s": _cpu_seconds(api_pid) - api_cpu,
        "client_cpu_s": _own_cpu() - own_cpu,
        "sha256_ok": result.sha256 == expected,
        "upload_type": result.upload_type,
    }
    if not row["sha256_ok"]:
        raise RuntimeError(f"SHA-256 mismatch: server {result.sha256}, file {expected}")
    job_started = time.perf_counter()
    final = client.wait_for_completion(result.job_id, timeout=600, poll=0.1)
    row["job_s"] = time.perf_counter() - job_started
    if final["status"] != "completed":
        raise RuntimeError(f"the upload job ended {final['status']}: {final.get('error')}")
    stored = Path(final["result"]["destination"]) / final["result"]["files"][0]["path"]
    stored.unlink()
    return row


def _cp_round(source: Path, copy: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(copy)], check=True)
    elapsed = time.perf_counter() - started
    copy.unlink()
    return elapsed


def run(size: int, repeat: int, parallel: int, workdir: Path) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="jobbridge-bench-upload-", dir=workdir))
    _prepare_environment(home)
    from jobbridge.client import UploadClient
    from jobbridge.settings import reload_settings
    from jobbridge.stack import Stack

    source = workdir / f"upload-{size}.bin"
    print(f"preparing {size / MB:.0f} MB of random bytes in {source} ...", flush=True)
    expected = _make_file(source, size)
    stack = Stack(reload_settings())
    stack.up()
    api, url = _start_api(home)
    rows: list[dict[str, Any]] = []
    cps: list[float] = []
    try:
        with UploadClient(url) as client, RssSampler(api.pid) as rss:
            for round_no in range(repeat):
                _sync()
                cps.append(_cp_round(source, workdir / "cp-copy.bin"))
                _sync()
                rows.append(_upload_round(client, source, expected, parallel, api.pid))
                print(
                    f"round {round_no + 1}: cp {cps[-1]:.2f} s, upload {rows[-1]['upload_s']:.2f} s "
                    f"(API CPU {rows[-1]['api_cpu_s']:.1f} s, client CPU {rows[-1]['client_cpu_s']:.1f} s), "
                    f"job {rows[-1]['job_s']:.2f} s",
                    flush=True,
                )
        hwm_mb = _status_kb(api.pid, "VmHWM") / 1024
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(60)
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    cp_median = statistics.median(cps)
    up_median = statistics.median(row["upload_s"] for row in rows)
    return {
        "size_bytes": size,
        "repeat": repeat,
        "parallel": parallel,
        "chunk_size": int(reload_settings().upload_chunk_size),
        "cp_s": cps,
        "uploads": rows,
        "cp_median_s": cp_median,
        "upload_median_s": up_median,
        "cp_mb_s": size / MB / cp_median,
        "upload_mb_s": size / MB / up_median,
        "ratio_upload_vs_cp": cp_median / up_median,
        "api_peak_rss_mb": rss.peak_mb,
        "api_vmhwm_mb": hwm_mb,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }


def _report(results: dict[str, Any]) -> None:
    print(
        f"\n{results['size_bytes'] / MB:.0f} MB, {results['repeat']} rounds, parallel {results['parallel']}"
    )
    print(
        f"  cp (coreutils)            median {results['cp_median_s']:7.2f} s  {results['cp_mb_s']:8.0f} MB/s"
    )
    print(
        f"  upload API (chunked)      median {results['upload_median_s']:7.2f} s  "
        f"{results['upload_mb_s']:8.0f} MB/s   SHA-256 verified every round"
    )
    print(f"  ratio upload / cp speed: {results['ratio_upload_vs_cp']:.2f}x (target >= 0.5x)")
    print(
        f"  API memory: peak RSS during uploads {results['api_peak_rss_mb']:.0f} MB, "
        f"VmHWM {results['api_vmhwm_mb']:.0f} MB (target < 200 MB)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="file size in GB (10^9 bytes; default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--parallel", type=int, default=4, help="chunks in flight (default 4)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "jobbridge-bench-upload"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(int(args.size_gb * 1e9), args.repeat, args.parallel, args.workdir)
    _report(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
