"""Multipart uploads streamed to disk under a size cap, and the checks made before a job is queued.

Starlette's own form parser spools every file part whole (to a temporary file) before the route sees it, with no
size limit; this parser feeds :mod:`python_multipart` the request body as it arrives and writes the one file part
(``file``) straight into the job's directory, under a name the server chose, stopping at the cap
(:class:`UploadTooLarge`, an HTTP 413). Other parts are short text fields (at most :data:`MAX_FIELDS`, each at most
:data:`MAX_FIELD_BYTES`).
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from scatlas.atlas.errors import InputError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first 8 bytes of an HDF5 file (at offset 0, or 512, 1024, 2048, ... after a user block)."""
MAX_TABLE_BYTES = 4 * 2**30
"""An upload's obs and var tables may declare at most this many bytes: they are read whole (a compressed file can
declare a thousand times its size)."""
MAX_UPLOAD_CELLS = 3_000_000
"""An upload may hold at most this many cells (rows of X or of obs): checked before anything is read, since a few
megabytes of compressed file can declare a hundred million cells. An annotate job keeps k neighbours of each cell
(at most 1e8 rows, so 3.3 million cells at the default k); larger queries run on the command line."""
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024
DRAIN_BYTES = 64 << 20
"""After the cap is passed, up to this many more bytes are read and dropped, so that the client, which sends its
whole request before reading the answer, gets the 413 rather than a reset connection."""
UPLOAD_NAME_CHARS = 120


class UploadTooLarge(InputError):
    """The upload passed the server's size cap."""


class _Parts:
    """python-multipart callbacks: text fields into ``fields``, the part named ``file`` into ``out``."""

    def __init__(self, out: IO[bytes], max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.fields: dict[str, list[str]] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.too_large = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()
        self._n_fields = 0

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._data = b"", None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InputError("a part of the form has no name")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in options
        if self._is_file:
            if self._name != "file":
                raise InputError(f"unexpected file part {self._name[:40]!r}: send the .h5ad as the part 'file'")
            if self.filename is not None:
                raise InputError("send one file (the part 'file'), not several")
            self.filename = options[b"filename"].decode("utf-8", "replace")
        else:
            self._n_fields += 1
            if self._n_fields > MAX_FIELDS:
                raise InputError(f"too many form fields (at most {MAX_FIELDS})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            n = end - start
            self.file_bytes += n
            if self.file_bytes > self.max_bytes:
                self.too_large = True
            if not self.too_large:
                self.out.write(data[start:end])
            return
        if len(self._data) + end - start > MAX_FIELD_BYTES:
            raise InputError(f"the form field {str(self._name)[:40]!r} is longer than {MAX_FIELD_BYTES:,} bytes")
        self._data.extend(data[start:end])

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields.setdefault(self._name, []).append(self._data.decode("utf-8", "replace"))


async def receive_upload(
    content_type: str, body: AsyncIterator[bytes], dest: Path, max_bytes: int
) -> tuple[dict[str, list[str]], str | None, int]:
    """Parse a ``multipart/form-data`` body: the ``file`` part is written to ``dest`` (UploadTooLarge past
    ``max_bytes``), text fields returned. Returns ``(fields, the client's file name or None, file bytes)``."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise InputError("send the upload as multipart/form-data (a form with the .h5ad in the part 'file')")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        codecs.lookup(charset)
    except LookupError as exc:
        raise InputError(f"unknown form charset {charset[:40]!r}") from exc
    with open(dest, "wb") as out:
        parts = _Parts(out, max_bytes)
        parser = MultipartParser(params[b"boundary"], parts.callbacks())  # type: ignore[arg-type]
        drained = 0
        try:
            async for chunk in body:
                if parts.too_large:
                    drained += len(chunk)
                    if drained > DRAIN_BYTES:
                        break
                    continue
                parser.write(chunk)
            if not parts.too_large:
                parser.finalize()
        except FormParserError as exc:
            raise InputError("the multipart form could not be read (malformed body)") from exc
    if parts.too_large:
        raise UploadTooLarge(
            f"the upload is larger than this server's limit of {max_bytes / 2**20:,.1f} MiB (--max-upload-mb)"
        )
    return parts.fields, parts.filename, parts.file_bytes


def check_h5ad(path: Path, size: int, *, name: str | None = None) -> int:
    """Refuse an upload that is not an HDF5 file holding an AnnData (``obs``, ``var`` and ``X``); its cell count.
    ``name``: the upload's file name as shown (:func:`display_name`); None when the form named no file."""
    import h5py

    if size == 0 and name is None:
        raise InputError("no file was uploaded: send the .h5ad as the form part 'file'")
    if size == 0:
        raise InputError(f"the uploaded file {name!r} is empty (0 bytes): send the .h5ad with its contents")
    with open(path, "rb") as fh:
        head = fh.read(8)
        offset = 512
        while head != HDF5_SIGNATURE and offset + 8 <= size:
            fh.seek(offset)
            head = fh.read(8)
            offset *= 2
    if head != HDF5_SIGNATURE:
        raise InputError("the uploaded file is not an .h5ad: it does not start like an HDF5 file")
    from scatlas.atlas.sources.h5ad import check_anndata_hdf5
    from scatlas.atlas.sources.hdf5_checks import declared_size

    try:
        with h5py.File(path, "r") as f:
            check_anndata_hdf5(f, "the uploaded file")  # the check (and message) of every .h5ad reader
            x = f.get("X")
            shape = x.attrs.get("shape") if isinstance(x, h5py.Group) else getattr(x, "shape", None)
            sizes = {m: declared_size(f[m], "the uploaded file") if isinstance(f[m], h5py.Group) else (0, 0)
                     for m in ("obs", "var")}
            rows = sizes["obs"][1]
            with contextlib.suppress(TypeError, ValueError):
                rows = max(rows, int(shape[0]) if shape is not None and len(shape) == 2 else 0)
            if rows > MAX_UPLOAD_CELLS:
                raise InputError(f"the uploaded file holds {rows:,} cells, over the {MAX_UPLOAD_CELLS:,} this server "
                                 "takes in one upload: split the cells into several files, or run the scatlas "
                                 "command")
            tables = sum(size for size, _ in sizes.values())
            if tables > MAX_TABLE_BYTES:
                raise InputError(f"the uploaded file's obs and var tables hold {tables / 2**30:.1f} GiB once read, "
                                 f"over the {MAX_TABLE_BYTES / 2**30:.0f} GiB the server reads for one upload: drop "
                                 "columns the request does not need, or split the cells into several files")
    except (OSError, ValueError) as exc:
        raise InputError(f"the uploaded file is not a readable HDF5 file ({type(exc).__name__})") from None
    try:
        return int(shape[0]) if shape is not None and len(shape) == 2 else 0
    except (TypeError, ValueError):
        return 0


def read_obs(path: Path) -> Any:
    """The uploaded .h5ad's obs (a DataFrame), for predicates over it; InputError when it cannot be read."""
    import anndata
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return anndata.io.read_elem(f["obs"])
    except Exception as exc:  # any failure to decode an untrusted file is bad input
        raise InputError(f"the obs table of the uploaded file cannot be read ({type(exc).__name__})") from None


def display_name(filename: str | None) -> str:
    """The client's file name as shown in messages: its last component, printable characters only, shortened."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:UPLOAD_NAME_CHARS]
    return name or "the uploaded file"
