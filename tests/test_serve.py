"""`vlablocks serve`: openpi's websocket protocol, checked with openpi's own client
(``openpi_client.websocket_client_policy.WebsocketClientPolicy``) against a server process."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from vlablocks.cli import main
from vlablocks.data.resize import PadResize
from vlablocks.recipes.builder import build, from_pretrained
from vlablocks.serve import ObservationMap, default_observation_map, load_observation_map, wire

websocket_client_policy = pytest.importorskip("openpi_client.websocket_client_policy")
msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")

HORIZON, MODEL_A, DATA_A, STATE = 4, 4, 3, 4
#: openpi's client calls websockets' sync connect() outside a `with` (deprecated in websockets 14+, still supported).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny_pi0 with 4 model action dims, 3 data dims and statistics (actions far from the noise)."""
    torch.manual_seed(0)
    vla = build("tiny_pi0", [f"policy.action_dim={MODEL_A}", f"policy.state_dim={STATE}"])
    vla.normalizer["action"].set_stats(mean=torch.tensor([2.0, -1.0, 0.5]), std=torch.tensor([3.0, 0.5, 2.0]))
    vla.normalizer["state"].set_stats(mean=torch.randn(STATE), std=torch.rand(STATE) + 0.5)
    return vla.save_pretrained(tmp_path_factory.mktemp("serve") / "ckpt")


def start_server(checkpoint: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """`python -m vlablocks.cli serve CHECKPOINT --port 0 ...` and the port its first line names."""
    proc = subprocess.Popen([sys.executable, "-m", "vlablocks.cli", "serve", str(checkpoint), "--port", "0", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    assert line.strip() == f"serving ckpt on ws://127.0.0.1:{int(line.rsplit(':', 1)[1])}"
    return proc, int(line.rsplit(":", 1)[1])


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, port = start_server(checkpoint, "--max-size", "1")
    yield port
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def policy(checkpoint):
    return from_pretrained(checkpoint).eval()


def observation(seed: int, size: tuple[int, int] = (32, 32)) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(STATE).astype(np.float32),
            "prompt": f"pick up block {seed}",
            "noise": rng.standard_normal((HORIZON, MODEL_A)).astype(np.float32)}


def expected_actions(policy, obs: dict) -> np.ndarray:
    """In-process predict_action on the batch the server should build (uint8 HWC -> float CHW, padded resize)."""
    image = torch.tensor(obs["observation/image"]).permute(2, 0, 1).float() / 255.0
    image = PadResize(*image.shape[-2:], 32).images(image)
    batch = {"images": image[None, None], "state": torch.tensor(obs["observation/state"])[None], "task": [obs["prompt"]]}
    return policy.predict_action(batch, noise=torch.tensor(obs["noise"])[None])[0].numpy()


def test_openpi_client_gets_metadata_and_the_in_process_actions(server, policy):
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server)
    meta = client.get_server_metadata()
    assert meta["horizon"] == HORIZON and meta["action_dim"] == DATA_A and meta["model_action_dim"] == MODEL_A
    assert meta["state_dim"] == STATE and meta["num_cameras"] == 1 and meta["image_size"] == 32
    assert meta["observation_map"] == {"images": ["observation/image"], "state": "observation/state",
                                       "prompt": "prompt", "noise": "noise", "previous": "previous_actions",
                                       "delay": "inference_delay"}  # no geometry keys: this policy reads none
    assert meta["geometry"] is False
    assert meta["policy"] == "ckpt" and meta["vlablocks_version"] and "pi0" in meta["description"]
    expected = expected_actions(policy, observation(1))
    for obs, want in ((observation(1), expected), (observation(2, size=(48, 40)), None)):  # one to resize + pad
        reply = client.infer(obs)
        assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (HORIZON, DATA_A)
        assert np.array_equal(reply["actions"], expected_actions(policy, obs) if want is None else want)
        assert reply["server_timing"]["infer_ms"] > 0
    chw = observation(1)
    chw["observation/image"] = chw["observation/image"].transpose(2, 0, 1).astype(np.float32) / 255.0
    assert np.array_equal(client.infer(chw)["actions"], expected)
    assert "prev_total_ms" in client.infer(observation(3))["server_timing"]
    with pytest.raises(RuntimeError, match=r"request\['observation/image'\] is missing"):
        client.infer({"prompt": "no image"})
    with pytest.raises(RuntimeError, match=r"request\['noise'\]: expected start noise \[4, 4\]"):
        client.infer({**observation(4), "noise": np.zeros((4, 3), np.float32)})
    assert np.array_equal(client.infer(observation(1))["actions"], expected)


def raw_client(port: int):
    ws = connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, open_timeout=10)
    assert msgpack_numpy.unpackb(ws.recv(timeout=10))["horizon"] == HORIZON
    return ws


