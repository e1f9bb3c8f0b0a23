"""openpi's wire format: msgpack with NumPy arrays and scalars as tagged maps.

An ``ndarray`` travels as ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": shape}`` and a NumPy scalar as ``{b"__npgeneric__": True, b"data": item, b"dtype":
dtype.str}`` (the keys are msgpack bin, not str): byte for byte what ``openpi_client.msgpack_numpy``
writes and reads, so ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` talks to
:mod:`vlablocks.serve` unchanged. Object, void and complex dtypes are refused both ways (openpi
refuses them when packing); nothing is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

#: dtype kinds that never travel: object (pickle), void (structured), complex.
REFUSED_KINDS = ("V", "O", "c")


def pack_array(obj: Any) -> Any:
    """msgpack's ``default`` hook: an ndarray or NumPy scalar -> its tagged map; anything else unchanged."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in REFUSED_KINDS:
        raise ValueError(f"unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def unpack_array(obj: dict) -> Any:
    """msgpack's ``object_hook``: a tagged map -> an ndarray (read-only, over the message's
    bytes) or NumPy scalar; any other map unchanged. ValueError / TypeError for a bad tag."""
    if b"__ndarray__" in obj:
        dtype = _dtype(obj)
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return _dtype(obj).type(obj[b"data"])
    return obj


def _dtype(obj: dict) -> np.dtype:
    dtype = np.dtype(obj[b"dtype"])
    if dtype.kind in REFUSED_KINDS:
        raise ValueError(f"unsupported dtype: {dtype}")
    return dtype


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, numbers, strings, arrays) -> one msgpack message."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: bytes) -> Any:
    """One msgpack message -> Python objects with arrays restored; ValueError (msgpack's errors
    are ValueErrors) or TypeError for bytes that are not one."""
    return msgpack.unpackb(data, object_hook=unpack_array)
