"""Benchmark of the convert job: throughput, and peak memory on inputs larger than the memory allowed.

    .venv/bin/python bench/bench_convert.py [--sizes-mib 1024,2048] [--limit-mib 768] [--budget-mib 64]
                                            [--workdir /tmp/jobbridge-bench-convert] [--keep]

Generates two TIFF stacks (directories of 2048x2048 uint16 slices: a smooth pattern plus 12-bit-ish
noise, so that compression does real work) and then, each measurement in a fresh child process:

1. ours: the conversion engine (``convert_dataset``: slabs under ``--budget-mib``, pyramid, compression,
   read-back verification, publish) to IDX and to Zarr, for both sizes, each child limited with
   ``RLIMIT_AS`` to ``--limit-mib`` of *virtual* memory, less than either input;
2. naive, on the smaller size, without a limit: ``tifffile.imread`` of the whole stack, then one call that
   writes it: ``zarr.create_array(data=...)`` of level 0 only (no pyramid, no verification: less work
   than ours), the same plus the pyramid computed on the whole array and written one call per level
   (the same output as ours, without verification), and OpenVisus ``CreateIdx(data=..., compression=
   ["zip"])``; then the naive Zarr once more *under* the limit, to show it cannot run at all;
3. the I/O floor: ``cp -r`` of each input.

What is limited: RLIMIT_AS caps the address space (RSS can never exceed it), set in the child with
``resource.setrlimit`` and ``MALLOC_ARENA_MAX=2`` so glibc's per-thread arenas do not eat it in
reservations. Peak RSS is the child's ``VmHWM`` from /proc. Rates are MB/s (10^6 bytes) of input. The
page cache is warm (inputs were just written; RAM is larger than them) for every contender alike. The
machine is shared: single runs vary, ratios within this run are what to read. The job's Prefect overhead
(about a second per job, see bench_jobs.py) is not included. Results go to bench/results/convert.json;
the generated data is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "convert.json"
EDGE = 2048
SLICE_BYTES = EDGE * EDGE * 2


# --------------------------------------------------------------------------------------------------
# Input


def generate_stack(directory: Path, size_bytes: int) -> int:
    """A directory of uint16 TIFF slices totalling ``size_bytes`` (rounded to whole slices)."""
    import numpy as np
    import tifffile

    slices = max(1, size_bytes // SLICE_BYTES)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(20240611)
    noise = [rng.normal(0, 40, size=(EDGE, EDGE)).astype(np.float32) for _ in range(4)]
    axis = np.arange(EDGE, dtype=np.float32)
    for index in range(slices):
        base = 1000 + 800 * np.outer(np.cos(axis / 131.0 - index / 17.0), np.sin(axis / 97.0 + index / 13.0))
        plane = (base + noise[index % 4]).clip(0, 4095).astype(np.uint16)
        tifffile.imwrite(directory / f"slice_{index}.tif", plane)
    return slices * SLICE_BYTES


# --------------------------------------------------------------------------------------------------
# Child process: one measurement


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmHWM: peak RSS; VmPeak: peak address space)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _files(source: Path) -> list[str]:
    from jobbridge.convert.sources import natural_key

    return sorted((str(p) for p in source.glob("*.tif")), key=natural_key)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this (fresh) process and describe it."""
    if spec["limit"]:
        resource.setrlimit(resource.RLIMIT_AS, (spec["limit"], spec["limit"]))
    source, destination, mode = Path(spec["source"]), Path(spec["destination"]), spec["mode"]
    # The libraries load before the clock starts, for every contender alike.
    import numcodecs
    import OpenVisus
    import tifffile
    import zarr

    from jobbridge.convert.pipeline import ConvertRequest, convert_dataset
    from jobbridge.convert.pyramid import halve, level_count
    from jobbridge.convert.zarr_writer import ZSTD_LEVEL

    started = time.perf_counter()
    if mode in ("ours-idx", "ours-zarr"):
        fmt: Any = mode.removeprefix("ours-")
        convert_dataset(
            ConvertRequest(str(source), "TIFF", str(destination), fmt, memory_budget=spec["budget"])
        )
    elif mode in ("naive-zarr", "naive-zarr-pyramid"):
        data = tifffile.imread(_files(source))
        compressor = numcodecs.Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=numcodecs.Blosc.SHUFFLE)
        levels = level_count(*data.shape[-2:]) if mode == "naive-zarr-pyramid" else 1
        for level in range(levels):
            data = halve(data, channels=False) if level else data
            zarr.create_array(
                str(destination / str(level)),
                data=data,
                chunks=(32, 256, 256),
                compressors=compressor,
                zarr_format=2,
            )
    elif mode == "naive-idx":
        data = tifffile.imread(_files(source))
        OpenVisus.CreateIdx(url=str(destination / "visus.idx"), dim=3, data=data, compression=["zip"])
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss": _status("VmHWM"), "peak_vm": _status("VmPeak")}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a child; its figures, or the error that stopped it."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    shutil.rmtree(spec["destination"], ignore_errors=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["mb_per_s"] = spec["bytes"] / result["seconds"] / 1e6
    return result


def copy_floor(source: Path, destination: Path, size: int) -> dict[str, Any]:
    """``cp -r`` of the input: reading and writing every byte once, the least any conversion must do."""
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(destination)], check=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(destination, ignore_errors=True)
    return {"seconds": seconds, "mb_per_s": size / seconds / 1e6}


