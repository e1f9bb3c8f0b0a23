"""Serve a policy over a websocket in openpi's protocol (``vlablocks serve``; docs/deployment.md).

:mod:`~vlablocks.serve.wire` (openpi's msgpack-numpy messages), :mod:`~vlablocks.serve.observation`
(request keys -> batch keys), :mod:`~vlablocks.serve.server` (the asyncio websocket server).
"""

from vlablocks.serve.observation import ObservationMap, RequestError, default_observation_map, load_observation_map
from vlablocks.serve.server import DEFAULT_MAX_SIZE, PolicyServer, load_for_serving

__all__ = ["DEFAULT_MAX_SIZE", "ObservationMap", "PolicyServer", "RequestError",
           "default_observation_map", "load_for_serving", "load_observation_map"]
