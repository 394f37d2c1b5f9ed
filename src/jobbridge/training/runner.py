"""Run one training attempt of a Python entry point (``module:function`` called with a TrainContext)."""

from __future__ import annotations

import logging

from jobbridge.training.context import TrainContext, TrainOutcome
from jobbridge.training.entrypoint import load_entry_point

__all__ = ["run_entry_point"]

log = logging.getLogger("jobbridge.training")


def run_entry_point(entry_point: str, ctx: TrainContext) -> TrainOutcome:
    """Call the entry point with ``ctx``; the outcome says whether it finished or was interrupted.

    An exception raised after a stop was requested counts as an interruption, not a failure: the
    instance is going away, and the next attempt (elsewhere) resumes from the last checkpoint and will
    tell whether the error is real. Any other exception propagates (the task retries it).
    """
    function = load_entry_point(entry_point)
    try:
        output = function(ctx)
    except Exception:
        if not (ctx.should_stop() and not ctx.finished):
            raise
        log.warning("entry point raised after the stop request; treated as interrupted", exc_info=True)
        output = None
    outcome = TrainOutcome.of(ctx, output)
    if outcome.interrupted:
        saved = outcome.checkpoint.step if outcome.checkpoint else 0
        if saved < outcome.step:
            log.warning(
                "stopped at step %d but the newest checkpoint is after step %d: the next attempt "
                "repeats the steps in between (checkpoint when should_stop() turns true)",
                outcome.step,
                saved,
            )
    return outcome
