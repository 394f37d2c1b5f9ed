"""TIFF, TIFF RGB and RGB datasets: a directory of 2-D TIFF slices, one multi-page TIFF, or both mixed.

Every page of every file (natural file order, then page order) is one slice of the volume; a dataset of
a single page is a 2-D image. All pages must share size, element type and samples per pixel: the first
page sets them and any other is an error naming its file. Pages are read one at a time, so a file of
any size streams; a 2-D image is read by rows (strips or tiles) through tifffile's zarr view of it.

``TIFF`` takes single-channel pages (any numeric type); ``TIFF RGB`` and ``RGB`` take 3 samples per
pixel, interleaved or planar (stored channels last either way).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobbridge.convert.registry import SourceSpec, converter
from jobbridge.convert.sources import dataset_files
from jobbridge.convert.volume import (
    Array,
    ConversionInputError,
    VolumeInfo,
    VolumeReader,
    native,
    native_dtype,
    reading,
)

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class PageLayout:
    """What every page must look like: its shape in the file, samples per pixel and element type."""

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype[Any]

    @property
    def channels(self) -> int:
        """Samples per pixel (1 for grayscale)."""
        return self.shape[self.axes.index("S")] if "S" in self.axes else 1

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width)."""
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def describe(self) -> str:
        height, width = self.image_shape
        samples = f" x {self.channels} samples" if self.channels > 1 else ""
        return f"{width}x{height}{samples} {self.dtype}"


@dataclass(frozen=True)
class TiffPart:
    """One file of the stack: where its pages start in the volume and how many it holds."""

    path: Path
    first: int
    pages: int


def _layout_of(path: Path, tif: Any) -> tuple[PageLayout, int]:
    """The page layout of ``tif``'s first series and its page count, checked against the file's IFDs."""
    if not tif.series:
        raise ConversionInputError(f"{path}: TIFF file holds no image")
    series = tif.series[0]
    page = series.keyframe
    axes = "".join(axis for axis in page.axes if axis in "YXS")
    if axes not in ("YX", "YXS", "SYX") or len(page.shape) != len(axes):
        raise ConversionInputError(
            f"{path}: TIFF pages laid out as {page.axes} {list(page.shape)} are not supported; "
            "pages must be 2-D images (grayscale or RGB)"
        )
    layout = PageLayout(tuple(page.shape), axes, native_dtype(np.dtype(page.dtype), str(path)))
    declared = math.prod(series.shape) // math.prod(page.shape)
    present = len(series.pages)
    if present < declared:
        raise ConversionInputError(
            f"{path}: truncated or damaged TIFF: its image declares {declared} pages but only {present} "
            "can be read"
        )
    return layout, declared


def _check_channels(path: Path, layout: PageLayout, channels: int, sensor: str) -> None:
    if layout.channels == channels:
        return
    if channels == 1:
        raise ConversionInputError(
            f"{path}: pages have {layout.channels} samples per pixel; sensor '{sensor}' takes "
            "single-channel images (use sensor 'TIFF RGB' for RGB)"
        )
    raise ConversionInputError(
        f"{path}: pages have {layout.channels} sample(s) per pixel; sensor '{sensor}' takes RGB images "
        "with 3 (use sensor 'TIFF' for single-channel images)"
    )


