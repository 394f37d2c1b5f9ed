"""One conversion, end to end: read by sensor type, write slab by slab, verify, publish.

The output is written into a staging directory beside the destination and renamed into place only
after it has been read back and compared with the input, so a failure at any point (corrupt input, a
full disk, a verification difference) leaves nothing at the destination. Remote datasets go through a
local copy (:mod:`jobbridge.convert.remote`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from jobbridge.convert.idx_writer import IDX_NAME, IdxOutput, IdxWriter
from jobbridge.convert.registry import SourceSpec, get_converter
from jobbridge.convert.remote import local_copy, parse, upload_tree
from jobbridge.convert.slabs import MEMORY_BUDGET, plan_slabs, slab_length
from jobbridge.convert.verify import boxes_bytes, sample_boxes, verify
from jobbridge.convert.volume import OutputVolume, VolumeInfo, VolumeReader, VolumeWriter
from jobbridge.convert.zarr_writer import ZarrOutput, ZarrWriter
from jobbridge.tasks.files import ProgressFn, no_progress, publish_directory, staging_directory
from jobbridge.tasks.locations import Location

OutputFormat = Literal["idx", "zarr"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("idx", "zarr")
#: The directory of a dataset that holds its conversions; never read as input.
CONVERTED_DIR = "converted"
#: Files that make an output visible to readers; uploaded last to an object store.
ENTRY_FILES: dict[OutputFormat, tuple[str, ...]] = {
    "idx": (IDX_NAME,),
    "zarr": (".zgroup", ".zattrs", ".zmetadata"),
}


@dataclass(frozen=True)
class ConvertRequest:
    """What to convert and where: the job's parameters after validation (locations as strings)."""

    source: str
    sensor: str
    destination: str
    output_format: OutputFormat = "idx"
    variable: str | None = None
    overwrite: bool = False
    dataset_uuid: str | None = None
    memory_budget: int = MEMORY_BUDGET


def _no_start(total: int, verify_total: int) -> None:
    """Default of :attr:`Progresses.started`: nobody is told the totals."""


@dataclass
class Progresses:
    """Where a conversion reports bytes: converted (input bytes written) and verified (bytes compared).

    ``started`` is told both totals once the reader has opened the input, before any byte is written.
    """

    converted: ProgressFn = no_progress
    verified: ProgressFn = no_progress
    started: Callable[[int, int], None] = _no_start


def _is_directory(source: str) -> bool:
    """A local directory; remotely (an object store cannot tell before listing), a location ending in
    ``/`` or whose last name has no suffix (``s3://b/datasets/<uuid>``, not ``.../scan.h5``)."""
    location = parse(source)
    if location.kind == "local":
        return Path(location.path).is_dir()
    return source.endswith("/") or not PurePosixPath(location.path).suffix


def dataset_directory(source: str) -> str:
    """The dataset a source belongs to: the source itself when it is a directory, else its parent."""
    label = parse(source).label().rstrip("/")
    return label if _is_directory(source) else label.rsplit("/", 1)[0]


def output_name(source: str, dataset_uuid: str | None) -> str:
    """The output's base name: the dataset's uuid, else the source's name (a file's without suffix)."""
    if dataset_uuid:
        return dataset_uuid
    path = PurePosixPath(parse(source).label().rstrip("/"))
    return path.name if _is_directory(source) else path.stem


def default_destination(source: str, output_format: OutputFormat, dataset_uuid: str | None) -> str:
    """``<dataset>/converted/<name>`` (a directory holding ``visus.idx``) or ``.../<name>.zarr``."""
    suffix = ".zarr" if output_format == "zarr" else ""
    base = dataset_directory(source).rstrip("/")
    return f"{base}/{CONVERTED_DIR}/{output_name(source, dataset_uuid)}{suffix}"


def entry_point(destination: str, output_format: OutputFormat) -> str:
    """What a reader opens: the ``visus.idx`` file, or the Zarr store itself."""
    return f"{destination.rstrip('/')}/{IDX_NAME}" if output_format == "idx" else destination


def open_writer(
    output_format: OutputFormat,
    directory: Path,
    info: VolumeInfo,
    *,
    name: str,
    metadata: dict[str, Any],
    budget: int = MEMORY_BUDGET,
) -> VolumeWriter:
    """The writer of ``output_format`` into the (empty) ``directory``."""
    if output_format == "zarr":
        return ZarrWriter(directory, info, name=name, metadata=metadata, budget=budget)
    return IdxWriter(directory, info)


def open_output(output_format: OutputFormat, directory: Path) -> OutputVolume:
    """The written dataset in ``directory``, opened for reading through its own library."""
    return ZarrOutput(directory) if output_format == "zarr" else IdxOutput(directory)


def _tree_bytes(root: Path) -> int:
    return sum((Path(d) / n).stat().st_size for d, _, names in os.walk(root) for n in names)


