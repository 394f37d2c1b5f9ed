"""Item handlers: what a batch job does to each item, looked up by name.

A handler is a plain function of one item (a JSON value) that returns a JSON-able result; raising fails
that item only. Handlers are registered by *name* because a job's parameters must be JSON (a function
cannot travel through Prefect's parameters to a worker); plugins add theirs the way they add job types,
in a module listed in ``JOBBRIDGE_PLUGINS``::

    from jobbridge.batch import item_handler

    @item_handler("word-count")
    def word_count(item):
        return len(open(item["path"]).read().split())

Built-ins: ``echo`` (returns the item), ``checksum`` (SHA-256 of a file path item), ``fail-if`` (fails the
items that ask to, for trying out partial failures).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobbridge.errors import JobValidationError
from jobbridge.tasks.checksum import sha256_file

ItemHandler = Callable[[Any], Any]
H = TypeVar("H", bound=ItemHandler)

_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")
_HANDLERS: dict[str, ItemHandler] = {}


class UnknownItemHandlerError(JobValidationError):
    """No item handler is registered under that name."""


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"item handler name {name!r}: use lower-case letters, digits, '_' or '-'")


def register_item_handler(name: str, handler: ItemHandler) -> ItemHandler:
    """Register ``handler`` as ``name`` (registering the same name again replaces it)."""
    _check_name(name)
    if not callable(handler):
        raise TypeError(f"item handler '{name}' must be callable, got {type(handler).__name__}")
    _HANDLERS[name] = handler
    return handler


def item_handler(name: str) -> Callable[[H], H]:
    """Decorator form of :func:`register_item_handler`."""
    _check_name(name)

    def decorate(handler: H) -> H:
        register_item_handler(name, handler)
        return handler

    return decorate


def _load_plugins() -> None:
    """Import the plugin modules (JOBBRIDGE_PLUGINS), where handlers beyond the built-ins live."""
    from jobbridge.registry import load_plugins
    from jobbridge.settings import get_settings

    load_plugins(get_settings().plugins)


def known_item_handlers() -> list[str]:
    """Names of every registered item handler, plugins included, sorted."""
    _load_plugins()
    return sorted(_HANDLERS)


def get_item_handler(name: str) -> ItemHandler:
    """The handler registered as ``name``; an unknown name is an error that lists the known ones."""
    handler = _HANDLERS.get(name)
    if handler is None:
        _load_plugins()  # a plugin's handler registers when its module is imported
        handler = _HANDLERS.get(name)
    if handler is None:
        raise UnknownItemHandlerError(
            f"unknown item handler '{name}'; known item handlers: {', '.join(known_item_handlers())} "
            "(register more with @jobbridge.batch.item_handler in a JOBBRIDGE_PLUGINS module)"
        )
    return handler


# --------------------------------------------------------------------------------------------------
# Built-ins


@item_handler("echo")
def echo(item: Any) -> Any:
    """Return the item unchanged (the cheapest handler: what is left is the batch machinery)."""
    return item


@item_handler("checksum")
def checksum(item: Any) -> dict[str, Any]:
    """SHA-256 and size of the file an item names: a path string, or an object with a ``path``."""
    path = item.get("path") if isinstance(item, dict) else item
    if not isinstance(path, str) or not path:
        raise ValueError("a checksum item is a file path, or an object with a 'path' field")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not an existing regular file")
    digest, size = sha256_file(path)
    return {"path": path, "sha256": digest, "bytes": size}


@item_handler("fail-if")
def fail_if(item: Any) -> Any:
    """Fail an item that is an object with a true ``fail`` field (its ``message`` says why); return
    any other item unchanged. For trying out partial failures, in tests and by hand."""
    if isinstance(item, dict) and item.get("fail"):
        raise ValueError(str(item.get("message") or "the item asked to fail"))
    return item
