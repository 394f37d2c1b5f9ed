"""What the mirror service writes to: a *target* is one store in one layout.

The service (:mod:`jobbridge.mirror.service`) knows nothing about DynamoDB or MongoDB; it hands every
transition to each target whose layout applies to the job. A target's :meth:`MirrorTarget.apply` must be
idempotent and monotonic (conditional on the transition's ``seq``), make at most one write request, and
raise on a store that cannot be reached (the service keeps the change in its outbox and retries it) or
:class:`MirrorEncodeError` when the job can never be stored in the layout (the service records it and
moves on: retrying would not help).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from jobbridge.errors import JobbridgeError
from jobbridge.jobs import Job
from jobbridge.mirror.transition import Transition

__all__ = [
    "JOBBRIDGE_LAYOUT",
    "LEGACY_LAYOUTS",
    "MirrorEncodeError",
    "MirrorTarget",
    "layouts_for",
]

#: jobbridge's own layout: every job goes there.
JOBBRIDGE_LAYOUT = "jobbridge"
#: The legacy layouts and the store each lives in.
LEGACY_LAYOUTS: Mapping[str, str] = {
    "scientistcloud": "mongodb",
    "receipt_trainer": "dynamodb",
    "delphi": "dynamodb",
    "argoitny": "dynamodb",
}
#: A job (or its deployment) tagged ``mirror:<layout>`` is also mirrored in that layout.
LAYOUT_TAG_PREFIX = "mirror:"


class MirrorEncodeError(JobbridgeError):
    """A job cannot be stored in a mirror layout (a permanent problem: retrying will not help)."""

    exit_code = 2


@runtime_checkable
class MirrorTarget(Protocol):
    """One store in one layout; see the module docstring for the contract of :meth:`apply`."""

    #: Unique per service, e.g. ``dynamodb:jobbridge`` or ``mongodb:scientistcloud``.
    name: str
    #: ``jobbridge`` or one of :data:`LEGACY_LAYOUTS`.
    layout: str

    def ensure(self) -> None:
        """Create tables, indexes and collections this target needs (idempotent)."""
        ...

    def apply(self, transition: Transition) -> bool:
        """Write one transition; False when it was stale or a duplicate (nothing written)."""
        ...


def layouts_for(job: Job, by_type: Mapping[str, Iterable[str]]) -> set[str]:
    """The layouts a job is mirrored in: jobbridge's, those configured for its type, those it is tagged with.

    ``by_type`` maps a legacy layout to the job types it holds (``"*"`` for all of them). Tags come from
    the job itself or, since Prefect copies deployment tags onto runs, from its deployment.
    """
    chosen = {JOBBRIDGE_LAYOUT}
    for layout, types in by_type.items():
        names = set(types)
        if "*" in names or job.type in names:
            chosen.add(layout)
    for tag in job.tags:
        if tag.startswith(LAYOUT_TAG_PREFIX):
            chosen.add(tag.removeprefix(LAYOUT_TAG_PREFIX))
    return chosen
