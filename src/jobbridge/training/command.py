"""Run one training attempt of a command (any program), which writes its own checkpoints.

The command gets a local checkpoint directory and learns where to resume from through its environment:

=============================  ====================================================================
``JOBBRIDGE_CHECKPOINT_DIR``   write each checkpoint here as a directory ``step-<n>``: build it under
                               another name (``.step-<n>.tmp``) and *rename* it to ``step-<n>`` when
                               complete, so a half-written one is never uploaded
``JOBBRIDGE_RESUME_FROM``      the checkpoint directory to resume from (empty on a fresh start)
``JOBBRIDGE_START_STEP``       the step that checkpoint was taken after (``0`` on a fresh start)
``JOBBRIDGE_TRAIN_STEPS``      total steps; ``JOBBRIDGE_CHECKPOINT_EVERY``: checkpoint interval
``JOBBRIDGE_TRAIN_CONFIG``     the job's ``config`` as JSON
=============================  ====================================================================

Each new ``step-<n>`` directory is uploaded to the checkpoint store (the newest one only, if several
appeared between two looks) and moves the job's progress. On a spot interruption notice the command's
process group gets SIGTERM (the command should write a checkpoint and exit), then, after
``grace_seconds``, SIGKILL; whatever checkpoint it wrote is uploaded before the job is handed back.
Exit status 0 means the training is complete; anything else fails the attempt (the task retries it,
resuming from the newest checkpoint).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jobbridge.errors import JobFailedError
from jobbridge.training.checkpoints import Checkpoint, CheckpointStore, step_of
from jobbridge.training.context import StepCallback, TrainOutcome

__all__ = ["ENV_CHECKPOINT_DIR", "CommandTraining", "run_command"]

ENV_CHECKPOINT_DIR = "JOBBRIDGE_CHECKPOINT_DIR"
ENV_RESUME_FROM = "JOBBRIDGE_RESUME_FROM"
ENV_START_STEP = "JOBBRIDGE_START_STEP"
ENV_STEPS = "JOBBRIDGE_TRAIN_STEPS"
ENV_CHECKPOINT_EVERY = "JOBBRIDGE_CHECKPOINT_EVERY"
ENV_CONFIG = "JOBBRIDGE_TRAIN_CONFIG"
#: Lines of the command's output quoted when it fails.
OUTPUT_TAIL_LINES = 20
#: Grace period when the run itself is being stopped (cancelled): the worker SIGKILLs us soon after.
_CANCEL_GRACE_SECONDS = 5.0

log = logging.getLogger("jobbridge.training")


@dataclass
class CommandTraining:
    """One command attempt: what to run and the job's training settings."""

    command: Sequence[str]
    store: CheckpointStore
    steps: int
    checkpoint_every: int
    config: Mapping[str, Any] = field(default_factory=dict)
    stop: Callable[[], bool] = lambda: False
    on_step: StepCallback | None = None
    on_output: Callable[[str], None] | None = None
    grace_seconds: float = 60.0
    poll_seconds: float = 0.25


class _Uploader:
    """Uploads the newest complete ``step-<n>`` directory the command wrote since the last look."""

    def __init__(self, local: Path, training: CommandTraining, resumed: Checkpoint | None) -> None:
        self.local = local
        self.training = training
        self.checkpoint = resumed
        self.step = resumed.step if resumed else 0

    def upload_new(self) -> None:
        steps = [step_of(entry.name) for entry in self.local.iterdir() if entry.is_dir()]
        newest = max((step for step in steps if step is not None and step > self.step), default=None)
        if newest is None:
            return
        self.checkpoint = self.training.store.save_directory(newest, self.local / f"step-{newest}")
        self.step = newest
        log.info("checkpoint after step %d uploaded to %s", newest, self.checkpoint.url)
        if self.training.on_step is not None:
            self.training.on_step(newest, {})


def _pump(stream: IO[str], tail: collections.deque[str], on_output: Callable[[str], None] | None) -> None:
    """Forward the command's output line by line (to the job's log) and keep its last lines."""
    for raw in stream:
        line = raw.rstrip("\n")
        tail.append(line)
        if on_output is not None:
            on_output(line)


def _terminate(process: subprocess.Popen[str], grace_seconds: float) -> None:
    """SIGTERM the command's process group, wait up to ``grace_seconds``, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        log.warning("command did not exit %.0f s after SIGTERM: SIGKILL", grace_seconds)
    with contextlib.suppress(ProcessLookupError):  # the leader or members it left behind
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _environment(training: CommandTraining, local: Path, resumed: Checkpoint | None) -> dict[str, str]:
    return {
        **os.environ,
        ENV_CHECKPOINT_DIR: str(local),
        ENV_RESUME_FROM: str(local / resumed.name) if resumed else "",
        ENV_START_STEP: str(resumed.step if resumed else 0),
        ENV_STEPS: str(training.steps),
        ENV_CHECKPOINT_EVERY: str(training.checkpoint_every),
        ENV_CONFIG: json.dumps(dict(training.config)),
    }


def run_command(training: CommandTraining) -> TrainOutcome:
    """Run the command to its end or until a stop is requested; upload its checkpoints meanwhile."""
    with tempfile.TemporaryDirectory(prefix="jobbridge-train-") as scratch:
        local = Path(scratch) / "checkpoints"
        local.mkdir()
        resumed = training.store.latest()
        if resumed is not None:
            training.store.download(resumed, local / resumed.name)
        uploader = _Uploader(local, training, resumed)
        tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        process = subprocess.Popen(
            list(training.command),
            env=_environment(training, local, resumed),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a stop signals the command and its children
        )
        assert process.stdout is not None
        reader = threading.Thread(
            target=_pump, args=(process.stdout, tail, training.on_output), name="jobbridge-train-output"
        )
        reader.start()
        try:
            stopped = _supervise(process, training, uploader)
        except BaseException:  # the run is being cancelled or crashed: never leave the command behind
            _terminate(process, min(training.grace_seconds, _CANCEL_GRACE_SECONDS))
            raise
        finally:
            reader.join(timeout=10)
        uploader.upload_new()
    return _outcome(process.returncode, stopped, resumed, uploader, list(tail))


def _supervise(process: subprocess.Popen[str], training: CommandTraining, uploader: _Uploader) -> bool:
    """Wait for the command, uploading checkpoints; True when it was stopped on request."""
    while True:
        try:
            process.wait(timeout=training.poll_seconds)
            return False
        except subprocess.TimeoutExpired:
            pass
        uploader.upload_new()
        if training.stop():
            log.warning("stop requested: SIGTERM to the command (grace %.0f s)", training.grace_seconds)
            _terminate(process, training.grace_seconds)
            return True


def _outcome(
    code: int, stopped: bool, resumed: Checkpoint | None, uploader: _Uploader, tail: list[str]
) -> TrainOutcome:
    start = resumed.step if resumed else 0
    output = {"exit_code": code, "output_tail": tail}
    if stopped:
        return TrainOutcome(True, start, uploader.step, uploader.checkpoint, output)
    if code != 0:
        quoted = "\n".join(tail) or "(no output)"
        raise JobFailedError(f"training command exited with status {code}; its last output:\n{quoted}")
    return TrainOutcome(False, start, uploader.step, uploader.checkpoint, output)
