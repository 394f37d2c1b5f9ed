"""Finding a sensor's files in an uploaded dataset.

A dataset is a file or a directory. In a directory, readers take the files with their suffixes, in
natural order (``slice_2`` before ``slice_10``, as a scientist numbers slices), anywhere below it except
in hidden entries (staging directories are hidden) and the conversion's own output, which by default
lives inside the dataset (``<dataset>/converted/``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path

from jobbridge.convert.registry import SourceSpec
from jobbridge.convert.volume import ConversionInputError

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers by value: ``img2.tif`` < ``img10.tif``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.lower()) for part in _DIGITS.split(name) if part
    )


def _inside(path: Path, roots: Collection[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def dataset_files(source: SourceSpec, suffixes: Collection[str]) -> list[Path]:
    """Files of ``source`` whose suffix (lower case, with the dot) is in ``suffixes``, naturally sorted.

    A file source is returned as it is, whatever its suffix: the user named it.
    """
    if source.path.is_file():
        return [source.path]
    excluded = [Path(os.path.abspath(path)) for path in source.exclude]
    found: list[Path] = []
    for directory, subdirs, files in os.walk(source.path):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and not _inside(here / d, excluded)]
        found.extend(
            here / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes
        )
    return sorted(found, key=lambda path: natural_key(path.relative_to(source.path).as_posix()))


def single_file(source: SourceSpec, suffixes: Collection[str], kind: str) -> Path:
    """The one ``kind`` file of ``source``; none, or several, is an error saying what to pass instead."""
    files = dataset_files(source, suffixes)
    if not files:
        raise ConversionInputError(
            f"{source.path}: no {kind} file found (looked for {', '.join(sorted(suffixes))}); "
            "set 'source' to the file or check the sensor type"
        )
    if len(files) > 1:
        names = ", ".join(path.relative_to(source.path).as_posix() for path in files[:5])
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        raise ConversionInputError(
            f"{source.path}: {len(files)} {kind} files ({names}{more}); set 'source' to the one to convert"
        )
    return files[0]
