"""Job type -> flow. Built-in types register on import of :mod:`jobbridge.flows`; users add their own.

A custom job type is a Prefect flow plus, optionally, a pydantic model of its parameters::

    from prefect import flow
    from pydantic import BaseModel
    import jobbridge

    class Greeting(BaseModel):
        who: str

    @jobbridge.job_type("greet", parameters=Greeting)
    @flow
    def greet(who: str) -> dict[str, str]:
        return {"greeting": f"hello {who}"}

The parameters model is checked at submission, before a flow run exists, so bad input never queues.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect import Flow
from pydantic import BaseModel, ValidationError

from jobbridge.errors import JobValidationError, UnknownJobTypeError
from jobbridge.jobs import normalise_type

F = TypeVar("F", bound=Flow[Any, Any])


@dataclass(frozen=True)
class JobTypeSpec:
    """A registered job type: its flow, the model of its parameters, and where a worker finds it."""

    name: str
    flow: Flow[Any, Any]
    parameters_model: type[BaseModel] | None = None
    description: str = ""
    entrypoint: str = ""
    aliases: tuple[str, ...] = field(default=())

    def validate_parameters(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``parameters`` against the model; the error names every bad field and what it takes."""
        if self.parameters_model is None:
            return dict(parameters)
        try:
            model = self.parameters_model.model_validate(dict(parameters))
        except ValidationError as exc:
            raise JobValidationError(describe_validation_error(self.name, exc)) from None
        return _absolute_paths(model).model_dump(mode="json", exclude_unset=True)


def _absolute_paths(model: BaseModel) -> BaseModel:
    """Make relative path parameters absolute, against the submitter's working directory.

    A job runs in its worker's process, whose working directory is not the submitter's: ``data/`` must
    mean the directory the user meant when they typed it.
    """
    updates = {
        name: Path(os.path.abspath(value.expanduser()))
        for name, value in model
        if isinstance(value, Path) and name in model.model_fields_set
    }
    return model.model_copy(update=updates) if updates else model


def describe_validation_error(job_type: str, exc: ValidationError) -> str:
    """One line per bad field: ``<type>: parameter 'x': <what is wrong>``."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "parameters"
        message = error["msg"]
        if error["type"] == "missing":
            message = "is required"
        elif error["type"] == "extra_forbidden":
            message = "is not a parameter of this job type"
        problems.append(f"parameter '{location}' {message}")
    return f"invalid parameters for job type '{job_type}': " + "; ".join(problems)


_REGISTRY: dict[str, JobTypeSpec] = {}
_builtins_loaded = False


def _entrypoint_of(flow: Flow[Any, Any]) -> str:
    """Where a worker imports the flow from: ``module:attr``, or ``/path/file.py:attr`` for scripts."""
    module_name = flow.fn.__module__
    attribute = flow.fn.__name__
    if module_name == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            return ""
        return f"{Path(main_file).resolve()}:{attribute}"
    return f"{module_name}:{attribute}"


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def register(
    name: str,
    flow: Flow[Any, Any],
    *,
    parameters: type[BaseModel] | None = None,
    description: str | None = None,
    aliases: tuple[str, ...] = (),
    entrypoint: str | None = None,
) -> JobTypeSpec:
    """Register ``flow`` as job type ``name`` (re-registering the same name replaces it)."""
    type_name = normalise_type(name)
    if not isinstance(flow, Flow):
        raise TypeError(f"job type '{type_name}' must be a Prefect flow, got {type(flow).__name__}")
    spec = JobTypeSpec(
        name=type_name,
        flow=flow,
        parameters_model=parameters,
        description=description or _first_line(flow.description),
        entrypoint=entrypoint or _entrypoint_of(flow),
        aliases=aliases,
    )
    _REGISTRY[type_name] = spec
    for alias in aliases:
        _REGISTRY[normalise_type(alias)] = spec
    return spec


def job_type(
    name: str,
    *,
    parameters: type[BaseModel] | None = None,
    description: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[F], F]:
    """Decorator form of :func:`register`, applied on top of ``@flow``."""

    def decorate(flow: F) -> F:
        register(name, flow, parameters=parameters, description=description, aliases=aliases)
        return flow

    return decorate


def load_plugins(modules: list[str]) -> None:
    """Import the built-in flows and each plugin module so that their job types register."""
    global _builtins_loaded
    if not _builtins_loaded:
        importlib.import_module("jobbridge.flows")
        _builtins_loaded = True
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise JobValidationError(
                f"plugin module '{module}' (JOBBRIDGE_PLUGINS) cannot be imported: {exc}"
            ) from None


def known_types() -> list[str]:
    """Names of every registered job type (without aliases), sorted."""
    _ensure_loaded()
    return sorted({spec.name for spec in _REGISTRY.values()})


def get_spec(name: str) -> JobTypeSpec:
    """The spec of job type ``name``; an unknown name is an error that lists the known ones."""
    _ensure_loaded()
    key = normalise_type(name)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownJobTypeError(
            f"unknown job type '{name}'; known job types: {', '.join(known_types())}"
        ) from None


def _ensure_loaded() -> None:
    if not _builtins_loaded:
        from jobbridge.settings import get_settings

        load_plugins(get_settings().plugins)
