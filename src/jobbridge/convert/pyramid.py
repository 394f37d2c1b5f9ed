"""The resolution pyramid of a Zarr output: level 0 is the data, each next level halves y and x.

Levels are computed from each slab as it passes (a 2x2 mean over y/x), so the pyramid costs no second
read of the data. A volume's slab axis is z, which is not halved, so any slab works; an image's slab axis
is y, so its slabs start at multiples of ``2 ** (levels - 1)`` and every level's slab lands on whole rows.
Odd edges average the pixels that exist (the last row of an odd height is averaged with itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobbridge.convert.volume import Array

#: A level is added while the larger of y/x exceeds this (a viewer's tile edge).
TILE = 256
#: Never more levels than this (2**9 = 512x smaller).
MAX_LEVELS = 10


def level_count(height: int, width: int) -> int:
    """Levels for a y/x plane: halve until it fits one tile (or a side would drop below 1 pixel)."""
    levels = 1
    while levels < MAX_LEVELS and max(height, width) > TILE and min(height, width) >= 2:
        height, width = -(-height // 2), -(-width // 2)
        levels += 1
    return levels


def level_shape(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """Spatial shape of ``level``: y and x (the last two) halved ``level`` times, rounding up."""
    factor = 2**level
    return (*shape[:-2], -(-shape[-2] // factor), -(-shape[-1] // factor))


def _accumulator(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """A type that holds the sum of 4 values exactly (64-bit integers are subsampled instead)."""
    if dtype.kind == "f":
        return np.dtype(np.float64) if dtype.itemsize >= 8 else np.dtype(np.float32)
    return np.dtype(np.int64) if dtype.itemsize == 4 else np.dtype(np.int32)


def halve(slab: Array, *, channels: bool) -> Array:
    """The 2x2 mean over y/x of ``slab`` (axes ``(..., y, x)``, or ``(..., y, x, c)`` with channels).

    Integers are rounded half up and keep their type; 64-bit integers take the top-left sample of each
    2x2 block, as a sum of four could overflow. Memory: about half the slab for the accumulator.
    """
    y_axis = slab.ndim - (3 if channels else 2)
    height, width = slab.shape[y_axis], slab.shape[y_axis + 1]
    lead = (slice(None),) * y_axis
    if slab.dtype.kind in "iu" and slab.dtype.itemsize == 8:
        return np.ascontiguousarray(slab[(*lead, slice(0, None, 2), slice(0, None, 2))])
    out_shape = list(slab.shape)
    out_shape[y_axis], out_shape[y_axis + 1] = -(-height // 2), -(-width // 2)
    total = np.zeros(out_shape, dtype=_accumulator(slab.dtype))
    for dy in (0, 1):
        for dx in (0, 1):
            part = slab[(*lead, slice(dy, None, 2), slice(dx, None, 2))]
            total[(*lead, slice(0, part.shape[y_axis]), slice(0, part.shape[y_axis + 1]))] += part
    rows = np.full(out_shape[y_axis], 2, dtype=total.dtype)
    cols = np.full(out_shape[y_axis + 1], 2, dtype=total.dtype)
    if height % 2:
        rows[-1] = 1
    if width % 2:
        cols[-1] = 1
    weight = np.multiply.outer(rows, cols)
    if channels:
        weight = weight[..., np.newaxis]
    if slab.dtype.kind == "f":
        total /= weight
    else:
        total += weight // 2
        total //= weight
    return total.astype(slab.dtype, copy=False)