class TiffStack(VolumeReader):
    """The pages of one or more TIFF files as one volume (or a 2-D image when there is one page)."""

    def __init__(self, files: list[Path], *, channels: int, sensor: str) -> None:
        import tifffile

        self._tifffile = tifffile
        self.parts: list[TiffPart] = []
        self.layout: PageLayout | None = None
        first_file: Path | None = None
        for path in files:
            with reading(f"{path}: not a readable TIFF file"), tifffile.TiffFile(path) as tif:
                layout, pages = _layout_of(path, tif)
            if self.layout is None:
                _check_channels(path, layout, channels, sensor)
                self.layout, first_file = layout, path
            elif layout != self.layout:
                raise ConversionInputError(
                    f"{path}: pages are {layout.describe()} but {first_file} has {self.layout.describe()}; "
                    "every slice of a stack must have the same size and type"
                )
            self.parts.append(TiffPart(path, sum(p.pages for p in self.parts), pages))
        assert self.layout is not None  # files is never empty
        depth = sum(part.pages for part in self.parts)
        plane = self.layout.image_shape
        where = files[0] if len(files) == 1 else files[0].parent
        kind = "TIFF image" if depth == 1 else f"TIFF stack of {depth} slices in {len(files)} file(s)"
        self.info = VolumeInfo(
            shape=plane if depth == 1 else (depth, *plane),
            dtype=self.layout.dtype,
            channels=self.layout.channels,
            description=f"{kind} at {where}",
        )
        self._starts = [part.first for part in self.parts]
        self._open: tuple[TiffPart, Any] | None = None
        self._rows: tuple[Any, Any] | None = None

    # -- files ------------------------------------------------------------------------------------

    def _tif(self, part: TiffPart) -> Any:
        """The open TiffFile of ``part``; one file is open at a time (a stack may have 100k files)."""
        if self._open is not None and self._open[0] is part:
            return self._open[1]
        self.close()
        with reading(f"{part.path}: not a readable TIFF file"):
            tif = self._tifffile.TiffFile(part.path)
        self._open = (part, tif)
        return tif

    def _to_channels_last(self, page: Array) -> Array:
        assert self.layout is not None
        return np.moveaxis(page, 0, -1) if self.layout.axes == "SYX" else page

    # -- reading ----------------------------------------------------------------------------------

    def read(self, start: int, stop: int) -> Array:
        """Slices ``[start, stop)``: pages of the stack, or rows of a single image."""
        if self.info.ndim == 2:
            return self._rows_of_image(start, stop)
        out = np.empty((stop - start, *self.info.array_shape[1:]), dtype=self.info.dtype)
        for index in range(start, stop):
            out[index - start] = self._page(index)
        return out

    def _page(self, index: int) -> Array:
        part = self.parts[bisect.bisect_right(self._starts, index) - 1]
        number = index - part.first
        where = f"{part.path}, page {number}" if part.pages > 1 else str(part.path)
        with reading(where):
            page = self._tif(part).series[0].pages[number]
            data = page.asarray()
        assert self.layout is not None
        if data.shape != self.layout.shape:
            raise ConversionInputError(
                f"{where}: page is {list(data.shape)}, not {list(self.layout.shape)} like the first page"
            )
        return native(self._to_channels_last(data), self.info.dtype)

    def _rows_of_image(self, start: int, stop: int) -> Array:
        """Rows of the one page, through a zarr view that decodes only the strips or tiles needed."""
        part = self.parts[0]
        with reading(str(part.path)):
            if self._rows is None:
                import zarr

                store = self._tif(part).series[0].pages[0].aszarr()
                self._rows = (store, zarr.open_array(store, mode="r"))
            array = self._rows[1]
            assert self.layout is not None
            rows = array[:, start:stop] if self.layout.axes == "SYX" else array[start:stop]
        return native(self._to_channels_last(np.asarray(rows)), self.info.dtype)

    def close(self) -> None:
        """Close the open file (and the image's zarr view)."""
        if self._rows is not None:
            self._rows[0].close()
            self._rows = None
        if self._open is not None:
            self._open[1].close()
            self._open = None


def open_tiff(source: SourceSpec, *, channels: int, sensor: str) -> TiffStack:
    """A reader of the TIFF files of ``source``; a directory without any is an error."""
    files = dataset_files(source, TIFF_SUFFIXES)
    if not files:
        raise ConversionInputError(
            f"{source.path}: no TIFF files (*.tif, *.tiff) found; check the sensor type or the path"
        )
    return TiffStack(files, channels=channels, sensor=sensor)


@converter("TIFF", description="grayscale TIFF slices or multi-page TIFF (any numeric type)")
def open_tiff_gray(source: SourceSpec) -> VolumeReader:
    """Single-channel TIFF stack or image."""
    return open_tiff(source, channels=1, sensor="TIFF")


@converter("TIFF RGB", description="RGB TIFF slices or multi-page TIFF (3 samples per pixel)")
def open_tiff_rgb(source: SourceSpec) -> VolumeReader:
    """RGB TIFF stack or image."""
    return open_tiff(source, channels=3, sensor="TIFF RGB")


@converter("RGB", description="RGB image stack stored as TIFF (3 samples per pixel)")
def open_rgb(source: SourceSpec) -> VolumeReader:
    """ScientistCloud's RGB image stacks; TIFF is the image format readable here without extra codecs."""
    return open_tiff(source, channels=3, sensor="RGB")
