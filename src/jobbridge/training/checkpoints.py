"""Checkpoints of training jobs, in the dataset store (any fsspec URL: a local directory, ``s3://...``).

Layout: ``{dataset_store_url}/checkpoints/{key}/step-{n}/`` (one directory per checkpoint) and
``{...}/{key}/latest``, a small JSON pointer to the newest complete one. The key is the job id (the
flow run id, which stays the same across Prefect retries and ``jobbridge retry``) or an explicit
``checkpoint_key``, so whichever worker runs the next attempt finds the same checkpoints.

Why writes are safe to kill at any instant (a spot instance may vanish mid-write):

1. a checkpoint is written under a temporary name (``.tmp-step-{n}-{random}``) and then moved to
   ``step-{n}``: a rename on a local disk, so a reader never sees half a checkpoint there;
2. ``latest`` is written last (locally a temporary file renamed over it; on an object store one PUT,
   which is atomic there), and readers trust only ``latest``. On S3, where moving a "directory" is a
   copy of each object followed by a delete, step 2 is what makes a checkpoint visible only once it
   is complete.

Every checkpoint directory holds ``_checkpoint.json`` (its step and time), so that it is never an
empty prefix on an object store (which would not exist there).

Python entry points save a flat mapping: numpy arrays go to ``arrays.npz`` (loaded with
``allow_pickle=False``), everything else to ``state.json``. No pickle on purpose: checkpoints live in a
shared store and are loaded by every worker, and unpickling runs code.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from jobbridge.errors import JobbridgeError, JobValidationError
from jobbridge.settings import Settings, get_settings

__all__ = [
    "ARRAYS_FILE",
    "CHECKPOINT_KEY_PATTERN",
    "LATEST",
    "META_FILE",
    "STATE_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "checkpoint_key_problem",
    "step_of",
]

#: Directory of the dataset store that holds every job's checkpoints.
CHECKPOINTS_DIR = "checkpoints"
#: Name of the pointer to the newest complete checkpoint.
LATEST = "latest"
#: Files of a checkpoint saved by a Python entry point.
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
#: Written into every checkpoint directory (see the module docstring).
META_FILE = "_checkpoint.json"
#: A checkpoint key is one path segment: no ``/``, no ``..``, nothing a shell or S3 would mangle.
CHECKPOINT_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
_KEY = re.compile(CHECKPOINT_KEY_PATTERN)
_STEP_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
#: The keys moto and other emulators accept (clients refuse to sign requests without some key).
_EMULATOR_KEY = "testing"


class CheckpointError(JobbridgeError):
    """A checkpoint could not be written or read."""


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: the step it was taken after and where it lives."""

    step: int
    url: str

    @property
    def name(self) -> str:
        """Its directory name, ``step-{n}``."""
        return f"step-{self.step}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory name ``step-{n}``, else None (temporary or foreign entries)."""
    match = _STEP_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a job's checkpoints (it becomes one path segment), or None."""
    if _KEY.match(key) and key not in (".", ".."):
        return None
    return "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit (no '/')"


