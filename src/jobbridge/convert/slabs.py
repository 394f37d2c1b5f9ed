"""Cutting a volume into slabs that fit a memory budget.

The slab axis is the slowest one (z of a volume, y of an image), so a slab is a contiguous run of whole
slices: one read per file for a TIFF stack, whole chunks for HDF5 and NetCDF. A slab holds as many
slices as fit ``budget`` bytes, rounded down to the writer's preferred multiple (whole output chunks)
when that still fits, else to its required one; at least one required multiple, whatever the budget.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Default bytes of input per slab. Peak memory is a small multiple of it (the slab, its halvings,
#: the writer's encode buffers) plus the libraries themselves.
MEMORY_BUDGET = 64 << 20


def slab_length(slice_bytes: int, budget: int, *, required: int = 1, preferred: int = 1) -> int:
    """Slices per slab for slices of ``slice_bytes``; a multiple of ``required`` (>= 1)."""
    fits = max(1, budget // max(1, slice_bytes))
    if fits >= preferred:
        return fits - fits % preferred
    if fits >= required:
        return fits - fits % required
    return required


def plan_slabs(length: int, slab: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each slab of ``slab`` slices over ``length`` slices; the last may be short."""
    for start in range(0, length, slab):
        yield start, min(start + slab, length)