def test_bad_clients_do_not_disturb_others(server, policy):
    expected = expected_actions(policy, observation(5))
    answers, stop = [], threading.Event()

    def steady_client() -> None:  # another robot, querying throughout
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server)
        while not stop.is_set() or len(answers) < 3:
            answers.append(np.array_equal(client.infer(observation(5))["actions"], expected))

    thread = threading.Thread(target=steady_client)
    thread.start()
    try:
        with raw_client(server) as ws:  # garbage, a text frame, a non-map: one-line str errors; still served
            for bad in (b"\xc1 not msgpack", "a text frame", wire.packb([1, 2]), wire.packb({"prompt": 3})):
                ws.send(bad)
                reply = ws.recv(timeout=30)
                assert isinstance(reply, str) and reply.startswith("vlablocks serve: bad request:") and "\n" not in reply
            ws.send(msgpack_numpy.packb(observation(5)))
            assert np.array_equal(msgpack_numpy.unpackb(ws.recv(timeout=30))["actions"], expected)
        with raw_client(server) as ws:  # over --max-size 1 (MiB): this connection is closed (1009)
            ws.send(b"\x00" * (2 * 2**20))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        for _ in range(3):  # sends a request and leaves before the answer
            ws = raw_client(server)
            ws.send(msgpack_numpy.packb(observation(6)))
            ws.close()
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and len(answers) >= 3 and all(answers)
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server)
    assert np.array_equal(client.infer(observation(5))["actions"], expected)


def test_sigterm_closes_connections_and_exits_0(checkpoint):
    proc, port = start_server(checkpoint)
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
    client.infer(observation(1))
    start = time.monotonic()
    assert stop_server(proc) == 0
    assert time.monotonic() - start < 10
    with pytest.raises(ConnectionClosed):
        client.infer(observation(1))


def test_compile_flag_starts_and_serves_metadata(checkpoint):
    proc, port = start_server(checkpoint, "--compile")
    try:
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
        assert client.get_server_metadata()["horizon"] == HORIZON
    finally:
        assert stop_server(proc) == 0


def test_fused_int8_server_answers_close_to_the_float32_policy(checkpoint, policy):
    """``--fuse --quantize int8``: the openpi client gets actions within the int8 error of the float32 ones."""
    proc, port = start_server(checkpoint, "--fuse", "--quantize", "int8")
    try:
        client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
        obs = observation(1)
        actions = client.infer(obs)["actions"]
        error = np.abs(actions - expected_actions(policy, obs)).max()
        assert 0 < error < 0.1 * 3.0, error  # quantised, not the float path; action std up to 3 here
    finally:
        assert stop_server(proc) == 0


def test_wire_format_is_openpi_msgpack_numpy():
    message = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3), "c": [np.bool_(True), "x"],
               "d": {"e": np.zeros((0, 2), np.uint8)}}
    assert wire.packb(message) == msgpack_numpy.packb(message)
    for unpacked in (wire.unpackb(msgpack_numpy.packb(message)), msgpack_numpy.unpackb(wire.packb(message))):
        assert np.array_equal(unpacked["a"], message["a"]) and unpacked["a"].dtype == np.float32
        assert unpacked["b"] == 3 and type(unpacked["b"]) is np.int64 and unpacked["d"]["e"].shape == (0, 2)
    forged = msgpack_numpy.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": (0,)}})
    with pytest.raises(ValueError, match="unsupported dtype"):
        wire.unpackb(forged)


def test_observation_map_defaults_and_yaml(tmp_path):
    assert default_observation_map(2).images == ("observation/image", "observation/wrist_image")
    assert default_observation_map(3).images[2] == "observation/image_2"
    path = tmp_path / "map.yaml"
    path.write_text("images: [observation/exterior_image_1_left, observation/wrist_image_left]\n"
                    "state: observation/joint_position\n")
    assert load_observation_map(path) == ObservationMap(
        images=("observation/exterior_image_1_left", "observation/wrist_image_left"),
        state="observation/joint_position")
    path.write_text("camera: x\n")
    with pytest.raises(ValueError, match=r"map.yaml: an observation map has the keys .*got \['camera'\]"):
        load_observation_map(path)
    path.write_text("images: [a, a]\n")
    with pytest.raises(ValueError, match="used twice"):
        load_observation_map(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlablocks serve: ") and "\n" not in err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
