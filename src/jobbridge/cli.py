"""The ``jobbridge`` command line. Every command has ``--json``; errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from jobbridge import console
from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.jobs import Job, JobStatus
from jobbridge.settings import get_settings

app = typer.Typer(
    name="jobbridge",
    help="Submit, watch and control jobs that run as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stack_app = typer.Typer(help="The embedded local stack: Prefect server + worker, moto, nx-27017.")
worker_app = typer.Typer(help="Run a worker for the jobbridge work pool.")
app.add_typer(stack_app, name="stack")
mirror_app = typer.Typer(help="The status mirror: job statuses into DynamoDB and MongoDB.")
app.add_typer(worker_app, name="worker")
app.add_typer(mirror_app, name="mirror")

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _ui_base() -> str | None:
    """The Prefect UI of the API jobbridge talks to (the stack's, when it was started by this command)."""
    from prefect.settings import PREFECT_UI_URL

    from jobbridge.runtime import resolve_api_url

    # The environment first: main() put the stack's URL there, which saves resolve_api_url's health check.
    api = os.environ.get("PREFECT_API_URL") or resolve_api_url() or ""
    ui = PREFECT_UI_URL.value() if not api else api.rstrip("/").removesuffix("/api")
    return (ui or "").rstrip("/") or None


def ui_url(job_id: str) -> str:
    """Where the job's flow run is in the Prefect UI."""
    base = _ui_base()
    return f"{base}/runs/flow-run/{job_id}" if base else ""


def _parse_params(pairs: list[str], params_json: str | None) -> dict[str, Any]:
    """``--params-json`` first, then each ``--param k=v`` (values read as JSON when they parse)."""
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise JobValidationError(f"--params-json is not valid JSON: {exc.msg}") from None
        if not isinstance(loaded, dict):
            raise JobValidationError('--params-json must be a JSON object, e.g. \'{"source": "a.zip"}\'')
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise JobValidationError(f"--param '{pair}' is not KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


def _show_job(job: Job, as_json: bool) -> None:
    if as_json:
        console.print_json(job.model_dump(mode="json"))
    else:
        console.out.print(console.job_details(job))
        link = ui_url(job.id)
        if link:
            console.out.print(f"[dim]Prefect UI:[/dim] {link}")


@app.command()
def submit(
    job_type: Annotated[str, typer.Argument(metavar="TYPE", help="Job type, e.g. extract.")],
    name: Annotated[str | None, typer.Option(help="Job name (default: the type).")] = None,
    org: Annotated[str | None, typer.Option(help="Organization that owns the job.")] = None,
    owner: Annotated[str | None, typer.Option(help="User that owns the job.")] = None,
    priority: Annotated[str, typer.Option(help="1 (high) .. 3 (low) or low/medium/high/critical.")] = "2",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, repeatable.")] = None,
    params_json: Annotated[
        str | None, typer.Option("--params-json", help="Parameters as a JSON object.")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Extra tag, repeatable.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the same job.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the final status; exit 0 only if COMPLETED.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job and print its id (with --wait, its final status)."""
    from jobbridge import control

    try:
        job = Job(
            name=name or job_type,
            type=job_type,
            parameters=_parse_params(param or [], params_json),
            priority=priority,
            org=org,
            owner=owner,
            tags=tag or [],
        )
    except ValueError as exc:
        raise JobValidationError(_first_error(exc)) from None
    submitted = control.submit(job, idempotency_key=idempotency_key)
    if not wait:
        if as_json:
            console.print_json(submitted.model_dump(mode="json"))
        else:
            print(submitted.id)
        return
    if as_json:
        final = control.wait_for(submitted.id, timeout=timeout)
    else:
        console.err.print(f"submitted {submitted.id}  {ui_url(submitted.id)}", highlight=False)
        final = console.watch([submitted.id], control.get_job, timeout=timeout)[0]
    _finish(final, as_json)


def _finish(job: Job, as_json: bool) -> None:
    """Print a waited-for job and exit 0 only when it COMPLETED."""
    if as_json:
        console.print_json(job.model_dump(mode="json"))
    else:
        print(f"{job.id} {job.status.value}" + (f": {job.error}" if job.error else ""))
    if job.status is not JobStatus.COMPLETED:
        raise typer.Exit(1)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "job"
        return f"{where}: {first.get('msg')}"
    return str(exc)


@app.command()
def status(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOption = False) -> None:
    """Show one job: status, progress, parameters, result."""
    from jobbridge import control

    _show_job(control.get_job(job_id), as_json)


@app.command("list")
def list_command(
    org: Annotated[str | None, typer.Option(help="Only this organization's jobs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status, e.g. RUNNING.")] = None,
    job_type: Annotated[str | None, typer.Option("--type", help="Only jobs of this type.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1-200).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Cursor printed by the previous page.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    from jobbridge import control

    page = control.list_jobs(org=org, status=status, type=job_type, limit=limit, cursor=cursor)
    if as_json:
        console.print_json(
            {"jobs": [job.model_dump(mode="json") for job in page], "next_cursor": page.next_cursor}
        )
        return
    console.out.print(console.jobs_table(page))
    if page.next_cursor:
        console.out.print(f"[dim]more: --cursor {page.next_cursor}[/dim]")


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job is CANCELLED.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job (a running one is stopped, its process killed)."""
    from jobbridge import control

    job = control.cancel(job_id, wait=wait, timeout=timeout)
    if as_json:
        console.print_json(job.model_dump(mode="json"))
    else:
        print(f"{job.id} {job.status.value}")
    if wait and job.status is not JobStatus.CANCELLED:
        console.print_error(f"job {job.id} is still {job.status.value} after {timeout:.0f} s")
        raise typer.Exit(1)


@app.command()
def retry(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOption = False) -> None:
    """Run a FAILED, CRASHED or CANCELLED job again (same id, one more attempt)."""
    from jobbridge import control

    job = control.retry(job_id)
    if as_json:
        console.print_json(job.model_dump(mode="json"))
    else:
        print(f"{job.id} {job.status.value}")


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Print a job's log."""
    from jobbridge import control

    for line in control.logs(job_id, follow=follow):
        if as_json:
            print(
                json.dumps(
                    {
                        "timestamp": line.timestamp.isoformat(),
                        "level": line.level,
                        "logger": line.logger,
                        "message": line.message,
                    }
                ),
                flush=True,
            )
        else:
            print(f"{line.timestamp:%H:%M:%S} {line.level:<7} {line.message}", flush=True)


@app.command()
def types(as_json: JsonOption = False) -> None:
    """List the registered job types."""
    from jobbridge.registry import get_spec, known_types

    specs = [get_spec(name) for name in known_types()]
    if as_json:
        console.print_json(
            [{"type": s.name, "entrypoint": s.entrypoint, "description": s.description} for s in specs]
        )
        return
    for spec in specs:
        console.out.print(f"[bold]{spec.name:<10}[/bold] {spec.description}")


@app.command("settings")
def settings_command(as_json: JsonOption = False) -> None:
    """Show the effective settings (secrets hidden)."""
    shown = get_settings().redacted()
    if as_json:
        console.print_json(shown)
        return
    for key, value in shown.items():
        console.out.print(f"[bold]{key}[/bold] = {value}", highlight=False)


def _print_services(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        console.print_json([vars(s) for s in statuses])
        return
    from rich.table import Table

    table = Table()
    for column in ("service", "url", "pid", "health", "detail"):
        table.add_column(column)
    for s in statuses:
        health = (
            "[green]healthy[/green]"
            if s.healthy
            else ("[yellow]unhealthy[/yellow]" if s.running else "[dim]stopped[/dim]")
        )
        table.add_row(s.name, s.url, str(s.pid or ""), health, s.detail)
    console.out.print(table)


@stack_app.command("up")
def stack_up(as_json: JsonOption = False) -> None:
    """Start every service of the stack that is not running (harmless when it is up)."""
    from jobbridge.stack import Stack

    with console.err.status("starting the embedded stack..."):
        statuses = Stack(get_settings()).up()
    _print_services(statuses, as_json)


@stack_app.command("down")
def stack_down(as_json: JsonOption = False) -> None:
    """Stop exactly what `stack up` started."""
    from jobbridge.stack import Stack

    stopped = Stack(get_settings()).down()
    if as_json:
        console.print_json({"stopped": stopped})
    else:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def stack_status(as_json: JsonOption = False) -> None:
    """Each service of the stack, its URL and health."""
    from jobbridge.stack import Stack

    statuses = Stack(get_settings()).status()
    _print_services(statuses, as_json)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@worker_app.command("start")
def worker_start(
    pool: Annotated[
        str | None, typer.Option(help="Work pool to serve (default: JOBBRIDGE_WORK_POOL).")
    ] = None,
    warm: Annotated[int | None, typer.Option(help="Pre-started flow-run processes to keep ready.")] = None,
    query_seconds: Annotated[float | None, typer.Option(help="Seconds between polls for new runs.")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name shown in the Prefect UI.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many jobs at once.")] = None,
) -> None:
    """Run a worker for the pool in the foreground (Ctrl-C drains, a second Ctrl-C stops)."""
    from jobbridge.deployments.worker import main as worker_main

    settings = get_settings()
    args = ["--pool", pool or settings.work_pool]
    args += ["--warm", str(settings.worker_warm_processes if warm is None else warm)]
    args += ["--query-seconds", str(query_seconds or settings.worker_query_seconds)]
    if name:
        args += ["--name", name]
    if limit is not None:
        args += ["--limit", str(limit)]
    raise typer.Exit(worker_main(args))


@mirror_app.command("run")
def mirror_run(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the mirror service in the foreground until Ctrl-C (`stack up` starts one for you)."""
    from jobbridge.mirror.service import main as mirror_main

    raise typer.Exit(mirror_main(["--log-level", log_level.upper()]))


@mirror_app.command("status")
def mirror_status(as_json: JsonOption = False) -> None:
    """Per target: changes waiting in the outbox, delivery lag (p50/p99) and the last error."""
    from jobbridge.mirror.service import mirror_status as read_status

    console.show_mirror_status(read_status(get_settings()), as_json)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Where the demo's files go.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Bring the stack up, run a small pipeline of jobs through the work pool, print a summary."""
    from jobbridge.demo import run_demo

    jobs = run_demo(workdir=workdir, quiet=as_json)
    if as_json:
        console.print_json([job.model_dump(mode="json") for job in jobs])
    else:
        console.out.print(console.jobs_table(jobs, ui_url=ui_url, compact=True))
        console.err.print(
            f"[dim]the stack stays up: Prefect UI at {_ui_base()}; `jobbridge stack down` stops it[/dim]"
        )
    if not all(job.status is JobStatus.COMPLETED for job in jobs):
        raise typer.Exit(1)


@app.command("api")
def api_command(
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (default: JOBBRIDGE_API_HOST).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: JOBBRIDGE_API_PORT, 8000).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the upload API (ScientistCloud's routes, chunked resumable uploads; OpenAPI at /docs)."""
    from jobbridge.api.server import serve

    settings = get_settings()
    serve(settings, host or settings.api_host, port or settings.api_port, log_level)


def _api_url(api: str | None) -> str:
    settings = get_settings()
    return (
        api or os.environ.get("JOBBRIDGE_API_URL") or f"http://{settings.api_host}:{settings.api_port}"
    ).rstrip("/")


@app.command("upload")
def upload_command(
    path: Annotated[Path, typer.Argument(help="The file to upload.")],
    user_email: Annotated[str, typer.Option("--user-email", help="Owner of the dataset.")],
    dataset_name: Annotated[str, typer.Option("--dataset-name", help="Name of the dataset.")],
    sensor: Annotated[
        str, typer.Option(help="IDX, TIFF, TIFF RGB, NETCDF, HDF5, 4D_NEXUS, RGB, MAPIR or OTHER.")
    ],
    convert: Annotated[bool, typer.Option("--convert", help="Convert the dataset after the upload.")] = False,
    public: Annotated[bool, typer.Option("--public", help="Make the dataset public.")] = False,
    folder: Annotated[str | None, typer.Option(help="Folder the dataset is filed under.")] = None,
    team_uuid: Annotated[str | None, typer.Option("--team-uuid", help="Team the dataset belongs to.")] = None,
    dataset_uuid: Annotated[
        str | None, typer.Option("--dataset-uuid", help="Add to this dataset (default: a new one).")
    ] = None,
    api: Annotated[
        str | None, typer.Option("--api", help="Upload API URL (default: JOBBRIDGE_API_URL or host:port).")
    ] = None,
    parallel: Annotated[int, typer.Option(help="Chunks sent at once.")] = 4,
    upload_id: Annotated[
        str | None, typer.Option("--upload-id", help="Resume this upload (found automatically otherwise).")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="The file's SHA-256, checked by the server.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the upload job; exit 0 only if it completed.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a file (resumable chunks when large) and print the id of its upload job."""
    from jobbridge.client import UploadClient

    with UploadClient(_api_url(api)) as client:

        def send(callback: Any = None) -> Any:
            return client.upload(
                path,
                user_email=user_email,
                dataset_name=dataset_name,
                sensor=sensor,
                convert=convert,
                is_public=public,
                folder=folder,
                team_uuid=team_uuid,
                dataset_uuid=dataset_uuid,
                parallel=parallel,
                upload_id=upload_id,
                sha256=sha256,
                progress_callback=callback,
            )

        if as_json or not path.is_file():
            result = send()
        else:
            with console.TransferBar(path.name, path.stat().st_size) as bar:
                result = send(bar.update)
        if not wait:
            if as_json:
                console.print_json(result.as_dict())
            else:
                print(result.job_id)
            return
        if as_json:
            final = client.wait_for_completion(result.job_id, timeout=timeout)
            console.print_json({**result.as_dict(), "job": final})
        else:
            console.err.print(
                f"job {result.job_id} (sha256 {result.sha256})", highlight=False, soft_wrap=True
            )
            final = console.watch_upload_job(client.wait_for_completion, result.job_id, timeout)
            error = final.get("error")
            print(f"{result.job_id} {final['status']}" + (f": {error}" if error else ""))
    if final["status"] != "completed":
        raise typer.Exit(1)


def _point_prefect_at_stack() -> None:
    """Before Prefect is imported: use the embedded stack's API when nothing else is configured."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("JOBBRIDGE_PREFECT_API_URL"):
        return
    from jobbridge.stack import running_api_url

    url = running_api_url(get_settings())
    if url:
        os.environ["PREFECT_API_URL"] = url


def main() -> None:
    """Console-script entry point: run the CLI, turn every error into one line and an exit code."""
    try:
        _point_prefect_at_stack()
        app(prog_name="jobbridge")
    except JobbridgeError as exc:
        console.print_error(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # last resort: never show a traceback to a user
        if os.environ.get("JOBBRIDGE_TRACEBACK"):
            raise
        console.print_error(f"{type(exc).__name__}: {exc} (set JOBBRIDGE_TRACEBACK=1 for details)")
        sys.exit(1)


if __name__ == "__main__":
    main()
