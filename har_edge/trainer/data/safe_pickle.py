"""A restricted unpickler for the HAPT pickle (never a plain ``pickle.load`` of downloaded bytes).

``pickle`` calls whatever callable a file names, so a downloaded pickle is code.
This unpickler resolves only an allow-list of globals; anything else (``os.system``,
``builtins.eval``, ``subprocess.Popen``...) raises :class:`UnsafePickle` before it
is called.

What the HAPT pickle (written by pandas 0.x, protocol 2) asks for, found with
``pickletools.genops`` on the file: numpy's ``_reconstruct``/``ndarray``/``dtype``,
``_codecs.encode`` (how protocol 2 stores bytes), ``copyreg._reconstructor`` with
``object``, ``slice``, and five pandas names (``DataFrame``, ``BlockManager``,
``Index``, ``RangeIndex``, ``_new_Index``). The pandas names resolve to inert
records here instead of pandas' classes: their state is plain numpy arrays,
strings and slices, read by :func:`frame_columns`, so no pandas code runs on the
file's state and the pickle reads the same whatever pandas is installed
(pandas 3 no longer reads 0.x internals).
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from typing import Any, Protocol

import numpy as np

from har_edge.trainer.errors import DataError, UnsafePickle

__all__ = ["Record", "frame_columns", "safe_load", "safe_loads"]


class _Readable(Protocol):
    """What :class:`pickle.Unpickler` reads from: a binary file, a GzipFile, BytesIO."""

    def read(self, n: int, /) -> bytes: ...
    def readline(self) -> bytes: ...


#: Python 2 module names a protocol-2 pickle uses.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Record:
    """Stand-in for an allowed pandas class: keeps what the pickle gives it, runs nothing."""

    pandas_name = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.pandas_name} record>"


def _record_class(name: str) -> type[Record]:
    return type(name.rsplit(".", 1)[1] + "Record", (Record,), {"pandas_name": name})


DataFrameRecord = _record_class("pandas.core.frame.DataFrame")
BlockManagerRecord = _record_class("pandas.core.internals.managers.BlockManager")
IndexRecord = _record_class("pandas.core.indexes.base.Index")
RangeIndexRecord = _record_class("pandas.core.indexes.range.RangeIndex")


def _new_index(cls: type, state: dict) -> Record:
    if cls not in (IndexRecord, RangeIndexRecord):
        raise UnsafePickle(f"pandas _new_Index({cls!r}) is outside the allow-list")
    rec = cls()
    rec.state = state
    return rec


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not object or state is not None:
        raise UnsafePickle(f"copyreg._reconstructor({cls!r}, {base!r}) is outside the allow-list")
    return cls()


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle(f"_codecs.encode with {encoding!r} is outside the allow-list")
    return codecs.encode(text, "latin1")


def _numpy_reconstruct() -> Any:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct


_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "object"): object,
    ("builtins", "slice"): slice,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("pandas.core.frame", "DataFrame"): DataFrameRecord,
    ("pandas.core.internals.managers", "BlockManager"): BlockManagerRecord,
    ("pandas.core.indexes.base", "Index"): IndexRecord,
    ("pandas.core.indexes.range", "RangeIndex"): RangeIndexRecord,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: _Readable, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"{self.source} asks for {module}.{name}, which is not on the allow-list of numpy/pandas "
                "data classes: refusing to load it (the file is not the expected dataset, or it was tampered with)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle(f"{self.source} uses persistent ids: refusing to load it")


def safe_load(file: _Readable, source: str = "pickle") -> Any:
    """Unpickle ``file`` admitting only the allow-listed numpy/pandas names."""
    try:
        return _RestrictedUnpickler(file, source).load()
    except UnsafePickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{source} is not a readable pickle of numpy/pandas data: {exc}") from None


def safe_loads(data: bytes, source: str = "pickle") -> Any:
    return safe_load(io.BytesIO(data), source)


def frame_columns(frame: Any, source: str = "pickle") -> dict[str, np.ndarray]:
    """Columns of an unpickled (pandas 0.14+ layout) DataFrame record as numpy arrays."""
    try:
        if not isinstance(frame, DataFrameRecord):
            raise TypeError(f"expected a DataFrame, found {type(frame).__name__}")
        manager = frame.state["_data"]
        if not isinstance(manager, BlockManagerRecord):
            raise TypeError("the frame holds no BlockManager")
        layout = manager.state[3]["0.14.1"]
        axes, blocks = layout["axes"], layout["blocks"]
        items = axes[0]
        if not isinstance(items, IndexRecord):
            raise TypeError("the column axis is not an Index")
        names = [str(n) for n in items.state["data"]]
        columns: dict[str, np.ndarray] = {}
        for block in blocks:
            values = np.asarray(block["values"])
            locs = block["mgr_locs"]
            idx = range(len(names))[locs] if isinstance(locs, slice) else [int(i) for i in np.asarray(locs)]
            if len(idx) != values.shape[0]:
                raise ValueError("a block's values and its column positions disagree")
            for row, col in enumerate(idx):
                columns[names[col]] = values[row]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{source}: unexpected DataFrame layout ({exc}); expected pandas 0.14+ block layout") from None
    return columns
