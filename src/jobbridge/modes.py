"""Processing modes at run time: what DEBUG and TEST change in a process that runs jobs.

DEBUG writes a debug-level log of every step (jobbridge's and Prefect's) to the debug log file
(``job_processor_debug.log`` by default, as receipt_trainer did). TEST changes names only; it lives in
:class:`jobbridge.settings.Settings` (``namespace``), so this module only handles logging.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jobbridge.settings import ProcessingMode, Settings

_HANDLER_NAME = "jobbridge-debug-file"
_DEBUG_LOGGERS = ("jobbridge", "prefect.flow_runs", "prefect.task_runs")


def job_environment(settings: Settings) -> dict[str, str]:
    """Environment a job's process needs to run in the submitter's mode (passed to the worker)."""
    env = {"JOBBRIDGE_MODE": settings.mode.value, "JOBBRIDGE_TEST_PREFIX": settings.test_prefix}
    if settings.mode is ProcessingMode.DEBUG:
        env["JOBBRIDGE_DEBUG_LOG_FILE"] = str(settings.debug_log_file.expanduser().resolve())
    return env


def configure_logging(settings: Settings) -> Path | None:
    """In DEBUG mode, send every step's debug log to the debug log file; returns that file's path.

    Idempotent: a second call for the same file adds no second handler; another file replaces it.
    """
    if settings.mode is not ProcessingMode.DEBUG:
        return None
    path = settings.debug_log_file.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    for logger_name in _DEBUG_LOGGERS:
        logger = logging.getLogger(logger_name)
        logger.setLevel(logging.DEBUG)
        existing = [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]
        if any(getattr(h, "baseFilename", None) == str(path) for h in existing):
            continue
        for handler in existing:  # the debug file changed: write to the new one only
            logger.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.set_name(_HANDLER_NAME)
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s pid={os.getpid()} %(name)s: %(message)s")
        )
        logger.addHandler(handler)
    return path


def debug_logger(name: str) -> logging.Logger:
    """A ``jobbridge.*`` logger, which the DEBUG mode writes to the debug file."""
    return logging.getLogger(f"jobbridge.{name}")
