"""Read a multipart upload into memory, within limits, without ever touching the disk.

Starlette's own form parser spools every file larger than 1 MB to a temporary file; uploads of
radiographs must not be written anywhere, so the request body is parsed here with
python-multipart's streaming parser into ``bytes``. Every limit is checked while the body
streams in, so an oversized request is refused before it is held in memory in full.

A body must keep coming: it has ``body_grace_s`` seconds, and one more second for every
``body_min_rate`` bytes received; a slower one is answered 408 and closed, so connections that
trickle a byte now and then cannot hold the server's request slots. A body that ends before its
closing multipart boundary (a cut-off upload) is refused as incomplete, not read as "no files".
"""
from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import BonexrayError

FIELD = "files"
_MAX_OTHER_FIELDS = 8  # plain form fields are ignored, but never collected without bound
#: Plain text fields whose (short) value is kept for the caller (``fields`` of read_uploads).
TEXT_FIELDS = ("grouping",)
_MAX_TEXT = 64
_MAX_NAME = 120


class UploadError(Exception):
    """A request the API refuses: ``status`` (4xx) and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    max_files: int = 16
    max_file_bytes: int = 32 * 1024 * 1024
    max_request_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    body_grace_s: int = 10  # seconds a request body has before it must arrive at body_min_rate
    body_min_rate: int = 8 * 1024  # bytes per second, averaged over the body (after the grace)

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_request_bytes", "max_pixels", "body_grace_s", "body_min_rate"):
            if getattr(self, name) < 1:
                raise BonexrayError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Upload:
    name: str  # display name: the client's file name without folders or control characters
    data: bytes


def display_name(raw: str, index: int) -> str:
    """A client file name made safe to echo: last path component, printable, bounded."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    if len(name) > _MAX_NAME:
        name = name[: _MAX_NAME - 3] + "..."
    return name or f"file{index + 1}"


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"  # binary units: the limits are multiples of 1024 * 1024 bytes


async def paced(body: AsyncIterator[bytes], limits: UploadLimits) -> AsyncIterator[bytes]:
    """``body``'s chunks, as long as they keep coming: by ``body_grace_s + received / body_min_rate`` seconds
    after the start, else :class:`UploadError` 408."""
    start = time.monotonic()
    received = 0
    chunks = body.__aiter__()
    while True:
        remaining = start + limits.body_grace_s + received / limits.body_min_rate - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            with anyio.fail_after(remaining):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadError(408, f"request body too slow: {received:,} bytes in {time.monotonic() - start:.0f} s "
                                   f"(a body gets {limits.body_grace_s} s, then must keep up "
                                   f"{limits.body_min_rate:,} bytes/s); send it again") from None
        received += len(chunk)
        yield chunk


def _multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; :class:`UploadError` for any other type."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise UploadError(415, f"send the images as multipart/form-data in the form field '{FIELD}' "
                               f"(got Content-Type {ctype.decode('latin-1') or 'none'})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    return boundary


def _check_declared_length(content_length: str | None, limits: UploadLimits) -> None:
    """Refuse a request whose Content-Length is malformed or over the limit, before reading its body."""
    if content_length:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, "malformed Content-Length header") from None
        if declared > limits.max_request_bytes:
            raise UploadError(413, f"request of {_mb(declared)} exceeds the limit of {_mb(limits.max_request_bytes)}")


