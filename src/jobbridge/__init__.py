"""jobbridge: one job system on Prefect 3 for the jobs of five legacy systems.

The public API is small: build a :class:`Job`, :func:`submit` it, then :func:`get_job`, :func:`list_jobs`,
:func:`cancel`, :func:`retry` or read its :func:`logs`. Custom job types register with :func:`job_type`.
Everything is imported lazily so that ``import jobbridge`` stays cheap (Prefect alone takes ~1.5 s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobbridge.errors import JobbridgeError
from jobbridge.jobs import Job, JobStatus, JobType
from jobbridge.settings import ProcessingMode, Settings, get_settings

if TYPE_CHECKING:
    from jobbridge.control import (
        JobPage,
        cancel,
        get_job,
        list_jobs,
        logs,
        retry,
        submit,
        wait_for,
    )
    from jobbridge.registry import job_type

__all__ = [
    "Job",
    "JobPage",
    "JobStatus",
    "JobType",
    "JobbridgeError",
    "ProcessingMode",
    "Settings",
    "cancel",
    "get_job",
    "get_settings",
    "job_type",
    "list_jobs",
    "logs",
    "retry",
    "submit",
    "wait_for",
]

_LAZY = {
    "JobPage": "jobbridge.control",
    "cancel": "jobbridge.control",
    "get_job": "jobbridge.control",
    "list_jobs": "jobbridge.control",
    "logs": "jobbridge.control",
    "retry": "jobbridge.control",
    "submit": "jobbridge.control",
    "wait_for": "jobbridge.control",
    "job_type": "jobbridge.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jobbridge' has no attribute {name!r}")