def _storage_options(url: str, settings: Settings) -> dict[str, Any]:
    """s3fs options for an ``s3://`` store: the settings' endpoint (embedded moto unless configured) and
    keys; other stores need none. No listing cache: another worker may have written since."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    options: dict[str, Any] = {
        "client_kwargs": {"region_name": settings.aws_region},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }
    endpoint = settings.s3_endpoint
    if endpoint:
        options["endpoint_url"] = endpoint
    secret = settings.aws_secret_access_key
    if settings.aws_access_key_id and secret is not None:
        options["key"], options["secret"] = settings.aws_access_key_id, secret.get_secret_value()
    elif endpoint:
        options["key"] = options["secret"] = _EMULATOR_KEY
    return options


def _meta(step: int) -> bytes:
    return json.dumps({"step": step, "saved_at": datetime.now(UTC).isoformat()}).encode()


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars become Python numbers; anything else is refused."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


class CheckpointStore:
    """The checkpoints of one job (one key) under ``root_url``; see the module docstring for the layout.

    ``keep`` is how many complete checkpoints survive a save (older ones are deleted after the pointer
    moved on). One job writes its checkpoints from one process at a time.
    """

    def __init__(
        self, root_url: str, *, keep: int = 3, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        if keep < 1:
            raise JobValidationError(f"keep_checkpoints is {keep}: keep at least 1 checkpoint")
        self.keep = keep
        self.fs, root = fsspec.core.url_to_fs(root_url, **dict(storage_options or {}))
        self.root: str = root.rstrip("/")
        self.url: str = root_url.rstrip("/")
        #: A local disk renames atomically; an object store copies object by object.
        self.local = isinstance(self.fs, LocalFileSystem)

    @classmethod
    def for_key(cls, key: str, *, settings: Settings | None = None, keep: int = 3) -> CheckpointStore:
        """The store of checkpoint key ``key`` under the dataset store (``settings.dataset_store_url``)."""
        problem = checkpoint_key_problem(key)
        if problem is not None:
            raise JobValidationError(f"checkpoint key '{key}' {problem}")
        settings = settings or get_settings()
        base = settings.dataset_store_url.rstrip("/")
        url = f"{base}/{CHECKPOINTS_DIR}/{key}"
        return cls(url, keep=keep, storage_options=_storage_options(url, settings))

    # ------------------------------------------------------------------------------------ reading

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def _url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (what ``latest`` points at), or None before the first one."""
        try:
            raw = self.fs.cat_file(self._path(LATEST))
        except FileNotFoundError:
            return None
        try:
            pointer = json.loads(raw)
            step = int(pointer["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{self._url_of(LATEST)} is not a checkpoint pointer ({exc}); delete it to start over"
            ) from None
        return Checkpoint(step, self._url_of(f"step-{step}"))

    def steps(self) -> list[int]:
        """Steps of the checkpoint directories present (complete ones: temporary names are skipped)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = (step_of(posixpath.basename(str(entry).rstrip("/"))) for entry in entries)
        return sorted(step for step in found if step is not None)

    def load_state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """The mapping a Python entry point saved in ``checkpoint`` (arrays and JSON values)."""
        base = self._path(checkpoint.name)
        try:
            state: dict[str, Any] = json.loads(self.fs.cat_file(posixpath.join(base, STATE_FILE)))
            arrays_path = posixpath.join(base, ARRAYS_FILE)
            if self.fs.exists(arrays_path):
                with np.load(io.BytesIO(self.fs.cat_file(arrays_path)), allow_pickle=False) as arrays:
                    state.update({name: arrays[name] for name in arrays.files})
        except FileNotFoundError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint.url} is incomplete or was not written by a Python entry point "
                f"({exc})"
            ) from None
        return state

    def download(self, checkpoint: Checkpoint, destination: Path) -> Path:
        """Copy ``checkpoint``'s directory to ``destination`` (which must not exist yet)."""
        try:
            self.fs.get(self._path(checkpoint.name), str(destination), recursive=True)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {checkpoint.url} is missing ({exc})") from None
        destination.mkdir(parents=True, exist_ok=True)
        (destination / META_FILE).unlink(missing_ok=True)  # the command gets back what it wrote
        return destination

    # ------------------------------------------------------------------------------------ writing

    def save_state(self, step: int, state: Mapping[str, Any]) -> Checkpoint:
        """Save a Python entry point's state after ``step``: arrays to ``arrays.npz``, the rest as JSON."""
        arrays = {name: value for name, value in state.items() if isinstance(value, np.ndarray)}
        plain = {name: value for name, value in state.items() if name not in arrays}
        try:
            state_json = json.dumps(plain, default=_jsonable).encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint state cannot be saved: {exc}; use numpy arrays (top level) and JSON values "
                "(no pickle: checkpoints are loaded by every worker)"
            ) from None
        arrays_bytes = b""
        if arrays:
            buffer = io.BytesIO()
            try:
                np.savez(buffer, allow_pickle=False, **arrays)
            except ValueError as exc:  # object arrays would need pickle
                raise CheckpointError(f"checkpoint arrays cannot be saved without pickle: {exc}") from None
            arrays_bytes = buffer.getvalue()

        def write(tmp: str) -> None:
            self.fs.makedirs(tmp, exist_ok=True)
            self.fs.pipe_file(posixpath.join(tmp, STATE_FILE), state_json)
            if arrays_bytes:
                self.fs.pipe_file(posixpath.join(tmp, ARRAYS_FILE), arrays_bytes)

        return self._commit(step, write)

    def save_directory(self, step: int, source: Path) -> Checkpoint:
        """Save a directory a command wrote (its whole tree) as the checkpoint after ``step``."""
        if not source.is_dir():
            raise CheckpointError(f"checkpoint {source} is not a directory")

        def write(tmp: str) -> None:
            if any(source.iterdir()):
                self.fs.put(str(source), tmp, recursive=True)
            else:
                self.fs.makedirs(tmp, exist_ok=True)

        return self._commit(step, write)

    def _commit(self, step: int, write: Callable[[str], None]) -> Checkpoint:
        """Write under a temporary name, move into place, then point ``latest`` at it, then prune."""
        if step < 0:
            raise CheckpointError(f"checkpoint step {step} is negative")
        name = f"step-{step}"
        tmp = self._path(f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        final = self._path(name)
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            write(tmp)
            self.fs.pipe_file(posixpath.join(tmp, META_FILE), _meta(step))
            if self.fs.exists(final):
                # Only complete checkpoints are ever moved into place, so this one is complete: an
                # earlier attempt saved this step (e.g. it was stopped right after resuming). Keep it:
                # replacing it would leave a moment in which ``latest`` may point at nothing.
                self.fs.rm(tmp, recursive=True)
            else:
                self._move_directory(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
            raise
        self._point_at(step)
        self._prune(step)
        return Checkpoint(step, self._url_of(name))

    def _move_directory(self, source: str, target: str) -> None:
        """Locally one atomic rename; on an object store a copy of each object, then a delete
        (fsspec's recursive ``mv`` there also tries to copy the "directory" key, which does not exist)."""
        if self.local:
            self.fs.mv(source, target, recursive=True)
            return
        files = [str(path) for path in self.fs.find(source)]
        self.fs.copy(files, [target + path[len(source) :] for path in files])
        self.fs.rm(source, recursive=True)

    def _point_at(self, step: int) -> None:
        pointer = json.dumps({"step": step, "name": f"step-{step}"}).encode()
        if not self.local:
            self.fs.pipe_file(self._path(LATEST), pointer)  # one PUT: atomic on an object store
            return
        tmp = self._path(f"{_TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:12]}")
        self.fs.pipe_file(tmp, pointer)
        self.fs.mv(tmp, self._path(LATEST))  # os.rename over the old pointer

    def _prune(self, current: int) -> None:
        """Delete all but the ``keep`` newest checkpoints at or before ``current`` (the pointer's)."""
        older = [step for step in self.steps() if step <= current]
        for step in older[: -self.keep]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(f"step-{step}"), recursive=True)

    def clear_partial(self) -> int:
        """Delete temporary entries left by a writer that was killed; returns how many.

        Called when an attempt starts (nobody else writes this key then), never while one writes.
        """
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return 0
        removed = 0
        for entry in entries:
            if posixpath.basename(str(entry).rstrip("/")).startswith(_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(str(entry), recursive=True)
                    removed += 1
        return removed