@dataclass(frozen=True)
class Written:
    """What writing and verifying produced, before publishing."""

    facts: dict[str, Any]
    slabs: int
    slab_slices: int
    verified_values: int
    verified_regions: int
    output_bytes: int


def write_and_verify(
    reader: VolumeReader, directory: Path, request: ConvertRequest, progress: Progresses
) -> Written:
    """Convert ``reader`` into ``directory`` slab by slab, then compare sample regions with the input."""
    info = reader.info
    metadata = {
        "source": request.source,
        "sensor": request.sensor,
        "dataset_uuid": request.dataset_uuid,
        "input": info.description,
        "attributes": info.attributes,
    }
    name = output_name(request.source, request.dataset_uuid)
    writer = open_writer(
        request.output_format, directory, info, name=name, metadata=metadata, budget=request.memory_budget
    )
    length = slab_length(
        info.slice_bytes,
        request.memory_budget,
        required=writer.required_alignment,
        preferred=writer.preferred_alignment,
    )
    boxes = sample_boxes(info, length)
    progress.started(info.nbytes, boxes_bytes(info, boxes))
    slabs = 0
    for start, stop in plan_slabs(info.length, length):
        slab = reader.read(start, stop)
        writer.write(start, slab)
        progress.converted(slab.nbytes)
        slabs += 1
        del slab
    facts = writer.finish()
    where = f"{request.output_format} output of {info.description}"
    compared = verify(
        reader, open_output(request.output_format, directory), boxes, where=where, progress=progress.verified
    )
    return Written(facts, slabs, length, compared, len(boxes), _tree_bytes(directory))


@contextlib.contextmanager
def _parent_for(destination: Path) -> Iterator[None]:
    """Create the destination's missing parent (``converted/``) and remove it again if left empty."""
    made = not destination.parent.exists()
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                destination.parent.rmdir()  # only succeeds when nothing was published into it


def _publish_local(
    reader: VolumeReader, destination: Path, request: ConvertRequest, progress: Progresses
) -> Written:
    with _parent_for(destination), staging_directory(destination) as staging:
        written = write_and_verify(reader, staging, request, progress)
        publish_directory(staging, destination, overwrite=request.overwrite)
    return written


def _publish_remote(
    reader: VolumeReader, destination: Location, request: ConvertRequest, progress: Progresses
) -> Written:
    with tempfile.TemporaryDirectory(prefix="jobbridge-convert-out-") as scratch:
        staging = Path(scratch) / "output"
        staging.mkdir()
        written = write_and_verify(reader, staging, request, progress)
        upload_tree(
            staging, destination, entries=ENTRY_FILES[request.output_format], overwrite=request.overwrite
        )
    return written


@contextlib.contextmanager
def _local_source(request: ConvertRequest) -> Iterator[SourceSpec]:
    """The source as local files, with the dataset's ``converted/`` and the destination left out."""
    source = parse(request.source)
    destination = parse(request.destination)
    if source.kind == "local":
        path = Path(source.path)
        exclude = [path / CONVERTED_DIR]
        if destination.kind == "local":
            exclude.append(Path(destination.path))
        yield SourceSpec(path, request.variable, tuple(exclude))
        return
    with local_copy(source, exclude=(CONVERTED_DIR,)) as path:
        yield SourceSpec(path, request.variable, (path / CONVERTED_DIR,))


@dataclass(frozen=True)
class ConvertResult:
    """A finished conversion, as the job's result."""

    request: ConvertRequest
    info: VolumeInfo
    written: Written
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready result: where the output is, what it holds and how the run went."""
        request, written = self.request, self.written
        rate = self.info.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return {
            "source": request.source,
            "sensor": request.sensor,
            "dataset_uuid": request.dataset_uuid,
            "output_format": request.output_format,
            "destination": request.destination,
            "open": entry_point(request.destination, request.output_format),
            "variable": self.info.attributes.get("variable"),
            "input": self.info.summary(),
            "output_bytes": written.output_bytes,
            "slabs": written.slabs,
            "slab_slices": written.slab_slices,
            "verified_regions": written.verified_regions,
            "verified_values": written.verified_values,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(rate, 2),
            **written.facts,
        }


def convert_dataset(request: ConvertRequest, progress: Progresses | None = None) -> ConvertResult:
    """Run ``request``: the output exists, verified, at ``request.destination`` when this returns."""
    progress = progress or Progresses()
    started = time.monotonic()
    converter = get_converter(request.sensor)
    request = replace(request, sensor=converter.sensor)  # ScientistCloud's spelling, whatever was typed
    destination = parse(request.destination)
    with _local_source(request) as spec, converter.open(spec) as reader:
        if destination.kind == "local":
            written = _publish_local(reader, Path(destination.path), request, progress)
        else:
            written = _publish_remote(reader, destination, request, progress)
        info = reader.info
    return ConvertResult(request, info, written, time.monotonic() - started)
