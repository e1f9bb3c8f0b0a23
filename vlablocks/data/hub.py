"""A dataset given as a local directory or as a Hugging Face Hub repository id (``org/name``, as
LeRobot names its datasets), downloaded once into huggingface_hub's cache.

Nothing is downloaded for a path that exists; with ``HF_HUB_OFFLINE=1`` (or no network) a repository
already in the cache is used, and one that is not is a clear error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

#: ``org/name`` (letters, digits, ``-``, ``_``, ``.``), as the Hub spells repository ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dataset(source: str | Path, revision: str | None = None) -> Path:
    """The local directory of ``source``: itself when it exists, else the Hub dataset repository
    it names, downloaded (or found in the cache) at ``revision`` (a branch, tag or commit).

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor a repository id, or the
            download failed (offline, unknown repository, no access), with what to do.
    """
    path = Path(source).expanduser()
    if path.exists() or not REPO_ID.fullmatch(str(source)):
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such dataset directory (nor a Hub dataset id such as 'lerobot/pusht')")
        return path
    logger.info("%s is not a local directory: fetching the Hub dataset repository", source)
    try:
        return Path(snapshot_download(repo_id=str(source), repo_type="dataset", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: no such local directory, and the Hub dataset could not be fetched "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download it "
                                "where there is a network (huggingface-cli download --repo-type dataset "
                                f"{source}) or pass a local directory") from None
