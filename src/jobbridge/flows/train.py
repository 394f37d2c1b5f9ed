"""``train``: run a training, checkpointing to the dataset store, surviving kills and spot interruptions.

receipt_trainer's training jobs. The training is a Python entry point (``module:function``, called with a
:class:`~jobbridge.training.context.TrainContext`) or a command (see :mod:`jobbridge.training.command`).
Checkpoints go to ``{dataset_store_url}/checkpoints/{key}/step-{n}`` every ``checkpoint_every`` steps,
keyed by the job id (the flow run id, the same across Prefect retries and ``jobbridge retry``) or by
``checkpoint_key``, so every later attempt, on any worker, resumes from the newest one.

While the training runs, a background thread watches the EC2 spot interruption notice
(``JOBBRIDGE_SPOT_NOTICE_URL`` every ``JOBBRIDGE_SPOT_POLL_SECONDS``). On a notice the training
checkpoints at once and stops, and the run is handed back to the work pool in AwaitingRetry (RETRYING;
receipt_trainer's ``interrupted``): any worker claims it after ``requeue_delay_seconds`` and resumes
(see :mod:`jobbridge.training.handback`).
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Self
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobbridge.flows.common import RETRYABLE, begin, retry_unless_user_error
from jobbridge.registry import job_type
from jobbridge.settings import get_settings
from jobbridge.tasks.progress import Progress, record_result, start_progress
from jobbridge.training.checkpoints import (
    CHECKPOINT_KEY_PATTERN,
    CheckpointStore,
    checkpoint_key_problem,
)
from jobbridge.training.command import CommandTraining, run_command
from jobbridge.training.context import TrainContext, TrainOutcome
from jobbridge.training.entrypoint import ENTRY_POINT_FORM, entry_point_problem
from jobbridge.training.handback import hand_back
from jobbridge.training.runner import run_entry_point
from jobbridge.training.spot import SpotWatcher


class TrainParameters(BaseModel):
    """Parameters of a ``train`` job."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0, description="Training steps in all (attempts resume where the last stopped).")
    entry_point: str | None = Field(
        default=None,
        description=f"Python function to train with, {ENTRY_POINT_FORM}, called with a TrainContext. "
        "Give this or 'command'.",
    )
    command: list[str] | None = Field(
        default=None,
        description="Program to train with, as an argument list (or one shell-quoted string); it writes "
        "step-<n> checkpoint directories into $JOBBRIDGE_CHECKPOINT_DIR itself. Give this or "
        "'entry_point'.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="Training configuration, given to the entry point or command."
    )
    checkpoint_every: int = Field(default=100, gt=0, description="Steps between two checkpoints.")
    checkpoint_key: str | None = Field(
        default=None,
        pattern=CHECKPOINT_KEY_PATTERN,
        description="Name of the checkpoint series (default: the job id). Give the key of an earlier "
        "job to resume its training in a new job.",
    )
    keep_checkpoints: int = Field(default=3, ge=1, description="Newest checkpoints kept in the store.")
    requeue_delay_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="After a spot interruption the job waits this long (RETRYING) before a worker may "
        "claim it, so that the interrupted instance is gone by then.",
    )
    stop_grace_seconds: float = Field(
        default=60.0,
        gt=0,
        le=600,
        description="Command only: seconds between SIGTERM and SIGKILL when it must stop.",
    )

    @field_validator("command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot be split into arguments ({exc})") from None
        return value

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0].strip()):
            raise ValueError("must name a program to run (it is empty)")
        return value

    @field_validator("entry_point")
    @classmethod
    def _entry_point_loads(cls, value: str | None) -> str | None:
        if value is not None:
            problem = entry_point_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("checkpoint_key")
    @classmethod
    def _key_is_a_segment(cls, value: str | None) -> str | None:
        problem = None if value is None else checkpoint_key_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("config")
    @classmethod
    def _config_is_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON ({exc})") from None
        return value

    @model_validator(mode="after")
    def _one_way_to_train(self) -> Self:
        if (self.entry_point is None) == (self.command is None):
            given = "both" if self.entry_point is not None else "neither"
            raise ValueError(f"give exactly one of 'entry_point' and 'command' ({given} given)")
        return self

    def describe(self) -> str:
        """What is trained, for progress and log lines."""
        if self.entry_point is not None:
            return self.entry_point
        return shlex.join(self.command or [])


