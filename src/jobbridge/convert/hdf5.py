"""HDF5 datasets: one dataset (array) of an HDF5 file, read through h5py.

Chunked and compressed HDF5 datasets are read slab by slab: h5py decompresses only the chunks a slab
touches. The chosen dataset's attributes that are plain values go into the output's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jobbridge.convert.registry import SourceSpec, converter
from jobbridge.convert.sources import single_file
from jobbridge.convert.variables import Candidate, choose_array
from jobbridge.convert.volume import Array, VolumeInfo, VolumeReader, native, native_dtype, reading

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nc")

#: Attributes larger than this many elements are not copied into the output's metadata.
MAX_ATTRIBUTE_ELEMENTS = 64


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a JSON value, or ``None`` when it is not a small plain one."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= MAX_ATTRIBUTE_ELEMENTS and value.dtype.kind in "iufb" else None
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool) else None


def _candidates(file: Any) -> list[Candidate]:
    """Every dataset in the file, in the file's order, named by its path."""
    import h5py

    found: list[Candidate] = []

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset) and node.shape is not None:
            found.append(Candidate(f"/{name}", tuple(node.shape), np.dtype(node.dtype)))

    file.visititems(visit)
    return found


class HDF5Dataset(VolumeReader):
    """One dataset of an open HDF5 file, read in slabs of its first long axis."""

    def __init__(self, path: Path, variable: str | None) -> None:
        import h5py

        self.path = path
        with reading(f"{path}: not a readable HDF5 file"):
            self._file = h5py.File(path, mode="r")
        try:
            self._open_dataset(variable)
        except BaseException:
            self._file.close()
            raise

    def _open_dataset(self, variable: str | None) -> None:
        with reading(str(self.path)):
            candidates = _candidates(self._file)
        self.array = choose_array(candidates, variable, str(self.path))
        self._dataset = self._file[self.array.name]
        attributes = {}
        for name, value in self._dataset.attrs.items():
            plain = _plain(value)
            if plain is not None:
                attributes[name] = plain
        self.info = VolumeInfo(
            shape=self.array.volume_shape,
            dtype=native_dtype(self.array.dtype, f"{self.path}:{self.array.name}"),
            description=f"HDF5 dataset '{self.array.name}' of {self.path}",
            attributes={"variable": self.array.name, **attributes},
        )

    def read(self, start: int, stop: int) -> Array:
        """Slices ``[start, stop)`` of the dataset's first long axis."""
        with reading(f"{self.path}, dataset '{self.array.name}', slices {start}..{stop - 1}"):
            data = self._dataset[self.array.slab_index(start, stop)]
        return native(data, self.info.dtype)

    def close(self) -> None:
        """Close the file."""
        if self._file.id.valid:
            self._file.close()


@converter(
    "HDF5", description="a dataset of an HDF5 file (default: the largest 2-D/3-D one)", takes_variable=True
)
def open_hdf5(source: SourceSpec) -> VolumeReader:
    """The chosen dataset of the dataset's HDF5 file."""
    path = single_file(source, HDF5_SUFFIXES, "HDF5")
    return HDF5Dataset(path, source.variable)
