"""Training jobs: the context an entry point gets, checkpoints, the spot watcher, the hand-back.

``jobbridge.flows.train`` puts these together; an entry point needs only :class:`TrainContext`.
"""

from jobbridge.training.checkpoints import Checkpoint, CheckpointStore
from jobbridge.training.context import TrainContext, TrainOutcome

__all__ = ["Checkpoint", "CheckpointStore", "TrainContext", "TrainOutcome"]
