"""What a training entry point is given (:class:`TrainContext`) and what one attempt produced.

An entry point is a function ``train(ctx: TrainContext) -> result``. The context hands it the job's
``config``, the state to resume from, and three duties it cannot do for itself: saving checkpoints where
the next attempt (on any worker) will find them, reporting steps (the job's progress), and telling it
when to stop (a spot interruption notice). The usual loop::

    def train(ctx: TrainContext) -> dict[str, float]:
        state = ctx.load_checkpoint() or fresh_state(ctx.config)
        for step in range(ctx.start_step + 1, ctx.steps + 1):
            state = one_step(state)
            if ctx.step_done(step, lambda: state, loss=state["loss"]):
                return {}          # interrupted: checkpointed, the job is handed back and resumes
        return {"loss": state["loss"]}

``step_done`` reports the step and saves a checkpoint every ``checkpoint_every`` steps, after the last
step, and at once when :meth:`TrainContext.should_stop` turns true; then it returns True and the
function should return. The job counts as interrupted (and is handed back) when the function returns
after ``should_stop()`` turned true and before ``steps`` steps were reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobbridge.training.checkpoints import Checkpoint, CheckpointStore

__all__ = ["StepCallback", "TrainContext", "TrainOutcome"]

log = logging.getLogger("jobbridge.training")

#: Called with the step reached and its metrics, e.g. to move the job's progress bar.
StepCallback = Callable[[int, Mapping[str, float]], None]


def _never() -> bool:
    return False


class TrainContext:
    """The running job as an entry point sees it (see the module docstring for the loop).

    ``stop`` is polled by :meth:`should_stop` (the spot watcher's flag in a job); ``on_step`` gets every
    reported step. The checkpoint to resume from is read from ``store`` when the context is made.
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any],
        steps: int,
        checkpoint_every: int,
        store: CheckpointStore,
        stop: Callable[[], bool] = _never,
        on_step: StepCallback | None = None,
    ) -> None:
        self.config: dict[str, Any] = dict(config)
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.store = store
        self._stop = stop
        self._on_step = on_step
        self._stop_seen = False
        #: The checkpoint this attempt resumes from (None: a fresh start).
        self.resumed_from: Checkpoint | None = store.latest()
        #: The step the checkpoint was taken after: the loop starts at ``start_step + 1``.
        self.start_step: int = self.resumed_from.step if self.resumed_from else 0
        #: The last step reported (``start_step`` until the first report).
        self.step: int = self.start_step
        #: The newest checkpoint, this attempt's or the one it resumed from.
        self.last_checkpoint: Checkpoint | None = self.resumed_from
        #: The metrics of the last reported step.
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------ checkpoints

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state saved by the checkpoint this attempt resumes from, or None on a fresh start."""
        if self.resumed_from is None:
            return None
        return self.store.load_state(self.resumed_from)

    def save_checkpoint(self, step: int, state: Mapping[str, Any]) -> Checkpoint:
        """Save ``state`` as the checkpoint after ``step`` (numpy arrays and JSON values, flat)."""
        checkpoint = self.store.save_state(step, state)
        self.last_checkpoint = checkpoint
        log.info("checkpoint after step %d saved to %s", step, checkpoint.url)
        return checkpoint

    def checkpoint_due(self, step: int) -> bool:
        """True when a checkpoint should be taken after ``step``: every ``checkpoint_every`` steps,
        after the last step, and whenever the job has been asked to stop."""
        return step % self.checkpoint_every == 0 or step >= self.steps or self.should_stop()

    # ----------------------------------------------------------------------------- progress, stop

    def report(self, step: int, **metrics: float) -> None:
        """Record that ``step`` is done (moves the job's progress), with optional metrics."""
        self.step = step
        self.metrics = {name: float(value) for name, value in metrics.items()}
        if self._on_step is not None:
            self._on_step(step, self.metrics)

    def should_stop(self) -> bool:
        """True once the job must stop: checkpoint and return. Stays true once it has been true."""
        if not self._stop_seen and self._stop():
            self._stop_seen = True
            log.warning("stop requested at step %d", self.step)
        return self._stop_seen

    def step_done(self, step: int, state: Callable[[], Mapping[str, Any]], **metrics: float) -> bool:
        """Report ``step``; checkpoint ``state()`` when due; True means "return now" (stop requested).

        ``state`` is a function so that the (possibly large) state is only built when a checkpoint is
        due, not after every step.
        """
        self.report(step, **metrics)
        if self.checkpoint_due(step):
            self.save_checkpoint(step, state())
        return self.should_stop()

    # -------------------------------------------------------------------------------- outcome

    @property
    def finished(self) -> bool:
        """True once ``steps`` steps have been reported."""
        return self.step >= self.steps

    @property
    def interrupted(self) -> bool:
        """True when the attempt stopped on request before finishing (the job is then handed back)."""
        return self._stop_seen and not self.finished


@dataclass
class TrainOutcome:
    """What one training attempt ended with."""

    interrupted: bool
    start_step: int
    step: int
    checkpoint: Checkpoint | None
    output: Any = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, ctx: TrainContext, output: Any = None) -> TrainOutcome:
        """The outcome of an attempt run through ``ctx``."""
        return cls(
            interrupted=ctx.interrupted,
            start_step=ctx.start_step,
            step=ctx.step,
            checkpoint=ctx.last_checkpoint,
            output=output,
            metrics=dict(ctx.metrics),
        )
