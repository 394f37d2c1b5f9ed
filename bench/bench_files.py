"""Benchmark of the file jobs (compress, extract, validate) against coreutils/GNU tar in the same run.

    python bench/bench_files.py [--size-gb 1] [--workdir /tmp/jobbridge-bench] [--repeat 3]

Generates (once, reused while its size matches) a tree of mixed files under the workdir: many small
1-64 KB files, some 1-10 MB ones and a few of 100+ MB, each either random bytes, compressible text, or
half of each. Then, in this one run and on the same warm page cache:

1. compress: our single pass (tar.zst + SHA-256 manifest, ``write_archive``) against
   ``tar -I zstd -cf x.tar.zst tree && find tree -type f -print0 | xargs -0 sha256sum > m``;
2. extract: ``extract_archive`` against ``tar -I zstd -xf`` of the same archive;
3. validate: ``verify_tree`` against ``sha256sum -c --quiet`` of the same manifest.

Rates are MB/s of the tree's bytes (MB = 10^6 bytes); the ratio is ours / baseline (higher is better;
the target is >= 0.8). Ours and the baseline run in ``--repeat`` interleaved rounds, each after an untimed
``sync`` so no run pays for the previous one's writeback, and the medians are compared (this machine is
shared: single runs vary by 2x). Then each flow runs once in-process (through Prefect: an ephemeral API
unless PREFECT_API_URL is set) to show the overhead of orchestration. Results, every run's time included,
go to ``bench/results/files.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "files.json"
SEED = 20240611
WORDS = [
    "sample",
    "detector",
    "beam",
    "energy",
    "calibration",
    "run",
    "dataset",
    "voxel",
    "slice",
    "tomography",
    "frame",
    "intensity",
    "peak",
    "background",
    "noise",
    "sensor",
    "channel",
    "timestamp",
    "scan",
    "angle",
    "offset",
    "gain",
]


# --------------------------------------------------------------------------------------------------
# The tree


def _text_block(rng: random.Random, size: int) -> bytes:
    """Compressible text: CSV-like lines of words and numbers (zstd -3 gets about 3-4x)."""
    lines = []
    total = 0
    while total < size:
        line = ",".join(
            [rng.choice(WORDS), str(rng.randint(0, 10**6)), f"{rng.random():.6f}", rng.choice(WORDS)]
        )
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()[:size]


def _content(rng: random.Random, size: int, text: bytes) -> bytes:
    kind = rng.choice(("random", "text", "mixed"))
    if kind == "random":
        return rng.randbytes(size)
    start = rng.randrange(0, max(1, len(text) - size)) if size < len(text) else 0
    body = (text * (size // len(text) + 1))[start : start + size]
    if kind == "text":
        return body
    half = size // 2
    return rng.randbytes(half) + body[: size - half]


def _write(path: Path, rng: random.Random, size: int, text: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            piece = min(remaining, 16 << 20)
            out.write(_content(rng, piece, text))
            remaining -= piece


def generate_tree(tree: Path, size_bytes: int) -> dict[str, int]:
    """About ``size_bytes`` of files: ~40 % in a few big files, ~30 % in 1-10 MB, ~30 % in small."""
    rng = random.Random(SEED)
    text = _text_block(rng, 4 << 20)
    counts = {"small": 0, "medium": 0, "large": 0}
    budget_large, budget_medium = int(size_bytes * 0.4), int(size_bytes * 0.3)
    budget_small = size_bytes - budget_large - budget_medium
    large_size = max(100 << 20, budget_large // 3) if size_bytes >= 1 << 30 else budget_large // 3
    written = 0
    while written < budget_large and large_size > 0:
        size = min(large_size, budget_large - written)
        _write(tree / "large" / f"volume-{counts['large']:02d}.bin", rng, size, text)
        written += size
        counts["large"] += 1
    written = 0
    while written < budget_medium:
        size = min(rng.randint(1 << 20, 10 << 20), budget_medium - written)
        _write(tree / "medium" / f"run-{counts['medium']:04d}.dat", rng, size, text)
        written += size
        counts["medium"] += 1
    written = 0
    while written < budget_small:
        size = min(rng.randint(1 << 10, 64 << 10), budget_small - written)
        n = counts["small"]
        _write(tree / "small" / f"d{n // 2000:02d}" / f"s{n // 200:03d}" / f"f{n:06d}.txt", rng, size, text)
        written += size
        counts["small"] += 1
    return counts


def ensure_tree(workdir: Path, size_gb: float) -> tuple[Path, dict[str, Any]]:
    """The benchmark tree under ``workdir``, generated only when missing or of another size."""
    tree = workdir / "tree"
    marker = workdir / "tree.json"
    size_bytes = int(size_gb * (1 << 30))
    if marker.exists():
        info: dict[str, Any] = json.loads(marker.read_text())
        if info.get("size_bytes") == size_bytes and tree.is_dir():
            return tree, info
    shutil.rmtree(tree, ignore_errors=True)
    print(f"generating a {size_gb:g} GiB tree under {tree} ...", flush=True)
    started = time.perf_counter()
    counts = generate_tree(tree, size_bytes)
    info = {"size_bytes": size_bytes, "files": sum(counts.values()), "counts": counts}
    marker.write_text(json.dumps(info))
    print(f"  {info['files']} files in {time.perf_counter() - started:.1f} s", flush=True)
    return tree, info


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One operation: our times, the baseline's times (interleaved rounds), and the flow's time."""

    name: str
    ours_times: list[float]
    baseline_times: list[float]
    flow: float | None = None

    @property
    def ours(self) -> float:
        """Median of our runs (the median resists this shared machine's noisy runs both ways)."""
        return statistics.median(self.ours_times)

    @property
    def baseline(self) -> float:
        """Median of the baseline's runs."""
        return statistics.median(self.baseline_times)


