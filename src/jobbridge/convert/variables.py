"""Choosing the array to convert from a file that holds many (NetCDF variables, HDF5 datasets).

By default the largest numeric array that is 2-D or 3-D once its length-1 axes are dropped (a NetCDF
``(time=1, lat, lon)`` field is an image): coordinate arrays, masks and scalars are smaller, and the
array a scientist uploads a file for is nearly always the big one. ``variable`` overrides the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobbridge.convert.volume import ConversionInputError

#: How many names an error message lists before saying "and N more".
LISTED = 10


@dataclass(frozen=True)
class Candidate:
    """One array in a file: its name (path for HDF5), shape and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def kept_axes(self) -> tuple[int, ...]:
        """Axes longer than 1: those that become the volume's axes."""
        return tuple(axis for axis, size in enumerate(self.shape) if size > 1)

    @property
    def convertible(self) -> bool:
        """Numeric, and 2-D or 3-D after dropping length-1 axes."""
        return self.dtype.kind in "iuf" and self.dtype.itemsize <= 8 and len(self.kept_axes) in (2, 3)

    @property
    def volume_shape(self) -> tuple[int, ...]:
        """The shape without length-1 axes."""
        return tuple(self.shape[axis] for axis in self.kept_axes)

    def slab_index(self, start: int, stop: int) -> tuple[int | slice, ...]:
        """Index of slices ``[start, stop)`` of the first kept axis, dropping the length-1 axes."""
        first = self.kept_axes[0]
        index: list[int | slice] = []
        for axis, size in enumerate(self.shape):
            if size == 1:
                index.append(0)
            elif axis == first:
                index.append(slice(start, stop))
            else:
                index.append(slice(None))
        return tuple(index)


def _describe(candidate: Candidate) -> str:
    return f"{candidate.name} {list(candidate.shape)} {candidate.dtype}"


def _listing(candidates: Sequence[Candidate]) -> str:
    if not candidates:
        return "none"
    shown = ", ".join(_describe(c) for c in candidates[:LISTED])
    return shown + (f" and {len(candidates) - LISTED} more" if len(candidates) > LISTED else "")


def choose_array(candidates: Sequence[Candidate], requested: str | None, where: str) -> Candidate:
    """The ``requested`` array, or the largest convertible one; errors list what the file holds."""
    convertible = [c for c in candidates if c.convertible]
    if requested is not None:
        wanted = requested.strip("/")
        match = next((c for c in candidates if c.name.strip("/") == wanted), None)
        if match is None:
            raise ConversionInputError(
                f"{where}: no variable '{requested}'; convertible ones: {_listing(convertible)}"
            )
        if not match.convertible:
            raise ConversionInputError(
                f"{where}: variable {_describe(match)} is not a numeric 2-D or 3-D array; "
                f"convertible ones: {_listing(convertible)}"
            )
        return match
    if not convertible:
        raise ConversionInputError(
            f"{where}: no numeric 2-D or 3-D array to convert; the file holds: {_listing(candidates)}"
        )
    return max(convertible, key=lambda c: (math.prod(c.shape), c.dtype.itemsize))
