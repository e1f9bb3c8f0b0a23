"""A websocket policy server speaking openpi's protocol (``vlablocks serve``).

::

    client                                   server
      ── connect ─────────────────────────────>
      <──────────── metadata (msgpack map) ────   once per connection
      ── observation (msgpack map) ───────────>   request keys: the observation map
      <──── {"actions": [H, A] float32, ───────   un-normalised, the data's A dims
             "server_timing": {...}} ──────────
      ... (or a str: the request was refused; the connection stays open)

Messages use openpi's msgpack-numpy encoding (:mod:`vlablocks.serve.wire`), so
``openpi_client.websocket_client_policy.WebsocketClientPolicy`` is a client. One policy serves
every connection: inference runs in a worker thread behind a lock, the event loop keeps
reading, answering and accepting meanwhile. A refused request (bad bytes, a missing key, a wrong
shape) is answered with a one-line str, as openpi answers errors, and that connection stays
open; a message over ``max_size`` closes its connection (code 1009) only. ``GET /healthz``
answers ``OK``. SIGTERM / SIGINT close every connection and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vlablocks import __version__
from vlablocks.eval.policy import GuidedVLAPredictor
from vlablocks.heads.rtc import DEFAULT_BETA
from vlablocks.policy.batch import BatchError, to_device
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import from_pretrained
from vlablocks.serve import wire
from vlablocks.serve.observation import ObservationMap, rtc_inputs, to_batch
from vlablocks.train.checkpoint import EMA_FILE, latest_checkpoint, load_ema_policy
from vlablocks.train.workflow import DATA_INFO_FILE

logger = logging.getLogger(__name__)

#: largest message a client may send (bytes); a larger one closes its connection.
DEFAULT_MAX_SIZE = 64 * 2**20
#: errors of a request, answered with one line (msgpack's decode errors are ValueErrors).
REQUEST_ERRORS = (BatchError, ValueError, TypeError, KeyError, OverflowError)


def _one_line(err: BaseException) -> str:
    """The error in one line; its type first unless it is a BatchError (whose messages name the key)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, BatchError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def server_metadata(vla: VLA, obs_map: ObservationMap, name: str) -> dict[str, Any]:
    """What a client receives on connecting: the policy, its chunk and the inputs it reads."""
    state = vla.normalizer["state"].width if "state" in vla.normalizer else None
    return {
        "policy": name,
        "description": str(vla.recipe.get("description", "")).strip(),
        "horizon": vla.config.horizon,
        "action_dim": vla.normalizer["action"].width,
        "model_action_dim": vla.config.action_dim,
        "state_dim": state,
        "num_cameras": len(obs_map.images) if vla.vision is not None else 0,
        "image_size": None if vla.vision is None else vla.vision.image_size,
        "resize_images": vla.config.resize_images,
        "geometry": vla.geometry is not None,  # reads the map's depth / intrinsics (/ cam_to_world) keys
        "observation_map": obs_map.as_dict(),
        "noise_shape": [vla.config.horizon, vla.config.action_dim],
        "vlablocks_version": __version__,
    }


