"""``jobbridge demo``: the main job end to end, the way production runs it.

Brings the embedded stack up when it is down, then runs a small dataset pipeline through the work pool:
fingerprint a generated dataset (validate, create=true), pack it (compress, tar.zst with its SHA-256
manifest), unpack the archive elsewhere (extract), and prove the copy is bit-exact (validate against the
manifest). Each step is a job whose progress shows live.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from jobbridge import console
from jobbridge.jobs import Job, JobStatus
from jobbridge.settings import Settings, get_settings

DEMO_FILES = 40


def make_dataset(root: Path, *, files: int = DEMO_FILES, seed: int = 7) -> int:
    """Write a small, reproducible dataset (text and binary files in sub-folders); returns its bytes."""
    rng = random.Random(seed)
    total = 0
    for index in range(files):
        folder = root / f"run-{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        if index % 3 == 0:
            data = rng.randbytes(rng.randint(64 * 1024, 512 * 1024))
            path = folder / f"frame-{index:03d}.bin"
        else:
            lines = [f"{index},{step},{rng.random():.6f}" for step in range(rng.randint(500, 4000))]
            data = ("t,step,value\n" + "\n".join(lines) + "\n").encode()
            path = folder / f"metrics-{index:03d}.csv"
        path.write_bytes(data)
        total += len(data)
    return total


def _pipeline(work: Path) -> list[tuple[str, str, dict[str, Any]]]:
    dataset, out = work / "dataset", work / "out"
    archive = out / "dataset.tar.zst"
    return [
        (
            "fingerprint dataset",
            "validate",
            {"path": str(dataset), "manifest": str(work / "dataset.sha256"), "create": True},
        ),
        (
            "pack dataset",
            "compress",
            {"source": str(dataset), "destination": str(archive), "format": "tar.zst"},
        ),
        (
            "unpack archive",
            "extract",
            {"source": str(archive), "destination": str(out / "restored")},
        ),
        (
            "verify restored copy",
            "validate",
            {"path": str(out / "restored"), "manifest": str(work / "dataset.sha256")},
        ),
    ]


def _ensure_stack(settings: Settings, quiet: bool) -> None:
    from jobbridge.stack import Stack

    stack = Stack(settings)
    if all(service.healthy for service in stack.status()):
        return
    if not quiet:
        console.err.print("[dim]the embedded stack is down: starting it (about 15 s)...[/dim]")
    stack.up()  # later calls find it through runtime.resolve_api_url


def run_demo(*, workdir: Path | None = None, quiet: bool = False) -> list[Job]:
    """Run the demo pipeline through the work pool; returns every job in its final state."""
    from jobbridge import control

    settings = get_settings()
    _ensure_stack(settings, quiet)
    through_pool = settings.model_copy(update={"execution": "pool"})
    work = (workdir or settings.state_dir / "demo").resolve()
    shutil.rmtree(work, ignore_errors=True)
    size = make_dataset(work / "dataset")
    (work / "out").mkdir()
    if not quiet:
        console.err.print(f"demo dataset: {DEMO_FILES} files, {size / 1e6:.1f} MB in {work}")
    finished: list[Job] = []
    for name, job_type, params in _pipeline(work):
        job = control.submit(
            Job(name=f"demo: {name}", type=job_type, parameters=params, tags=["demo"]),
            settings=through_pool,
        )
        if quiet:
            final = control.wait_for(job.id, timeout=300, settings=through_pool)
        else:
            final = console.watch([job.id], control.get_job, timeout=300)[0]
        finished.append(final)
        if final.status is not JobStatus.COMPLETED:
            break
    return finished
