"""Checking a written dataset against its input, by reading both back.

Writing can go wrong in ways no exception reports (a wrong axis order, a dropped slab, an
off-by-one at an edge, a compressor bug), so after writing, sample regions are read through the output
format's own library and compared with the same regions of the input: the first and the last slab in
full, and a few boxes at random places. Values must be identical (the converters never change a value
at full resolution; NaN equals NaN). A difference fails the job and the output is never published.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from jobbridge.convert.volume import Array, OutputVolume, VolumeInfo, VolumeReader
from jobbridge.errors import JobbridgeError
from jobbridge.tasks.files import ProgressFn, no_progress

#: Random boxes checked besides the first and last slab.
RANDOM_BOXES = 4
#: Edge of a random box in y and x; depth in z.
BOX_EDGE = 64
BOX_DEPTH = 8


class VerificationError(JobbridgeError):
    """The written dataset differs from its input."""


@dataclass(frozen=True)
class Box:
    """A region ``[start, stop)`` in the volume's spatial axes (numpy order)."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def describe(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop, strict=True)) + "]"


def sample_boxes(info: VolumeInfo, slab: int, *, count: int = RANDOM_BOXES, seed: int = 0) -> list[Box]:
    """The first and the last slab, and ``count`` boxes at random places (seeded: reproducible)."""
    shape = info.shape
    full = tuple(shape[1:])
    first = Box((0, *(0,) * len(full)), (min(slab, shape[0]), *full))
    last_start = max(0, shape[0] - slab)
    boxes = [first, Box((last_start, *(0,) * len(full)), (shape[0], *full))]
    rng = random.Random(seed)
    edges = (BOX_DEPTH, BOX_EDGE, BOX_EDGE)[-len(shape) :]
    for _ in range(count):
        sizes = [min(edge, size) for edge, size in zip(edges, shape, strict=True)]
        starts = [rng.randrange(0, size - extent + 1) for size, extent in zip(shape, sizes, strict=True)]
        boxes.append(Box(tuple(starts), tuple(s + e for s, e in zip(starts, sizes, strict=True))))
    return list(dict.fromkeys(boxes))  # a small volume's first and last slab may be the same


def _expected(reader: VolumeReader, box: Box) -> Array:
    slab = reader.read(box.start[0], box.stop[0])
    inner = tuple(slice(a, b) for a, b in zip(box.start[1:], box.stop[1:], strict=True))
    return slab[(slice(None), *inner)]


def _difference(expected: Array, actual: Array) -> str | None:
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} instead of {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"element type {actual.dtype} instead of {expected.dtype}"
    equal = np.equal(actual, expected)
    if expected.dtype.kind == "f":
        equal |= np.isnan(actual) & np.isnan(expected)
    if equal.all():
        return None
    wrong = np.argwhere(~equal)
    at = tuple(int(i) for i in wrong[0])
    return (
        f"{len(wrong)} of {expected.size} values differ; first at offset {list(at)}: "
        f"{actual[at]!r} instead of {expected[at]!r}"
    )


def verify(
    reader: VolumeReader,
    output: OutputVolume,
    boxes: list[Box],
    *,
    where: str,
    progress: ProgressFn = no_progress,
) -> int:
    """Compare every box of ``output`` with ``reader``; returns the number of values compared."""
    compared = 0
    for box in boxes:
        expected = _expected(reader, box)
        problem = _difference(expected, output.read(box.start, box.stop))
        if problem is not None:
            raise VerificationError(
                f"{where}: the written data differs from the input in region {box.describe()}: {problem}"
            )
        compared += expected.size
        progress(expected.nbytes)
    return compared


def boxes_bytes(info: VolumeInfo, boxes: list[Box]) -> int:
    """Bytes of input the boxes cover (what :func:`verify` reports as progress)."""
    per_value = info.dtype.itemsize * info.channels
    return sum(
        int(np.prod([b - a for a, b in zip(box.start, box.stop, strict=True)])) * per_value for box in boxes
    )
