"""Camera frames on demand: images embedded in parquet files (LeRobot's ``image`` features and
vlablocks' 16-bit depth) read one row group at a time, and video features decoded at a timestamp.

Each process (a DataLoader worker included) opens files itself, lazily, and keeps a few recently
used row groups: memory stays bounded by ``ROW_GROUP_CACHE`` groups however large the dataset.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlablocks.data.format import decode_png

#: row groups of embedded images kept per process and column.
ROW_GROUP_CACHE = 4


class ParquetImages:
    """The encoded frames of one image column (LeRobot's ``{bytes, path}`` struct, or raw bytes)
    across parquet files, fetched by ``(file, row)`` and decoded (PNG or JPEG) to numpy:
    ``[H, W, 3]`` uint8 RGB, or ``[H, W]`` uint16 for 16-bit depth."""

    def __init__(self, column: str) -> None:
        self.column = column
        self._pid = -1
        self._offsets: dict[Path, np.ndarray] = {}
        self._groups: OrderedDict[tuple[Path, int], list[bytes | None]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"column": self.column}  # open files and caches stay in their process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["column"])

    def frames(self, path: Path, rows: Sequence[int], pool: Executor | None = None) -> list[np.ndarray]:
        """Decode rows ``rows`` of ``path``, in ``pool``'s threads when given (Pillow decodes
        without holding the GIL)."""
        encoded = [(row, self.encoded(path, row)) for row in rows]
        return list((pool.map if pool is not None else map)(lambda item: self._decode(*item), encoded))

    def frame(self, path: Path, row: int) -> np.ndarray:
        """Decode row ``row`` of ``path`` (ValueError naming the column and row; the caller names the file)."""
        return self._decode(row, self.encoded(path, row))

    def _decode(self, row: int, data: bytes | None) -> np.ndarray:
        if data is None:
            raise ValueError(f"column {self.column!r}, row {row}: no embedded bytes (image paths are not supported)")
        try:
            return decode_png(data)
        except (OSError, ValueError, SyntaxError) as err:  # Pillow: UnidentifiedImageError, truncated data
            raise ValueError(f"column {self.column!r}, row {row}: not a readable image ({err})") from None

    def encoded(self, path: Path, row: int) -> bytes | None:
        """The stored bytes of row ``row`` of ``path``."""
        if self._pid != os.getpid():  # a fresh process (a forked worker): nothing inherited is used
            self._pid, self._offsets, self._groups = os.getpid(), {}, OrderedDict()
        offsets = self._offsets.get(path)
        if offsets is None:
            meta = pq.ParquetFile(path).metadata
            offsets = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            self._offsets[path] = offsets
        group = int(np.searchsorted(offsets, row, side="right")) - 1
        if not 0 <= group < len(offsets) - 1:
            raise IndexError(f"{path}: row {row} out of range for {int(offsets[-1])} rows")
        values = self._groups.get((path, group))
        if values is None:
            values = _column_bytes(pq.ParquetFile(path).read_row_group(group, columns=[self.column]), self.column)
            self._groups[(path, group)] = values
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end((path, group))
        return values[row - int(offsets[group])]


def _column_bytes(table: pa.Table, column: str) -> list[bytes | None]:
    """The bytes of an image column: the ``bytes`` field of LeRobot's struct, or the column itself."""
    array = table.column(column).combine_chunks()
    data = array.field("bytes") if pa.types.is_struct(array.type) else array
    return data.to_pylist()