class _FormParts:
    """The multipart parser's callbacks: they collect the uploads of field ``files`` (within the limits), the
    :data:`TEXT_FIELDS` values (into ``fields``) and the names of the other fields, one part at a time."""

    def __init__(self, limits: UploadLimits, fields: dict[str, str] | None) -> None:
        self.limits = limits
        self.fields = fields
        self.uploads: list[Upload] = []
        self.other_fields: list[str] = []
        self.ended = False
        # The part being read: its headers (and the header being read), form field name, file name (None for
        # a text field), data (None between parts) and size so far.
        self.headers: dict[bytes, bytes] = {}
        self.header_field, self.header_value = b"", b""
        self.name: str | None = None
        self.file: str | None = None
        self.buf: bytearray | None = None
        self.size = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data, "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field, "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end, "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.headers, self.name, self.file, self.buf, self.size = {}, None, None, bytearray(), 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        self.name = name
        if b"filename" in opts:
            self.file = opts[b"filename"].decode("utf-8", "replace")
            if name == FIELD and len(self.uploads) + 1 > self.limits.max_files:
                raise UploadError(413, f"too many files: at most {self.limits.max_files} per request")
        if name != FIELD:
            self.other_fields.append(name)
            if len(self.other_fields) > _MAX_OTHER_FIELDS:
                raise UploadError(400, "too many form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.name != FIELD:
            if self.fields is not None and self.name in TEXT_FIELDS and self.size <= _MAX_TEXT:
                self.buf += data[start:end]
            return  # other fields are counted, not kept
        if self.size > self.limits.max_file_bytes:
            shown = display_name(self.file or "", len(self.uploads))
            raise UploadError(413, f"{shown}: file exceeds the limit of {_mb(self.limits.max_file_bytes)}")
        self.buf += data[start:end]

    def on_end(self) -> None:
        self.ended = True

    def on_part_end(self) -> None:
        if self.name == FIELD:
            if self.file is None:
                raise UploadError(400, f"form field '{FIELD}' must carry files, not text")
            self.uploads.append(Upload(display_name(self.file, len(self.uploads)), bytes(self.buf)))
        elif self.fields is not None and self.name in TEXT_FIELDS and self.file is None:
            self.fields[self.name] = bytes(self.buf).decode("utf-8", "replace").strip()
        self.buf = None

    def check_complete(self, received: int) -> None:
        """Refuse a body that ended before its closing multipart boundary (a cut-off upload)."""
        if not self.ended:
            cut = f" inside {display_name(self.file, len(self.uploads))}" if self.file and self.buf is not None else ""
            raise UploadError(400, f"incomplete upload: the body ended{cut} after {received:,} bytes, before the "
                                   "closing multipart boundary (a cut-off transfer?); nothing was analysed, "
                                   "send it again")

    def check_some_files(self) -> None:
        """Refuse a request without files, naming the fields it sent instead."""
        if not self.uploads:
            if self.other_fields:
                names = ", ".join(repr(f) for f in dict.fromkeys(self.other_fields))
                raise UploadError(400, f"no files in form field '{FIELD}' (got field {names}); "
                                       f"send the images as {FIELD}=@image.jpg")
            raise UploadError(400, f"no files: send one or more images in the form field '{FIELD}'")


async def _feed(parser: MultipartParser, body: AsyncIterator[bytes], limits: UploadLimits) -> int:
    """Stream ``body`` (paced, and within the request limit) into ``parser``; returns the bytes received."""
    received = 0
    try:
        async for chunk in paced(body, limits):
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise UploadError(413, f"request exceeds the limit of {_mb(limits.max_request_bytes)}")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as err:  # noqa: BLE001 - python-multipart parse errors: a malformed body
        raise UploadError(400, f"malformed multipart/form-data body ({type(err).__name__})") from None
    return received


async def read_uploads(content_type: str | None, content_length: str | None, body: AsyncIterator[bytes],
                       limits: UploadLimits, fields: dict[str, str] | None = None) -> list[Upload]:
    """The files of form field ``files``, in order; raises :class:`UploadError` for a bad request.
    ``fields``: filled with the values of the :data:`TEXT_FIELDS` the request sends (at most 64 bytes each)."""
    boundary = _multipart_boundary(content_type)
    _check_declared_length(content_length, limits)
    form = _FormParts(limits, fields)
    received = await _feed(MultipartParser(boundary, form.callbacks()), body, limits)
    form.check_complete(received)
    form.check_some_files()
    return form.uploads