class PolicyServer:
    """Serves ``vla`` (in eval mode, on its device) to any number of websocket connections.

    Args:
        vla: the policy; its parameters' device is where batches go.
        obs_map: request keys -> batch keys (:class:`~vlablocks.serve.observation.ObservationMap`).
        name: the policy's name in the metadata and the log.
        max_size: largest accepted message in bytes (``None``: no limit).
        rtc_beta: the guidance-weight clip of real-time-chunking requests (a request carrying
            the queued actions, :func:`~vlablocks.serve.observation.rtc_inputs`).
    """

    def __init__(self, vla: VLA, obs_map: ObservationMap, name: str, max_size: int | None = DEFAULT_MAX_SIZE,
                 rtc_beta: float = DEFAULT_BETA) -> None:
        self.vla = vla.eval()
        self.obs_map = obs_map if vla.geometry is not None else obs_map.without_geometry()
        self.name = name
        self.max_size = max_size
        self.device = next(vla.parameters()).device
        self.metadata = server_metadata(vla, self.obs_map, name)
        self._packed_metadata = wire.packb(self.metadata)
        self._lock = threading.Lock()
        self.guided = GuidedVLAPredictor(self.vla, beta=rtc_beta)

    def infer(self, request: Any) -> dict[str, Any]:
        """One observation -> ``{"actions": float32 [H, A], "server_timing": {infer_ms, wait_ms}}``.

        Raises:
            BatchError: the request does not fit the map or the policy (one line).
        """
        batch, noise = to_batch(request, self.obs_map, self.vla)
        rtc = rtc_inputs(request, self.obs_map, self.vla)
        batch = to_device(batch, self.device)
        noise = None if noise is None else noise.to(self.device)
        arrived = time.perf_counter()
        with self._lock:
            start = time.perf_counter()
            if rtc is None:
                actions = self.vla.predict_action(batch, noise=noise)
            else:  # real-time chunking: the new chunk continues the queued actions (guided sampling)
                actions = self.guided(batch, previous=rtc[0].to(self.device), delay=rtc[1], noise=noise)
            actions = actions[0].float().cpu().numpy()
        done = time.perf_counter()
        return {"actions": actions,
                "server_timing": {"infer_ms": (done - start) * 1e3, "wait_ms": (start - arrived) * 1e3}}

    def respond(self, message: bytes | str, previous_ms: float | None = None) -> bytes | str:
        """A message -> the packed reply, or a one-line str saying why the request was refused.
        ``previous_ms``: the connection's previous round, reported as openpi's ``prev_total_ms``."""
        try:
            if isinstance(message, str):
                raise TypeError("expected a binary msgpack message; got a text frame")
            reply = self.infer(wire.unpackb(message))
        except REQUEST_ERRORS as err:
            logger.info("refused a request: %s", _one_line(err))
            return f"vlablocks serve: bad request: {_one_line(err)}"
        except Exception as err:  # a bug: logged with its traceback; the server keeps serving
            logger.exception("inference failed")
            return f"vlablocks serve: internal error: {_one_line(err)}"
        if previous_ms is not None:
            reply["server_timing"]["prev_total_ms"] = previous_ms
        return wire.packb(reply)

    async def handle(self, websocket: ServerConnection) -> None:
        """One connection: metadata, then a reply to each message until the client leaves."""
        logger.info("connection from %s", websocket.remote_address)
        previous: float | None = None
        try:
            await websocket.send(self._packed_metadata)
            while True:
                message = await websocket.recv()
                start = time.perf_counter()
                reply = await asyncio.to_thread(self.respond, message, previous)
                await websocket.send(reply)
                previous = (time.perf_counter() - start) * 1e3
        except ConnectionClosed as closed:
            logger.info("connection from %s closed (%s)", websocket.remote_address, closed)

    async def serve(self, host: str, port: int, ready: Callable[[str, int], None] | None = None,
                    stop: asyncio.Event | None = None, handle_signals: bool = True) -> None:
        """Listen on ``host:port`` (0: a free port) until ``stop`` is set or, with
        ``handle_signals``, SIGTERM / SIGINT arrive; then close every connection and return.
        ``ready(host, port)`` is called once listening, with the real port."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            async with serve(self.handle, host, port, max_size=self.max_size, compression=None,
                             process_request=_health_check) as server:
                real_port = server.sockets[0].getsockname()[1]
                logger.info("serving %s on ws://%s:%d", self.name, host, real_port)
                if ready is not None:
                    ready(host, real_port)
                await stop.wait()
                logger.info("stopping: closing %d connections", len(server.connections))
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def _health_check(connection: ServerConnection, request: Any) -> Any:
    """``GET /healthz`` -> 200 OK (openpi's health check); any other path opens a websocket."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def policy_name(checkpoint: Path) -> str:
    """``run/step_0002000`` style name of a checkpoint directory (its run's name when inside one)."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":
        return f"{checkpoint.parent.parent.name}/{checkpoint.name}"
    return checkpoint.name


def load_for_serving(path: str | Path, device: str = "cpu") -> tuple[VLA, Path]:
    """The policy of a checkpoint directory or of a run (its latest checkpoint), EMA weights when
    the checkpoint has them, in eval mode on ``device``; and the checkpoint directory."""
    path = Path(path)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    checkpoint = latest_checkpoint(path) or path
    vla = load_ema_policy(checkpoint) if (checkpoint / EMA_FILE).is_file() else from_pretrained(checkpoint)
    return vla.to(device).eval(), checkpoint


def trained_cameras(checkpoint: Path) -> int | None:
    """How many cameras the policy trained with: its run's ``data.json`` (``None``: not in a run)."""
    info = checkpoint.resolve().parent.parent / DATA_INFO_FILE
    if checkpoint.resolve().parent.name != "checkpoints" or not info.is_file():
        return None
    cameras = json.loads(info.read_text(encoding="utf-8")).get("cameras")
    return len(cameras) if isinstance(cameras, list) and cameras else None


@contextlib.contextmanager
def serving_in_background(server: PolicyServer, host: str = "127.0.0.1", port: int = 0,
                          timeout: float = 60.0) -> Iterator[str]:
    """Run ``server`` on its own event loop in a background thread of this process (the same
    torch settings as in-process inference); yields its URL, ``ws://HOST:PORT``, and stops it on exit."""
    ready, state = threading.Event(), {}

    async def main() -> None:
        state["stop"], state["loop"] = asyncio.Event(), asyncio.get_running_loop()
        await server.serve(host, port, ready=lambda _, real: (state.update(port=real), ready.set()),
                           stop=state["stop"], handle_signals=False)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="vlablocks-serve")
    thread.start()
    if not ready.wait(timeout):
        raise RuntimeError(f"the policy server did not start listening within {timeout:g} s")
    try:
        yield f"ws://{host}:{state['port']}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout)
