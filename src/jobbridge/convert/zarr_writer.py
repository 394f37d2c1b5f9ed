"""Zarr output: a chunked, compressed multiscale pyramid (OME-NGFF 0.4 layout, Zarr format 2).

    <store>/.zgroup .zattrs .zmetadata   multiscales metadata, consolidated for one-request opening
    <store>/0/   full resolution          <store>/1/  y and x halved          ...

Format 2 with ``/``-separated chunk keys is what NGFF 0.4 prescribes and what every Zarr reader (zarr
2 and 3, xarray via ``_ARRAY_DIMENSIONS``, napari, neuroglancer) opens. Channels come first in each array
(``c, z, y, x``), as NGFF orders axes; :class:`ZarrOutput` hands them back channels last like the input.
Chunks are 256x256 in y/x and as deep in z as makes about 4 MiB (at most a slab), compressed with
Blosc zstd (level 1, byte shuffle).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from jobbridge.convert.pyramid import TILE, halve, level_count, level_shape
from jobbridge.convert.volume import Array, VolumeInfo

ZARR_FORMAT: Literal[2] = 2
#: Target size of an uncompressed chunk: large enough for few files, small enough for quick tiles.
CHUNK_BYTES = 4 << 20
MAX_CHUNK_DEPTH = 64
#: Blosc zstd level: 1 compresses about 2.5x faster than 3 here, and noisy data only ~3 % larger.
ZSTD_LEVEL = 1


def chunk_depth(info: VolumeInfo, budget: int) -> int:
    """Depth (z) of a chunk: the power of two that makes a 256x256 chunk about ``CHUNK_BYTES``, and no
    deeper than a slab within ``budget`` (a chunk split across slabs would be rewritten by each)."""
    if info.ndim == 2:
        return 1
    plane = min(info.shape[-2], TILE) * min(info.shape[-1], TILE) * info.dtype.itemsize * info.channels
    depth = 1 << max(0, int(math.log2(max(1, CHUNK_BYTES // plane))))
    slab = 1 << max(0, int(math.log2(max(1, budget // info.slice_bytes))))
    return max(1, min(depth, slab, MAX_CHUNK_DEPTH, info.length))


def _axes(info: VolumeInfo) -> list[dict[str, str]]:
    names = ["c"] if info.channels > 1 else []
    names += ["z", "y", "x"][-info.ndim :]
    return [{"name": n, "type": "channel" if n == "c" else "space"} for n in names]


def multiscales(info: VolumeInfo, levels: int, name: str) -> list[dict[str, Any]]:
    """NGFF 0.4 ``multiscales``: one dataset per level, scaled 2**level in y and x."""
    lead = [1.0] * (info.ndim - 2 + (1 if info.channels > 1 else 0))
    return [
        {
            "version": "0.4",
            "name": name,
            "axes": _axes(info),
            "datasets": [
                {
                    "path": str(level),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [*lead, float(2**level), float(2**level)]}
                    ],
                }
                for level in range(levels)
            ],
            "type": "mean",
            "metadata": {"description": "2x2 mean over y and x per level (64-bit integers: subsampled)"},
        }
    ]


class ZarrWriter:
    """Writes slabs into level 0 and, halved on the way, into every other level of the pyramid."""

    def __init__(
        self, store: Path, info: VolumeInfo, *, name: str, metadata: dict[str, Any], budget: int
    ) -> None:
        import numcodecs
        import zarr

        self.store, self.info, self.name, self.metadata = store, info, name, metadata
        self.levels = level_count(info.shape[-2], info.shape[-1])
        self.depth = chunk_depth(info, budget)
        self.required_alignment = 2 ** (self.levels - 1) if info.ndim == 2 else 1
        self.preferred_alignment = max(TILE, self.required_alignment) if info.ndim == 2 else self.depth
        self._group = cast(Any, zarr.open_group(store, mode="w", zarr_format=ZARR_FORMAT))
        compressor = numcodecs.Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=numcodecs.Blosc.SHUFFLE)
        channel = (info.channels,) if info.channels > 1 else ()
        dimensions = [axis["name"] for axis in _axes(info)]
        self._arrays: list[Any] = []
        for level in range(self.levels):
            shape = level_shape(info.shape, level)
            plane = (min(shape[-2], TILE), min(shape[-1], TILE))
            chunks = (*channel, *((self.depth,) if info.ndim == 3 else ()), *plane)
            self._arrays.append(
                self._group.create_array(
                    str(level),
                    shape=(*channel, *shape),
                    chunks=chunks,
                    dtype=info.dtype,
                    compressors=compressor,
                    fill_value=0,
                    chunk_key_encoding={"name": "v2", "separator": "/"},
                    attributes={"_ARRAY_DIMENSIONS": dimensions},
                )
            )

    def write(self, start: int, slab: Array) -> None:
        """Store ``slab`` at ``start`` in level 0 and its halvings in the levels above."""
        rgb = self.info.channels > 1
        current = slab
        for level, array in enumerate(self._arrays):
            if level:
                current = halve(current, channels=rgb)
            offset = start // 2**level if self.info.ndim == 2 else start
            region = slice(offset, offset + current.shape[0])
            if rgb:
                array[:, region] = np.moveaxis(current, -1, 0)
            else:
                array[region] = current

    def finish(self) -> dict[str, Any]:
        """Write the multiscales metadata and consolidate it; returns the pyramid's description."""
        import zarr

        self._group.attrs.update(
            {"multiscales": multiscales(self.info, self.levels, self.name), "jobbridge": self.metadata}
        )
        zarr.consolidate_metadata(self.store)
        return {
            "levels": self.levels,
            "level_shapes": [list(level_shape(self.info.shape, k)) for k in range(self.levels)],
            "chunks": list(self._arrays[0].chunks),
            "zarr_format": ZARR_FORMAT,
        }


class ZarrOutput:
    """A written pyramid's level 0, read back through zarr."""

    def __init__(self, store: Path) -> None:
        import zarr

        self.group = cast(Any, zarr.open_group(store, mode="r"))
        self.array = cast(Any, self.group["0"])
        self.channels = self.array.shape[0] if "c" in self.array.attrs["_ARRAY_DIMENSIONS"] else 1

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> Array:
        """Box ``[start, stop)`` of level 0, channels last."""
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        if self.channels > 1:
            return np.moveaxis(np.asarray(self.array[(slice(None), *box)]), 0, -1)
        return np.asarray(self.array[box])

    def level_shapes(self) -> list[tuple[int, ...]]:
        """Shape of every level listed in the multiscales metadata, in order."""
        datasets = self.group.attrs["multiscales"][0]["datasets"]
        return [tuple(self.group[d["path"]].shape) for d in datasets]
