"""A multipart upload (ScientistCloud's ``/upload`` and ``/local/upload``) parsed as it streams.

Starlette's form parser spools each file into a temporary file (in ``/tmp``, possibly a small tmpfs) that
the route would then copy. Here the ``file`` part goes straight into the upload area, hashed on the way,
with the memory of one block; the other parts are short text fields (at most 64 KiB each, 64 of them).
The file's name is checked (:func:`jobbridge.api.names.safe_filename`) before a byte of it is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from jobbridge.api.errors import UploadError
from jobbridge.api.ledger import UploadRecord
from jobbridge.api.staging import UploadStore
from jobbridge.api.streaming import BlockFeeder, stream_slots
from jobbridge.api.writers import SingleWriter

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 64


class FormError(UploadError):
    """The multipart body is not one this API accepts."""


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: bytes | None = None
    data: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""
    header_value: bytes = b""


@dataclass
class ReceivedForm:
    """The text fields of the form and the staged file (its record is ``verified``, SHA-256 known)."""

    fields: dict[str, str]
    upload: UploadRecord | None = None


class _FormReader:
    """python-multipart callbacks: text fields into memory, the file part into a :class:`SingleWriter`."""

    def __init__(self, store: UploadStore, max_file_size: int) -> None:
        self.store = store
        self.max_file_size = max_file_size
        self.part = _Part()
        self.fields: dict[str, str] = {}
        self.writer: SingleWriter | None = None
        self.feeder: BlockFeeder | None = None
        self.pending: list[memoryview] = []
        self.in_file = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }

    def _part_begin(self) -> None:
        self.part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def _header_end(self) -> None:
        self.part.headers[self.part.header_name.lower()] = self.part.header_value
        self.part.header_name, self.part.header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        raw_name = options.get(b"name")
        if raw_name is None:
            raise FormError("a form part has no name in its Content-Disposition header")
        self.part.name = _text(raw_name, "a form field name")
        self.part.filename = options.get(b"filename")
        if self.part.name == FILE_FIELD:
            if self.part.filename is None:
                raise FormError("the 'file' part has no filename in its Content-Disposition header")
            if self.writer is not None:
                raise FormError("send one 'file' part per request")
            self.writer = self.store.begin_single(self.part.filename, self.max_file_size)
            self.feeder = BlockFeeder(self.writer)
            self.in_file = True
        elif self.part.filename is not None:
            raise FormError(
                f"unexpected file part {self.part.name!r}: the file goes in the part named 'file'"
            )
        elif len(self.fields) >= MAX_FIELDS:
            raise FormError(f"too many form fields (at most {MAX_FIELDS})")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.pending.append(memoryview(data)[start:end])
            return
        self.part.data += data[start:end]
        if len(self.part.data) > MAX_FIELD_BYTES:
            raise FormError(f"form field {self.part.name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self.in_file:
            self.in_file = False
            return
        self.fields[self.part.name] = _text(bytes(self.part.data), f"form field {self.part.name!r}")

    async def drain(self) -> None:
        """Write the file bytes the last ``write`` produced."""
        pending, self.pending = self.pending, []
        if self.feeder is not None:
            for piece in pending:
                await self.feeder.feed(piece)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"{what} is not valid UTF-8") from None


async def receive_form(request: Request, store: UploadStore, max_file_size: int) -> ReceivedForm:
    """Parse a ``multipart/form-data`` body, staging its ``file`` part; nothing is left behind on error."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data") or not boundary:
        raise FormError("send the file as multipart/form-data (a part named 'file' and the text fields)")
    reader = _FormReader(store, max_file_size)
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    try:
        async with stream_slots():
            async for piece in request.stream():
                parser.write(piece)
                await reader.drain()
            parser.finalize()
            await reader.drain()
            if reader.feeder is not None:
                await reader.feeder.flush()
        record = await _finish(reader)
    except FormParserError as exc:
        _discard(reader)
        raise FormError(f"the multipart body cannot be read: {exc}") from None
    except (ClientDisconnect, Exception):
        _discard(reader)
        raise
    return ReceivedForm(reader.fields, record)


async def _finish(reader: _FormReader) -> UploadRecord | None:
    import anyio.to_thread

    if reader.writer is None:
        return None
    return await anyio.to_thread.run_sync(reader.writer.finish)


def _discard(reader: _FormReader) -> None:
    if reader.writer is not None:
        reader.writer.discard()
