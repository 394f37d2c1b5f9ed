"""The one shape every converter speaks: a volume read and written slab by slab along its slowest axis.

A reader (one per sensor type) describes its data as a :class:`VolumeInfo` and hands out slabs
``[start, stop)`` of the first axis; a writer (one per output format) takes those slabs in order. Neither
ever holds the whole array, so memory depends on the slab size, not on the dataset's size.

Axes are numpy's order, slowest first: ``(z, y, x)`` for a stack, ``(y, x)`` for a single image, with a
trailing channel axis of 3 for RGB (``(z, y, x, 3)``). Slabs are native-endian and C-contiguous.
"""

from __future__ import annotations

import contextlib
import errno
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from jobbridge.errors import JobValidationError

#: A slab, or any region, of a volume.
Array = NDArray[Any]


class ConversionInputError(JobValidationError):
    """The dataset cannot be converted: it is corrupt, truncated or laid out in a way no reader handles."""


@dataclass(frozen=True)
class VolumeInfo:
    """What a reader found: the array's shape (without channels), element type and channel count."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    channels: int = 1
    description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3) or min(self.shape) < 1:
            raise ConversionInputError(
                f"{self.description or 'the dataset'}: shape {self.shape} is not a 2-D image or a 3-D "
                "volume; converters take 2-D and 3-D arrays"
            )

    @property
    def ndim(self) -> int:
        """Spatial dimensions: 2 for an image, 3 for a volume."""
        return len(self.shape)

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The full numpy shape, with the channel axis when there is more than one channel."""
        return self.shape + ((self.channels,) if self.channels > 1 else ())

    @property
    def length(self) -> int:
        """Number of slices along the slab axis (the first one)."""
        return self.shape[0]

    @property
    def slice_bytes(self) -> int:
        """Bytes of one slice across the slab axis: the unit that slabs are made of."""
        return math.prod(self.array_shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array, uncompressed."""
        return self.slice_bytes * self.length

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the job's result."""
        return {
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "channels": self.channels,
            "bytes": self.nbytes,
            "description": self.description,
        }


class VolumeReader(ABC):
    """A sensor's data, readable slab by slab. Subclasses open lazily and close what they opened."""

    info: VolumeInfo

    @abstractmethod
    def read(self, start: int, stop: int) -> Array:
        """Slices ``[start, stop)`` of the first axis as a native-endian, C-contiguous array."""

    def close(self) -> None:  # noqa: B027 - optional hook: readers without open handles need nothing
        """Release open files."""

    def __enter__(self) -> VolumeReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class VolumeWriter(Protocol):
    """An output format being written: slabs arrive in order, then ``finish`` completes the dataset."""

    #: Slab starts must be multiples of this (the pyramid of a 2-D image halves the slab axis too).
    required_alignment: int
    #: Slab lengths that are multiples of this avoid rewriting chunks (a performance preference).
    preferred_alignment: int

    def write(self, start: int, slab: Array) -> None:
        """Store ``slab`` at ``start`` along the first axis."""

    def finish(self) -> dict[str, Any]:
        """Complete the dataset (pyramid, compression, metadata); returns facts for the job's result."""


class OutputVolume(Protocol):
    """A written dataset read back through its own library, to check it against the input."""

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> Array:
        """The full-resolution box ``[start, stop)`` (spatial axes), channels last like the input."""


def native(array: Array, dtype: np.dtype[Any]) -> Array:
    """``array`` as C-contiguous and native-endian ``dtype`` (big-endian HDF5 data is common)."""
    return np.ascontiguousarray(array, dtype=dtype)


def native_dtype(dtype: np.dtype[Any], what: str) -> np.dtype[Any]:
    """The native-endian form of a numeric dtype; anything else cannot become an image or a volume."""
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise ConversionInputError(
            f"{what}: element type {dtype} is not numeric; converters take integers and floats"
        )
    return dtype.newbyteorder("=")


def is_input_problem(error: BaseException) -> bool:
    """True when ``error`` says the data is bad, false when the system failed (a retry may help).

    Decoders raise ValueError, KeyError, IndexError or their own types on corrupt data; HDF5 and NetCDF
    raise OSError without an errno (HDF5) or with a negative library code (NetCDF). A real OS error
    (EIO, ENOSPC, a dropped network mount) has a positive errno and is worth retrying.
    """
    if isinstance(error, ConversionInputError):
        return False  # already worded
    if isinstance(error, OSError):
        return error.errno is None or error.errno < 0 or error.errno == errno.EINVAL
    return isinstance(error, ValueError | KeyError | IndexError | TypeError | RuntimeError | EOFError)


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn a decoder's complaint while reading ``what`` into a :class:`ConversionInputError` naming it."""
    try:
        yield
    except Exception as error:
        if not is_input_problem(error):
            raise
        detail = str(error).strip() or type(error).__name__
        raise ConversionInputError(f"{what}: {detail}") from error
