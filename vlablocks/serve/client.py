"""A vlablocks client of a policy server: batches in, action chunks out, over openpi's protocol.

:class:`RemotePredictor` is a chunk predictor (``batch -> actions [1, H, A]``) for the evaluation
loop (:class:`~vlablocks.eval.policy.ChunkPolicy`): ``vlablocks eval RUN --server ws://HOST:PORT``
runs the rollouts here and the policy there. It sends each camera as ``float32 [3, H, W]`` (no
rounding to uint8), the state and the prompt under the server's observation map (from its
metadata), and the start noise drawn here from torch's global generator exactly as an in-process
``predict_action`` draws it; so a seeded evaluation through a server takes the same actions as
one in process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from websockets.sync.client import ClientConnection, connect

from vlablocks.policy import batch as keys
from vlablocks.serve import wire


class ServerError(RuntimeError):
    """The server refused a request or failed (its one-line reply)."""


class RemotePredictor:
    """``batch -> actions [1, H, A]`` from the policy server at ``url`` (``ws://HOST:PORT``).

    The connection opens on first use and is not pickled: each rollout worker opens its own.

    Attributes:
        metadata: what the server sent on connecting (horizon, action_dim, observation_map, ...).
    """

    def __init__(self, url: str, open_timeout: float = 30.0) -> None:
        self.url = url
        self.open_timeout = open_timeout
        self._connection: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self.metadata: dict[str, Any] = {}

    def connect(self) -> dict[str, Any]:
        """Open the connection (if not open) and return the server's metadata."""
        if self._connection is None:
            self._connection = self._stack.enter_context(  # a context manager, as websockets wants it used
                connect(self.url, compression=None, max_size=None, open_timeout=self.open_timeout))
            self.metadata = wire.unpackb(self._connection.recv())
        return self.metadata

    def request(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The request for a batch of one observation, under the server's observation map."""
        obs_map = self.connect()["observation_map"]
        if len(batch[keys.TASK]) != 1:
            raise ValueError(f"a server request holds one observation; got a batch of {len(batch[keys.TASK])}")
        request: dict[str, Any] = {obs_map["prompt"]: batch[keys.TASK][0]}
        images = batch.get(keys.IMAGES)
        if images is not None:
            for key, image in zip(obs_map["images"], images[0], strict=True):
                request[key] = image.detach().float().cpu().numpy()
        for name in ("state", *keys.GEOMETRY_KEYS):
            key = obs_map.get(name)
            value = batch.get(keys.STATE if name == "state" else name)
            if key is not None and value is not None:
                request[key] = value[0].detach().float().cpu().numpy()
        if obs_map.get("noise") is not None:
            request[obs_map["noise"]] = torch.randn(self.metadata["noise_shape"]).numpy()
        return request

    def __call__(self, batch: Mapping[str, Any], previous: torch.Tensor | None = None, delay: int = 0) -> torch.Tensor:
        """``actions [1, H, A]`` for ``batch``; with ``previous [1, P, A]`` (the queued raw actions)
        and ``delay``, the server samples the chunk with real-time chunking (a
        :class:`~vlablocks.eval.policy.RealTimeChunkPolicy` predictor)."""
        request = self.request(batch)
        if previous is not None:
            obs_map = self.metadata["observation_map"]
            request[obs_map["previous"]] = previous[0].detach().float().cpu().numpy()
            request[obs_map["delay"]] = int(delay)
        assert self._connection is not None
        self._connection.send(wire.packb(request))
        reply = self._connection.recv()
        if isinstance(reply, str):
            raise ServerError(f"{self.url}: {reply}")
        actions = wire.unpackb(reply)["actions"]
        return torch.from_numpy(np.array(actions, dtype=np.float32))[None]

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._stack.close()
        self._connection = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_connection": None, "_stack": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, "_stack": contextlib.ExitStack()})
