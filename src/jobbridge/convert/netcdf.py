"""NETCDF datasets: one variable of a NetCDF file (classic or NetCDF-4), read through netCDF4.

Values are converted as stored: packing (``scale_factor``, ``add_offset``) and fill values are not
applied, so integers stay exact and nothing is rounded; those attributes go into the output's metadata
so a reader can apply them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jobbridge.convert.registry import SourceSpec, converter
from jobbridge.convert.sources import single_file
from jobbridge.convert.variables import Candidate, choose_array
from jobbridge.convert.volume import Array, VolumeInfo, VolumeReader, native, native_dtype, reading

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")

#: Variable attributes worth carrying into the output (how to interpret the stored numbers).
KEPT_ATTRIBUTES = ("units", "long_name", "standard_name", "scale_factor", "add_offset", "_FillValue")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class NetCDFVariable(VolumeReader):
    """One variable of an open NetCDF file, read in slabs of its first long axis."""

    def __init__(self, path: Path, variable: str | None) -> None:
        import netCDF4

        self.path = path
        with reading(f"{path}: not a readable NetCDF file"):
            self._dataset = netCDF4.Dataset(path, mode="r")
        try:
            self._open_variable(variable)
        except BaseException:
            self._dataset.close()
            raise

    def _open_variable(self, variable: str | None) -> None:
        with reading(str(self.path)):
            variables = self._dataset.variables
            candidates = [
                Candidate(name, tuple(v.shape), np.dtype(v.dtype))
                for name, v in variables.items()
                if isinstance(v.dtype, np.dtype)
            ]
        self.array = choose_array(candidates, variable, str(self.path))
        self._variable = variables[self.array.name]
        self._variable.set_auto_maskandscale(False)
        attributes = {
            name: _jsonable(self._variable.getncattr(name))
            for name in KEPT_ATTRIBUTES
            if name in self._variable.ncattrs()
        }
        attributes["dimensions"] = list(self._variable.dimensions)
        self.info = VolumeInfo(
            shape=self.array.volume_shape,
            dtype=native_dtype(self.array.dtype, f"{self.path}:{self.array.name}"),
            description=f"NetCDF variable '{self.array.name}' of {self.path}",
            attributes={"variable": self.array.name, **attributes},
        )

    def read(self, start: int, stop: int) -> Array:
        """Slices ``[start, stop)`` of the variable's first long axis, as stored."""
        with reading(f"{self.path}, variable '{self.array.name}', slices {start}..{stop - 1}"):
            data = np.asarray(self._variable[self.array.slab_index(start, stop)])
        return native(data, self.info.dtype)

    def close(self) -> None:
        """Close the file."""
        if self._dataset.isopen():
            self._dataset.close()


@converter(
    "NETCDF",
    description="a variable of a NetCDF file (default: the largest 2-D/3-D one)",
    takes_variable=True,
)
def open_netcdf(source: SourceSpec) -> VolumeReader:
    """The chosen variable of the dataset's NetCDF file."""
    path = single_file(source, NETCDF_SUFFIXES, "NetCDF")
    return NetCDFVariable(path, source.variable)
