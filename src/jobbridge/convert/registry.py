"""Sensor type -> reader. Adding a sensor type is writing one function and decorating it.

ScientistCloud tags every dataset with a sensor type; conversion picks its reader by that tag::

    from jobbridge.convert.registry import SourceSpec, converter
    from jobbridge.convert.volume import VolumeReader

    @converter("MAPIR", description="MAPIR multispectral TIFFs")
    def open_mapir(source: SourceSpec) -> VolumeReader:
        ...  # return a reader whose read(start, stop) yields slabs

The built-in readers (TIFF stacks, NetCDF, HDF5) register when this module first needs them; a plugin
module (``JOBBRIDGE_PLUGINS``) registers more by being imported. Sensor names compare case-insensitively,
with spaces, dashes and underscores alike (``tiff rgb`` is ``TIFF RGB``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from jobbridge.convert.volume import VolumeReader
from jobbridge.errors import JobValidationError

#: Every sensor type ScientistCloud knows, in its spelling.
SENSOR_TYPES = ("IDX", "TIFF", "TIFF RGB", "NETCDF", "HDF5", "4D_NEXUS", "RGB", "MAPIR", "OTHER")

#: Why a known sensor type has no converter, when there is more to say than "not supported".
SENSOR_HINTS = {
    "IDX": "the dataset is already IDX and is streamed as it is",
    "OTHER": "the data's layout is unknown; upload it with a specific sensor type",
}

#: Modules holding the built-in converters, imported on first use (they pull in numpy).
BUILTIN_MODULES = ("jobbridge.convert.tiff", "jobbridge.convert.netcdf", "jobbridge.convert.hdf5")


@dataclass(frozen=True)
class SourceSpec:
    """What a reader is given: the local dataset (a file or a directory), the chosen variable, and paths
    under the dataset that are not part of it (the conversion's own output)."""

    path: Path
    variable: str | None = None
    exclude: Collection[Path] = field(default=())


ReaderFactory = Callable[[SourceSpec], VolumeReader]


@dataclass(frozen=True)
class Converter:
    """A registered sensor type: its name, what it reads, and how to open a reader."""

    sensor: str
    open: ReaderFactory
    description: str = ""
    takes_variable: bool = False


_CONVERTERS: dict[str, Converter] = {}
_builtins_loaded = False


def sensor_key(name: str) -> str:
    """The comparison form of a sensor name: upper case, spaces/dashes/underscores folded to ``_``."""
    return re.sub(r"[\s_\-]+", "_", name.strip()).upper()


def converter(
    sensor: str, *, description: str = "", takes_variable: bool = False
) -> Callable[[ReaderFactory], ReaderFactory]:
    """Register the decorated function as the reader factory of ``sensor`` (replacing any earlier one).

    ``takes_variable``: the sensor's files hold several arrays and the ``variable`` parameter picks one.
    """

    def register(factory: ReaderFactory) -> ReaderFactory:
        _CONVERTERS[sensor_key(sensor)] = Converter(sensor, factory, description, takes_variable)
        return factory

    return register


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def supported_sensors() -> list[str]:
    """Names of the sensor types that have a converter, sorted."""
    _ensure_builtins()
    return sorted(spec.sensor for spec in _CONVERTERS.values())


def get_converter(sensor: str) -> Converter:
    """The converter of ``sensor``; an unknown or unsupported one is an error listing the supported."""
    _ensure_builtins()
    key = sensor_key(sensor)
    found = _CONVERTERS.get(key)
    if found is not None:
        return found
    supported = ", ".join(supported_sensors())
    known = {sensor_key(name): name for name in SENSOR_TYPES}
    if key in known:
        hint = SENSOR_HINTS.get(known[key], "no converter exists for it yet")
        raise JobValidationError(
            f"sensor type '{known[key]}' cannot be converted ({hint}); supported: {supported}"
        )
    raise JobValidationError(
        f"unknown sensor type '{sensor}'; supported: {supported} "
        f"(ScientistCloud's types: {', '.join(SENSOR_TYPES)})"
    )
