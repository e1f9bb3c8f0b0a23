"""Checkpoint integrity: a manifest of checksums beside the files, verified before loading.

Every directory vlablocks writes for loading later (``VLA.save_pretrained``, trainer
checkpoints) ends with ``manifest.json``, written last and atomically::

    {"format": "vlablocks.manifest/1",
     "files": {"model.safetensors": {"bytes": 1234, "header_sha256": "...",
                                     "tensors": {"head.proj.weight": "<sha256 of its bytes>", ...}},
               "recipe.yaml": {"bytes": 321, "sha256": "..."}}}

:func:`verify_manifest` checks sizes first (a truncated file is named with both sizes), then
the checksums, one tensor at a time, so a flipped byte is reported with the tensor it hit.
:func:`read_safetensors` is the only way vlablocks reads tensors from a file: safetensors,
never pickle, and a file it cannot parse is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vlablocks.io.atomic import write_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "vlablocks.manifest/1"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or not in a format vlablocks reads."""


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _safetensors_header(path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """``(header length, header)`` of a safetensors file (CheckpointError if unreadable)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise CheckpointError(f"{path}: the header claims {length} bytes but the file has {size} (truncated?)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a mapping")
    return length, header


def _safetensors_digests(path: Path, size: int) -> tuple[str, dict[str, str]]:
    """``(sha256 of the header, {tensor name: sha256 of its bytes})`` of a safetensors file, in one read."""
    length, header = _safetensors_header(path, size)
    start = 8 + length
    digests: dict[str, str] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            header_sha = hashlib.sha256(view[:start]).hexdigest()
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = (start + offset for offset in info["data_offsets"])
                if end > size:
                    raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} but the file has {size} (truncated?)")
                digests[name] = hashlib.sha256(view[begin:end]).hexdigest()
        finally:
            view.release()
    return header_sha, digests


def _describe(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if path.suffix != ".safetensors":
        return {"bytes": size, "sha256": _sha256_file(path)}
    header_sha, digests = _safetensors_digests(path, size)
    return {"bytes": size, "header_sha256": header_sha, "tensors": digests}


def write_manifest(directory: str | Path) -> Path:
    """Checksum every file under ``directory`` (except hidden ones and the manifest) into
    ``directory/manifest.json``, atomically; returns its path."""
    directory = Path(directory)
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    manifest = {"format": MANIFEST_FORMAT, "files": {p.relative_to(directory).as_posix(): _describe(p) for p in files}}
    path = directory / MANIFEST_FILE
    return write_json(path, manifest)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory`` (``None`` if it has none; CheckpointError if unreadable)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: expected a {MANIFEST_FORMAT!r} manifest with a 'files' mapping")
    return manifest


def verify_manifest(directory: str | Path, required: tuple[str, ...] = (), verify: bool = True) -> bool:
    """Check every file listed in ``directory``'s manifest: present, of the recorded size and
    checksums. ``verify=False`` checks nothing (and says so); returns whether the files were checked.

    Args:
        required: files that must be listed (a manifest that omits one is an error).
        verify: ``False`` loads a directory without a manifest (or skips the checks) at the
            caller's explicit request.

    Raises:
        CheckpointError: naming the file (and the tensor) that is missing, truncated or corrupted,
            or saying that there is no manifest to check against (unless ``verify=False``).
    """
    directory = Path(directory)
    if not verify:
        logger.warning("%s: loading WITHOUT verifying its files against %s (verify=False)", directory, MANIFEST_FILE)
        return False
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(
            f"{directory} has no {MANIFEST_FILE}, so its files cannot be checked for corruption; if you trust it, load "
            "it unverified: verify=False (CLI: --no-verify)"
        )
    files = manifest["files"]
    for name in required:
        if name not in files:
            raise CheckpointError(f"{directory / MANIFEST_FILE} does not list {name!r}")
    root = directory.resolve()
    for name, entry in files.items():
        path = directory / name
        if not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{directory / MANIFEST_FILE} lists {name!r}, a path outside {directory}")
        if not isinstance(entry, dict) or "bytes" not in entry or not ("sha256" in entry or "tensors" in entry):
            raise CheckpointError(f"{directory / MANIFEST_FILE}: the entry of {name!r} lacks 'bytes' and a checksum")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest records {entry['bytes']} (truncated or replaced)")
        if "tensors" not in entry:
            if _sha256_file(path) != entry["sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
            continue
        expected: dict[str, str] = entry["tensors"]
        header_sha, digests = _safetensors_digests(path, size)
        bad = sorted(n for n in expected.keys() | digests.keys() if expected.get(n) != digests.get(n))
        if bad:
            shown = ", ".join(repr(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointError(f"{path}: checksum mismatch in tensor(s) {shown} (the file is corrupted)")
        if header_sha != entry["header_sha256"]:
            raise CheckpointError(f"{path}: the safetensors header differs from the manifest (dtype / shape changed)")
    return True


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CheckpointError naming the file if it cannot be read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size
        length, header = _safetensors_header(path, size)  # raises the precise error for a broken header
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        expected = 8 + length + max(ends, default=0)
        if expected != size:
            raise CheckpointError(f"{path}: {size} bytes, its header describes {expected} (truncated?)") from None
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def load_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)`` (strict), a mismatch reported as a CheckpointError that
    names ``source`` and the missing, unexpected or mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
                    for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    problems = [f"{label}: {', '.join(items[:5])}{f' and {len(items) - 5} more' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state)


__all__ = ["MANIFEST_FILE", "CheckpointError", "load_weights", "read_manifest", "read_safetensors", "verify_manifest", "write_manifest"]