Step = Callable[[], None]


def timed(run: Step, reset: Step) -> float:
    """Wall time of ``run`` after the untimed ``reset``."""
    reset()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare(name: str, rounds: int, ours: tuple[Step, Step], baseline: tuple[Step, Step]) -> Row:
    """``rounds`` rounds of ours then the baseline, interleaved so that drift hits both alike."""
    row = Row(name, [], [])
    for _ in range(rounds):
        row.ours_times.append(timed(*ours))
        row.baseline_times.append(timed(*baseline))
    return row


def shell(command: str, cwd: Path) -> Callable[[], None]:
    """A baseline command run through bash, failing loudly."""

    def run() -> None:
        subprocess.run(["bash", "-c", command], cwd=cwd, check=True)

    return run


def remove(*paths: Path) -> Callable[[], None]:
    """A reset step that deletes outputs of a previous run, then flushes dirty pages to disk.

    Without the sync, a run would pay for writing back what the previous run left in the page cache;
    with it, every timed run (ours and the baseline's) starts from the same state.
    """

    def reset() -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        os.sync()

    return reset


def fresh_dir(path: Path) -> Callable[[], None]:
    """A reset step that leaves an empty directory at ``path``."""

    def reset() -> None:
        remove(path)()
        path.mkdir()

    return reset


def measure(tree: Path, work: Path, repeat: int) -> tuple[list[Row], dict[str, Any]]:
    """The three comparisons (pure functions against the baseline commands)."""
    from jobbridge.tasks.checksum import verify_tree
    from jobbridge.tasks.pack import compress_path
    from jobbridge.tasks.unpack import extract_archive

    ours_archive, base_archive = work / "ours.tar.zst", work / "base.tar.zst"
    manifest = work / "ours.tar.zst.sha256"
    out_ours, out_base = work / "out-ours", work / "out-base"
    details: dict[str, Any] = {}

    def ours_compress() -> None:
        details["compress"] = compress_path(tree, ours_archive).as_dict()

    base_compress = shell(
        f"tar -I zstd -cf {base_archive} -C {tree.parent} {tree.name} && "
        f"find {tree.name} -type f -print0 | xargs -0 sha256sum > {work / 'base.sha256'}",
        tree.parent,
    )
    compress_row = compare(
        "compress (tar.zst + sha256 manifest)",
        repeat,
        (ours_compress, remove(ours_archive, manifest)),
        (base_compress, remove(base_archive, work / "base.sha256")),
    )
    details["baseline_archive_bytes"] = base_archive.stat().st_size

    def ours_extract() -> None:
        details["extract"] = extract_archive(ours_archive, out_ours).as_dict()

    extract_row = compare(
        "extract (tar.zst)",
        repeat,
        (ours_extract, remove(out_ours)),
        (shell(f"tar -I zstd -xf {ours_archive} -C {out_base}", work), fresh_dir(out_base)),
    )

    def ours_validate() -> None:
        check = verify_tree(out_ours, manifest)
        assert check.ok, check.summary()
        details["validate"] = {"files": check.files, "bytes": check.bytes}

    validate_row = compare(
        "validate (sha256 manifest)",
        repeat,
        (ours_validate, os.sync),
        (shell(f"sha256sum -c --quiet {manifest}", out_ours), os.sync),
    )
    remove(out_base)()
    return [compress_row, extract_row, validate_row], details


