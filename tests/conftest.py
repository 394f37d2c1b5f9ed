"""Session-wide real components for the test suite.

Prefect reads its settings when it is first imported, so the API URL and PREFECT_HOME of the test session
are fixed here, at conftest import, before any test module imports prefect. The server itself starts lazily,
once, the first time a test asks for ``prefect_api``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(tempfile.mkdtemp(prefix="jobbridge-tests-"))
PREFECT_PORT = free_port()
os.environ.update(
    {
        "PREFECT_HOME": str(SESSION_DIR / "prefect-client"),
        "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "JOBBRIDGE_HOME": str(SESSION_DIR / "stack"),
        "JOBBRIDGE_PREFECT_PORT": str(PREFECT_PORT),
        "JOBBRIDGE_MOTO_PORT": str(free_port()),
        "JOBBRIDGE_MONGO_PORT": str(free_port()),
        "JOBBRIDGE_DEBUG_LOG_FILE": str(SESSION_DIR / "job_processor_debug.log"),
        "JOBBRIDGE_PLUGINS": "tests.support.jobs",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
)
os.environ.pop("JOBBRIDGE_MODE", None)
os.environ.pop("JOBBRIDGE_PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """A temporary directory shared by the whole test session."""
    return SESSION_DIR


@pytest.fixture(scope="session")
def stack() -> Iterator[object]:
    """The embedded stack (Prefect server, local work pool and worker, moto_server, nx-27017), once."""
    from jobbridge.settings import reload_settings
    from jobbridge.stack import Stack

    running = Stack(reload_settings())
    running.up()
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(scope="session")
def prefect_api(stack: object) -> str:
    """URL of the session's real Prefect server (started by the stack)."""
    return os.environ["PREFECT_API_URL"]
