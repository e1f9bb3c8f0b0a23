"""File writing that never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    On an exception the temporary file is removed and ``target`` keeps its old content.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp (and safetensors, which recreates the file) leave 0600: give the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, allow_nan: bool = False) -> Path:
    """Write ``data`` as indented JSON with a final newline, atomically: the one JSON writer of
    vlablocks (metadata, manifests, trainer state, results, reports).

    ``allow_nan=False`` (strict JSON, readable by any parser) raises ValueError on NaN or
    infinity; figures that may legitimately be NaN (a metric of an empty bin) pass ``True``.
    """
    return write_text(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


def replace_section(path: str | Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` lines of a
    markdown file (generated tables in docs), atomically. ValueError if the markers are missing."""
    path = Path(path)
    content = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {re.escape(name)}:begin -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(content):
        raise ValueError(f"{path} has no '<!-- {name}:begin -->' ... '<!-- {name}:end -->' section")
    with atomic_path(path) as tmp:
        tmp.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content), encoding="utf-8")
