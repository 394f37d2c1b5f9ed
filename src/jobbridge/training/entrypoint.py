"""``module:function`` entry points of training jobs: checked at submission, loaded in the worker.

Checked when the job is submitted (so a typo fails before anything queues) and again when the run
starts (the worker's environment is the one that must have the module).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

__all__ = ["ENTRY_POINT_FORM", "EntryPointError", "entry_point_problem", "load_entry_point"]

#: What an entry point looks like, for error messages.
ENTRY_POINT_FORM = "'package.module:function' (e.g. 'jobbridge.training.examples:linear_regression')"
_ENTRY_POINT = re.compile(
    r"^(?P<module>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)"
    r":(?P<attr>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$"
)


class EntryPointError(ValueError):
    """The entry point is malformed, cannot be imported, or is not callable; the message says which."""


def load_entry_point(value: str) -> Callable[..., Any]:
    """Import ``module:function`` and return the function (dotted attributes, ``mod:Class.method``, work)."""
    match = _ENTRY_POINT.match(value.strip())
    if match is None:
        raise EntryPointError(f"'{value}' is not of the form {ENTRY_POINT_FORM}")
    module_name, attribute = match.group("module"), match.group("attr")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # the module's own import may fail in any way; all mean "cannot import"
        raise EntryPointError(
            f"module '{module_name}' cannot be imported ({type(exc).__name__}: {exc}); install it where "
            "the workers run, or add it to their PYTHONPATH"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise EntryPointError(f"module '{module_name}' has no attribute '{attribute}'") from None
    if not callable(target):
        raise EntryPointError(f"'{value}' is a {type(target).__name__}, not a function")
    function: Callable[..., Any] = target
    return function


def entry_point_problem(value: str) -> str | None:
    """Why ``value`` cannot be loaded, or None when it can."""
    try:
        load_entry_point(value)
    except EntryPointError as exc:
        return str(exc)
    return None
