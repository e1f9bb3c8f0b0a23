"""A dataset or a policy given as a local directory or as a Hugging Face Hub repository id
(``org/name``, as LeRobot names them), downloaded once into huggingface_hub's cache.

Nothing is downloaded for a path that exists; with ``HF_HUB_OFFLINE=1`` (or no network) a repository
already in the cache is used, and one that is not is a clear error. A policy repository is fetched
without its pickled files: only safetensors weights, JSON, YAML and tokenizer files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

#: ``org/name`` (letters, digits, ``-``, ``_``, ``.``), as the Hub spells repository ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: the files of a policy repository that are fetched (never ``*.bin`` / ``*.pt``: pickles).
POLICY_FILES = ("*.safetensors", "*.json", "*.yaml", "*.model", "*.txt", "tokenizer*/**")


def resolve_local(source: str | Path, repo_type: str, revision: str | None = None,
                  allow_patterns: Sequence[str] | None = None) -> Path:
    """The local directory of ``source``: itself when it exists, else the Hub repository of
    ``repo_type`` (``"dataset"`` or ``"model"``) it names, fetched (or found in the cache) at
    ``revision``, only the files matching ``allow_patterns`` when given.

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor a repository id, or the
            download failed (offline, unknown repository, no access), with what to do.
    """
    path = Path(source).expanduser()
    if path.exists() or not REPO_ID.fullmatch(str(source)):
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such {repo_type} directory (nor a Hub {repo_type} id such as "
                                    f"'{'lerobot/pusht' if repo_type == 'dataset' else 'lerobot/pi0'}')")
        return path
    logger.info("%s is not a local directory: fetching the Hub %s repository", source, repo_type)
    try:
        return Path(snapshot_download(repo_id=str(source), repo_type=repo_type, revision=revision,
                                      allow_patterns=None if allow_patterns is None else list(allow_patterns)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: no such local directory, and the Hub {repo_type} could not be fetched "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download it "
                                f"where there is a network (huggingface-cli download --repo-type {repo_type} "
                                f"{source}) or pass a local directory") from None


def resolve_dataset(source: str | Path, revision: str | None = None) -> Path:
    """A dataset directory, or a Hub dataset id (:func:`resolve_local`)."""
    return resolve_local(source, "dataset", revision)


def resolve_policy(source: str | Path, revision: str | None = None) -> Path:
    """A policy directory, or a Hub model id fetched without pickled files (:data:`POLICY_FILES`)."""
    return resolve_local(source, "model", revision, POLICY_FILES)
