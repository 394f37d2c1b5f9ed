"""What the CLI shows people: job tables, a job's details, live progress bars, one-line errors."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobbridge.jobs import Job, JobStatus

out = Console()
err = Console(stderr=True)

STATUS_STYLE: dict[JobStatus, str] = {
    JobStatus.COMPLETED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CRASHED: "red",
    JobStatus.CANCELLED: "yellow",
    JobStatus.CANCELLING: "yellow",
    JobStatus.RUNNING: "cyan",
    JobStatus.RETRYING: "magenta",
}


def styled(status: JobStatus) -> str:
    """The status as rich markup in its colour."""
    style = STATUS_STYLE.get(status, "white")
    return f"[{style}]{status.value}[/{style}]"


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, no wrapping."""
    print(json.dumps(data, indent=2, default=str))


def print_error(message: str) -> None:
    """One line on stderr, no traceback."""
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def _took(job: Job) -> str:
    if job.started_at is None or job.finished_at is None:
        return ""
    return f"{(job.finished_at - job.started_at).total_seconds():.1f} s"


def jobs_table(
    jobs: Iterable[Job], ui_url: Callable[[str], str] | None = None, *, compact: bool = False
) -> Table:
    """A table of jobs, in the order given; ``compact`` drops org and creation time for the UI link."""
    columns = ["id", "name", "type", "status", "progress"]
    columns += ["took"] if compact else ["org", "created"]
    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    if ui_url:
        table.add_column("Prefect UI", overflow="fold")
    for job in jobs:
        row = [job.id, job.name, job.type, styled(job.status), f"{job.progress:.0f}%"]
        if compact:
            row.append(_took(job))
        else:
            row += [job.org or "", job.created_at.strftime("%Y-%m-%d %H:%M:%S")]
        if ui_url:
            row.append(ui_url(job.id))
        table.add_row(*row)
    return table


def job_details(job: Job) -> Table:
    """Every field of one job, one per row."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    data = job.model_dump(mode="json")
    data["status"] = styled(job.status)
    for key, value in data.items():
        if key == "items" and not value:
            continue
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown if value is not None else "")
    return table


def watch(
    job_ids: Sequence[str],
    read: Callable[[str], Job],
    *,
    interval: float = 0.5,
    timeout: float | None = None,
) -> list[Job]:
    """Show a live progress bar per job until every job is final; returns their final states."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    latest: dict[str, Job] = {}
    with Progress(*columns, console=err, transient=False) as progress:
        bars = {job_id: progress.add_task(job_id[:8], total=100, status="") for job_id in job_ids}
        while True:
            for job_id, bar in bars.items():
                if job_id in latest and latest[job_id].is_final:
                    continue
                job = read(job_id)
                latest[job_id] = job
                progress.update(
                    bar,
                    completed=job.progress,
                    description=f"{job.name} ({job.type})",
                    status=styled(job.status),
                )
            if all(job.is_final for job in latest.values()):
                return [latest[job_id] for job_id in job_ids]
            if deadline is not None and time.monotonic() >= deadline:
                return [latest[job_id] for job_id in job_ids]
            time.sleep(interval)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} s"


def _ago(moment: float | None) -> str:
    return "never" if moment is None else f"{max(0.0, time.time() - moment):.0f} s ago"


def show_mirror_status(status: Any, as_json: bool) -> None:
    """``jobbridge mirror status``: one row per target, then the service's own state."""
    if as_json:
        print_json(status)
        return
    table = Table()
    table.add_column("target", no_wrap=True)
    for column in ("outbox", "oldest", "sent", "lag p50", "lag p99", "last sent"):
        table.add_column(column, no_wrap=True)
    table.add_column("last error", overflow="fold")
    for target in status["targets"]:
        error = target["last_error"] or ""
        if error:
            error = f"[red]{error}[/red] ({_ago(target['last_error_at'])})"
        table.add_row(
            target["target"],
            str(target["depth"]),
            _seconds(target["oldest_age"]),
            str(target["delivered"]),
            _seconds(target["lag_p50"]),
            _seconds(target["lag_p99"]),
            _ago(target["last_delivered"]),
            error,
        )
    out.print(table)
    service = "[green]running[/green]" if status["running"] else f"[yellow]{status['problem']}[/yellow]"
    out.print(f"service: {service}; open jobs: {status['open_jobs']}; event cursor: {status['cursor']}")


class TransferBar:
    """A live bar of bytes sent, speed and ETA, driven by ``(done, total)`` callbacks from any thread."""

    def __init__(self, label: str, total: int) -> None:
        from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self._task = self._progress.add_task(label, total=total)

    def __enter__(self) -> TransferBar:
        self._progress.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # the error alone stays on screen, as one line
            self._progress.live.transient = True
        self._progress.stop()

    def update(self, done: int, total: int) -> None:
        """The progress callback: absolute bytes done of ``total``."""
        self._progress.update(self._task, completed=done, total=total)


def watch_upload_job(
    wait: Callable[..., dict[str, Any]], job_id: str, timeout: float | None
) -> dict[str, Any]:
    """Show the upload job's own progress (moving the file into the dataset store) until it ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task(f"job {job_id[:8]}", total=100, status="")

        def show(status: dict[str, Any]) -> None:
            progress.update(
                bar, completed=status.get("progress_percentage") or 0.0, status=status.get("status", "")
            )

        return wait(job_id, timeout=timeout, on_status=show)