def _job_id() -> str:
    """This run's id (the job id); a fresh one outside a flow run (then give a checkpoint_key)."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        return str(context.flow_run.id)
    return str(uuid.uuid4())


def _no_retry_once_stopped(stop: Callable[[], bool]) -> Callable[..., bool]:
    """Task retry condition: as every task's, but never once a stop was requested (a retry on an
    instance about to vanish is wasted; the hand-back resumes the training elsewhere)."""

    def condition(task: Any, task_run: Any, state: Any) -> bool:
        return retry_unless_user_error(task, task_run, state) and not stop()

    return condition


def _progress_callback(tracker: Progress) -> Callable[[int, Mapping[str, float]], None]:
    """Steps reached -> the job's progress bar (a resumed attempt starts at its checkpoint's step)."""

    def on_step(step: int, metrics: Mapping[str, float]) -> None:
        if step > tracker.done:
            tracker.advance(step - tracker.done)

    return on_step


@task(name="train-steps", cache_policy=NO_CACHE, **RETRYABLE)
def run_training(
    params: TrainParameters,
    checkpoint_key: str,
    stop: Callable[[], bool],
    artifact_id: UUID | None = None,
) -> TrainOutcome:
    """One attempt: resume from the newest checkpoint, train until done or told to stop.

    Not cached (checkpoints are the memory); a retry (this task's, the flow's, ``jobbridge retry``)
    reloads the newest checkpoint, so no step is lost beyond those since it.
    """
    store = CheckpointStore.for_key(checkpoint_key, keep=params.keep_checkpoints)
    store.clear_partial()  # what a killed writer left; nobody else writes this key now
    tracker = Progress(artifact_id, params.steps, unit="steps")
    on_step = _progress_callback(tracker)
    if params.command is not None:
        outcome = _train_command(params, params.command, store, stop, on_step)
    else:
        assert params.entry_point is not None  # the model guarantees one of the two
        outcome = _train_entry_point(params, params.entry_point, store, stop, on_step)
    if not outcome.interrupted:
        tracker.finish()
    return outcome


def _train_entry_point(
    params: TrainParameters,
    entry_point: str,
    store: CheckpointStore,
    stop: Callable[[], bool],
    on_step: Callable[[int, Mapping[str, float]], None],
) -> TrainOutcome:
    ctx = TrainContext(
        config=params.config,
        steps=params.steps,
        checkpoint_every=params.checkpoint_every,
        store=store,
        stop=stop,
        on_step=on_step,
    )
    on_step(ctx.start_step, {})
    if ctx.resumed_from is not None:
        get_run_logger().info("resuming from %s (step %d)", ctx.resumed_from.url, ctx.start_step)
    return run_entry_point(entry_point, ctx)


def _train_command(
    params: TrainParameters,
    command: list[str],
    store: CheckpointStore,
    stop: Callable[[], bool],
    on_step: Callable[[int, Mapping[str, float]], None],
) -> TrainOutcome:
    latest = store.latest()
    on_step(latest.step if latest else 0, {})
    if latest is not None:
        get_run_logger().info("resuming from %s (step %d)", latest.url, latest.step)
    return run_command(
        CommandTraining(
            command=command,
            store=store,
            steps=params.steps,
            checkpoint_every=params.checkpoint_every,
            config=params.config,
            stop=stop,
            on_step=on_step,
            on_output=get_run_logger().info,
            grace_seconds=params.stop_grace_seconds,
        )
    )


def _jsonable(value: Any) -> Any:
    """The entry point's output as JSON (the job's result); what JSON cannot hold becomes its repr."""
    return json.loads(json.dumps(value, default=repr))


@job_type("train", parameters=TrainParameters, aliases=("training",))
@flow(
    name="train",
    description="Train a model (Python entry point or command) with checkpoints; resumes after kills "
    "and spot interruptions.",
)
def train(
    steps: int,
    entry_point: str | None = None,
    command: list[str] | str | None = None,
    config: dict[str, Any] | None = None,
    checkpoint_every: int = 100,
    checkpoint_key: str | None = None,
    keep_checkpoints: int = 3,
    requeue_delay_seconds: float = 30.0,
    stop_grace_seconds: float = 60.0,
) -> dict[str, Any]:
    """Train ``steps`` steps, resuming from the newest checkpoint; returns the entry point's output."""
    params = begin(
        "train",
        TrainParameters,
        steps=steps,
        entry_point=entry_point,
        command=command,
        config=config or {},
        checkpoint_every=checkpoint_every,
        checkpoint_key=checkpoint_key,
        keep_checkpoints=keep_checkpoints,
        requeue_delay_seconds=requeue_delay_seconds,
        stop_grace_seconds=stop_grace_seconds,
    )
    key = params.checkpoint_key or _job_id()
    settings = get_settings()
    artifact_id = start_progress(f"Training {params.describe()} for {params.steps} steps")
    with SpotWatcher(settings.spot_notice_url, settings.spot_poll_seconds) as watcher:
        outcome = run_training.with_options(retry_condition_fn=_no_retry_once_stopped(watcher.is_set))(
            params, key, watcher.is_set, artifact_id=artifact_id
        )
    if outcome.interrupted:
        notice = watcher.notice.describe() if watcher.notice else "stop requested"
        where = outcome.checkpoint.url if outcome.checkpoint else "none yet"
        reason = f"{notice}: stopped after step {outcome.step}; checkpoint {where}"
        get_run_logger().warning("%s; handing the job back to the work pool", reason)
        hand_back(reason, delay_seconds=params.requeue_delay_seconds)
    result = {
        "checkpoint_key": key,
        "steps": params.steps,
        "step": outcome.step,
        "resumed_from_step": outcome.start_step,
        "checkpoint": outcome.checkpoint.url if outcome.checkpoint else None,
        "metrics": outcome.metrics,
        "output": _jsonable(outcome.output),
    }
    resumed = f", resumed from step {outcome.start_step}" if outcome.start_step else ""
    record_result(result, f"Trained {params.describe()} to step {outcome.step}{resumed}")
    return result