def measure_flows(tree: Path, work: Path, rows: list[Row]) -> None:
    """Each flow once, in-process through Prefect, to show what orchestration adds."""
    from prefect.client.orchestration import get_client

    from jobbridge.flows.compress import compress
    from jobbridge.flows.extract import extract
    from jobbridge.flows.validate import validate

    with get_client(sync_client=True) as client:  # start (or reach) the API before timing
        client.hello()
    archive, out = work / "flow.tar.zst", work / "out-flow"
    remove(archive, Path(f"{archive}.sha256"), out)()
    runs: list[Callable[[], object]] = [
        lambda: compress(source=tree, destination=archive),
        lambda: extract(source=archive, destination=out),
        lambda: validate(path=out, manifest=Path(f"{archive}.sha256")),
    ]
    for row, run in zip(rows, runs, strict=True):
        os.sync()
        started = time.perf_counter()
        run()
        row.flow = time.perf_counter() - started
    remove(archive, Path(f"{archive}.sha256"), out)()


# --------------------------------------------------------------------------------------------------
# Reporting


def report(rows: list[Row], data_bytes: int, info: dict[str, Any]) -> dict[str, Any]:
    """Print the table and return the JSON document."""
    mb = data_bytes / 1e6
    header = f"{'operation':38} {'ours MB/s':>10} {'baseline MB/s':>14} {'ratio':>7} {'flow MB/s':>10}"
    print(header)
    print("-" * len(header))
    out_rows = []
    for row in rows:
        ratio = row.baseline / row.ours
        flow_rate = f"{mb / row.flow:10.0f}" if row.flow else f"{'-':>10}"
        print(f"{row.name:38} {mb / row.ours:10.0f} {mb / row.baseline:14.0f} {ratio:7.2f} {flow_rate}")
        out_rows.append(
            {
                "operation": row.name,
                "ours_seconds": round(row.ours, 3),
                "baseline_seconds": round(row.baseline, 3),
                "ours_runs": [round(t, 3) for t in row.ours_times],
                "baseline_runs": [round(t, 3) for t in row.baseline_times],
                "flow_seconds": round(row.flow, 3) if row.flow else None,
                "ours_mb_per_s": round(mb / row.ours, 1),
                "baseline_mb_per_s": round(mb / row.baseline, 1),
                "flow_mb_per_s": round(mb / row.flow, 1) if row.flow else None,
                "ratio": round(ratio, 3),
                "target_met": ratio >= 0.8,
            }
        )
    return {
        "benchmark": "files",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "tree": info,
        "data_bytes": data_bytes,
        "rows": out_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="tree size in GiB (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jobbridge-bench"))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians kept)")
    parser.add_argument("--no-flows", action="store_true", help="skip the in-process flow runs")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Prefect keeps its state (an ephemeral API's database) in the workdir, not in the home dir.
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    tree, info = ensure_tree(workdir, args.size_gb)
    work = workdir / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rows, details = measure(tree, work, args.repeat)
    if not args.no_flows:
        measure_flows(tree, work, rows)
    document = report(rows, details["compress"]["bytes"], info)
    document["details"] = details
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten {RESULTS}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
