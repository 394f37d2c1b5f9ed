"""Batch jobs: one named job over many items (Curatore's document batches).

:mod:`jobbridge.batch.handlers` holds the registry of item handlers (``@item_handler("name")``) and the
built-in ones; :mod:`jobbridge.batch.grouping` decides how items are grouped into Prefect tasks and keeps
the per-item report. The ``batch`` flow itself is :mod:`jobbridge.flows.batch`.
"""

from jobbridge.batch.handlers import get_item_handler, item_handler, known_item_handlers

__all__ = ["get_item_handler", "item_handler", "known_item_handlers"]
