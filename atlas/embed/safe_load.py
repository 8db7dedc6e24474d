"""Loading model files that others may have written without running their code.

A PyTorch checkpoint is a pickle: unpickling it can call any function it names. scvi-tools reads its ``model.pt``
with ``torch.load(weights_only=False)``, so an index (or a pretrained model directory) from elsewhere could run code
when opened, and PyTorch's own restricted loader (``weights_only=True``) cannot read scvi-tools' settings (a
``defaultdict``). :func:`check_pickled_names` reads the file's pickle first with an unpickler that builds nothing:
every function or class the pickle names must be on :data:`ALLOWED` (tensors and their storages, containers, and
the NumPy arrays and pandas tables scvi-tools keeps in its settings), and is replaced by an inert placeholder. A file
that passes names nothing else, so the full load that follows calls only those.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

from scatlas.atlas.errors import StoreError
from scatlas.atlas.validate import escaped

_NUMPY = ("_reconstruct", "scalar", "ndarray", "dtype")
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in _NUMPY),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *(("numpy.dtypes", n) for n in ("BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType",
                                     "Int32DType", "UInt32DType", "Int64DType", "UInt64DType", "Float16DType",
                                     "Float32DType", "Float64DType", "ObjectDType", "StrDType", "BytesDType")),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.indexes.category", "CategoricalIndex"), ("pandas.core.arrays.categorical", "Categorical"),
    ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
    *((m, n) for m in ("builtins", "__builtin__")
      for n in ("slice", "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "int", "float", "bool",
                "complex", "str")),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"),
    *(("torch", n) for n in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                             "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                             "UntypedStorage")),
    *(("torch", n) for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                             "uint8", "bool")),
})
"""``(module, name)`` a model file's pickle may name."""


class _Inert:
    """What every allowed name becomes while checking: accepts any construction, state and items, builds
    nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Restricted(pickle.Unpickler):
    """An unpickler that builds nothing named: every function or class the pickle names must be in ``allowed`` and
    becomes :class:`_Inert`; tensors' storages are not read. With nothing allowed it rebuilds plain data only."""

    def __init__(self, file: Any, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise _Refused(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid: Any) -> Any:  # a tensor's storage: not read (plain data has none)
        if not self.allowed:
            raise pickle.UnpicklingError("a persistent id in a pickle of plain data")
        return _Inert()


class _Refused(Exception):
    pass


SAVE_RECORDS = frozenset({"data.pkl", "byteorder", "version", ".format_version", ".storage_alignment",
                          ".data/version", ".data/serialization_id"})
"""The records ``torch.save`` writes besides the tensors' ``data/N``: an archive holding any other is not read."""
ZIP_MAGIC = b"PK\x03\x04"
"""How a file must start for ``torch.load`` to read it as a zip archive: any other start sends it down PyTorch's
older format, which unpickles the file's first bytes without restriction."""


def _torch_pickle(path: Path, what: str) -> bytes:
    """The pickle ``torch.load`` would unpickle from ``path``: the zip archive's ``data.pkl`` record, read with
    PyTorch's own reader (the bytes it reads, not another reader's view of a file made to look different to
    each); StoreError for any other file."""
    import torch

    not_model = f"{what} is not a PyTorch model file in its zip format"
    try:
        with open(path, "rb") as fh:
            if fh.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                raise StoreError(f"{not_model} (files in PyTorch's format before 1.6 are not read)")
            fh.seek(0)
            reader = torch._C.PyTorchFileReader(fh)
            records = list(reader.get_all_records())
            if "data.pkl" not in records:
                raise StoreError(f"{not_model} (no data.pkl record)")
            other = [r for r in records if r not in SAVE_RECORDS and not re.fullmatch(r"data/\d+", r)]
            if other:  # e.g. constants.pkl: torch.load hands such an archive to TorchScript, which runs its code
                raise StoreError(f"{not_model} (it holds records torch.save does not write, e.g. "
                                 f"{escaped(other[0][:100])}: a TorchScript archive?)")
            return bytes(reader.get_record("data.pkl"))
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever PyTorch's reader says of a malformed archive
        raise StoreError(f"{not_model} ({type(exc).__name__})") from None


def check_pickled_names(path: Path, what: str) -> None:
    """StoreError unless every function and class the PyTorch file ``path`` names is on :data:`ALLOWED`
    (``what`` names the file in the message). Nothing in the file is run."""
    _unpickle(_torch_pickle(path, what), ALLOWED, what,
              refused=", which a model's weights and settings never need: scatlas does not load it, since loading it "
                      "could run code it carries. Use a model saved by scatlas or scvi-tools from a source you "
                      "trust, or rebuild the index",
              unreadable="is not a readable PyTorch model file")


def load_plain_pickle(path: Path, what: str) -> Any:
    """The contents of a pickle of plain data (dicts, lists, strings, numbers: what needs no function or class to
    rebuild), e.g. UCE's ``species_offsets.pkl``; StoreError for a pickle naming any function or class (it could
    run code) or one that cannot be read."""
    unreadable = "is not a readable pickle of plain data"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StoreError(f"{what} {unreadable} ({type(exc).__name__})") from None
    return _unpickle(data, frozenset(), what, unreadable=unreadable,
                     refused=": scatlas reads only plain data from it, since loading it could run code it carries")


def _unpickle(data: bytes, allowed: frozenset[tuple[str, str]], what: str, *, refused: str, unreadable: str) -> Any:
    """``data`` unpickled by :class:`_Restricted` allowing ``allowed``; StoreError naming what it refused, then
    ``refused``, or saying ``unreadable``."""
    try:
        return _Restricted(io.BytesIO(data), allowed).load()
    except _Refused as exc:
        raise StoreError(f"{what} names {escaped(str(exc)[:200])}{refused}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle, whatever the unpickler says
        raise StoreError(f"{what} {unreadable} ({type(exc).__name__})") from None