# --------------------------------------------------------------------------------------------------
# The run


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def _row(name: str, figures: dict[str, Any]) -> str:
    if "error" in figures:
        return f"  {name:<34} FAILED: {figures['error'][:90]}"
    rss = f"{_mib(figures['peak_rss']):>9}" if "peak_rss" in figures else " " * 9
    return f"  {name:<34} {figures['mb_per_s']:8.1f} MB/s {figures['seconds']:8.1f} s   peak RSS {rss}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    limit, budget = args.limit_mib << 20, args.budget_mib << 20
    work = Path(args.workdir)
    need = sum(sizes) + 2 * max(sizes)
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < need * 1.2:
        raise SystemExit(f"needs about {_mib(int(need * 1.2))} free under {work.parent}, has {_mib(free)}")
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {"sizes": {}, "limit_bytes": limit, "budget_bytes": budget}
    try:
        for size in sizes:
            source = work / f"stack-{size >> 20}"
            print(f"generating {_mib(size)} of TIFF slices in {source} ...", flush=True)
            actual = generate_stack(source, size)
            figures: dict[str, Any] = {"bytes": actual}
            base = {"source": str(source), "bytes": actual, "budget": budget}
            for fmt in ("idx", "zarr"):
                spec = {**base, "mode": f"ours-{fmt}", "destination": str(work / "out"), "limit": limit}
                figures[f"ours_{fmt}"] = measure(spec)
                print(_row(f"ours {fmt} (limit {_mib(limit)})", figures[f"ours_{fmt}"]), flush=True)
            if size == min(sizes):
                for mode in ("naive-zarr", "naive-zarr-pyramid", "naive-idx"):
                    spec = {**base, "mode": mode, "destination": str(work / "out"), "limit": 0}
                    key = mode.replace("-", "_")
                    figures[key] = measure(spec)
                    print(_row(f"{mode.replace('-', ' ')} (no limit)", figures[key]), flush=True)
                spec = {**base, "mode": "naive-zarr", "destination": str(work / "out"), "limit": limit}
                figures["naive_zarr_limited"] = measure(spec)
                print(_row(f"naive zarr (limit {_mib(limit)})", figures["naive_zarr_limited"]), flush=True)
            figures["cp"] = copy_floor(source, work / "copy", actual)
            print(_row("cp -r (I/O floor)", figures["cp"]), flush=True)
            results["sizes"][str(actual)] = figures
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """Ours against the baselines, and the large input's peak RSS against the small one's."""
    small, large = (results["sizes"][key] for key in sorted(results["sizes"], key=int))
    out: dict[str, float] = {}
    for fmt in ("idx", "zarr"):
        ours_small, ours_large = small[f"ours_{fmt}"], large[f"ours_{fmt}"]
        if "error" in ours_small or "error" in ours_large:
            continue
        out[f"{fmt}: peak RSS large / small input"] = ours_large["peak_rss"] / ours_small["peak_rss"]
        out[f"{fmt}: throughput ours / cp"] = ours_small["mb_per_s"] / small["cp"]["mb_per_s"]
        baselines = [f"naive_{fmt}"] + (["naive_zarr_pyramid"] if fmt == "zarr" else [])
        for key in baselines:
            naive = small.get(key, {})
            if naive and "error" not in naive:
                label = key.replace("_", " ")
                out[f"{fmt}: throughput ours / {label}"] = ours_small["mb_per_s"] / naive["mb_per_s"]
                out[f"{fmt}: peak RSS {label} / ours"] = naive["peak_rss"] / ours_small["peak_rss"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mib", default="1024,2048", help="two input sizes, comma-separated")
    parser.add_argument("--limit-mib", type=int, default=768, help="RLIMIT_AS of each child")
    parser.add_argument("--budget-mib", type=int, default=64, help="slab memory budget of the conversion")
    parser.add_argument("--workdir", default="/tmp/jobbridge-bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    started = time.perf_counter()
    results = run(args)
    found = ratios(results)
    print("\nratios (from this run):")
    for name, value in found.items():
        print(f"  {name:<40} {value:6.2f}")
    document = {
        "benchmark": "convert",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "seconds": time.perf_counter() - started,
        **results,
        "ratios": found,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
