"""OpenVisus IDX output: the multiresolution format ScientistCloud streams.

    <directory>/visus.idx        the header (box, field, bit mask, file template)
    <directory>/visus/0000.bin   blocks in HZ order, zip-compressed

IDX is multiresolution by construction (samples are stored in hierarchical Z order, so every coarser
level is a prefix of the finer ones); no pyramid is computed. Slabs are written uncompressed through a
block-query access without write locks (one writer owns the staging directory), then every block is
zip-compressed by :mod:`~jobbridge.convert.idx_compress`, streaming and on all cores.
Data files are capped near ``FILE_BYTES`` of raw data so none grows past what a server likes to serve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jobbridge.convert.idx_compress import compress_files
from jobbridge.convert.volume import Array, ConversionInputError, VolumeInfo

IDX_NAME = "visus.idx"
COMPRESSION = "zip"
#: Samples per block (2**16): OpenVisus's default, a good tile for streaming.
BITS_PER_BLOCK = 16
#: Raw bytes per data file, about.
FILE_BYTES = 64 << 20
#: Element types OpenVisus stores and reads back faithfully.
IDX_TYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"}


def idx_field_type(info: VolumeInfo) -> str:
    """OpenVisus's dtype string: ``uint16``, or ``uint8[3]`` for RGB."""
    name = info.dtype.name
    if name not in IDX_TYPES:
        raise ConversionInputError(
            f"{info.description}: element type {name} cannot be stored in IDX "
            f"(IDX takes {', '.join(sorted(IDX_TYPES))}); use output_format=zarr"
        )
    return f"{name}[{info.channels}]" if info.channels > 1 else name


def blocks_per_file(info: VolumeInfo) -> int:
    """Power of two (IDX addresses files by block-number bits) giving files of about ``FILE_BYTES``."""
    block_bytes = (2**BITS_PER_BLOCK) * info.dtype.itemsize * info.channels
    return 1 << max(0, int(math.log2(max(1, FILE_BYTES // block_bytes))))


def _openvisus() -> Any:
    import OpenVisus

    return OpenVisus


class IdxWriter:
    """Creates ``visus.idx`` in ``directory`` and writes slabs into it as box queries."""

    #: Any slab start works: IDX blocks are rewritten in place while uncompressed.
    required_alignment = 1

    def __init__(self, directory: Path, info: VolumeInfo) -> None:
        ov = _openvisus()
        self.directory, self.info = directory, info
        self.url = str(directory / IDX_NAME)
        field = ov.Field("data", idx_field_type(info), "row_major")
        self._db = ov.CreateIdx(
            url=self.url,
            dims=list(reversed(info.shape)),  # OpenVisus counts x first
            fields=[field],
            bitsperblock=BITS_PER_BLOCK,
            blocksperfile=blocks_per_file(info),
        )
        self._access = self._db.createAccessForBlockQuery()
        self._access.disableWriteLocks()
        self._access.disableCompression()
        # Blocks span 2**k slices; slabs that are whole multiples rewrite fewer of them.
        self.preferred_alignment = 16 if info.ndim == 3 else 64

    def write(self, start: int, slab: Array) -> None:
        """Write ``slab`` at ``start`` of the slab axis (z for a volume, y for an image)."""
        offset = {"z": start} if self.info.ndim == 3 else {"y": start}
        self._db.write(slab, access=self._access, **offset)

    def finish(self) -> dict[str, Any]:
        """Release the writing access, zip every block, and mark the field zip in ``visus.idx``."""
        self._access = None  # releases the data files before they are rewritten
        idx = self._db.db.idxfile
        files = [Path(name) for name in self._db.db.getFilenames(-1, "")]
        raw, packed = compress_files(files, int(idx.blocksperfile) * int(idx.fields.size()))
        fields = list(idx.fields)
        idx.fields.clear()
        for field in fields:
            field.default_compression = COMPRESSION
            idx.fields.push_back(field)
        idx.save(self.url)
        return {
            "idx": self.url,
            "max_resolution": int(self._db.getMaxResolution()),
            "bits_per_block": BITS_PER_BLOCK,
            "blocks_per_file": blocks_per_file(self.info),
            "compression": COMPRESSION,
            "compression_ratio": round(packed / raw, 3) if raw else None,
        }


class IdxOutput:
    """A written IDX dataset read back through OpenVisus at full resolution."""

    def __init__(self, directory: Path) -> None:
        ov = _openvisus()
        self._db = ov.LoadDataset(str(directory / IDX_NAME))
        self.ndim = int(self._db.getPointDim())

    def read(self, start: tuple[int, ...], stop: tuple[int, ...]) -> Array:
        """Box ``[start, stop)`` (numpy axis order), channels last."""
        names = ["z", "y", "x"][-len(start) :]
        box = {name: [a, b] for name, a, b in zip(names, start, stop, strict=True)}
        data: Array = self._db.read(**box)
        return data

    def shape(self) -> tuple[int, ...]:
        """The logic box's size, numpy axis order."""
        return tuple(int(n) for n in reversed(self._db.getLogicSize()))
