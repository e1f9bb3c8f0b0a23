"""Checkpoint safety: manifests and checksums, corrupted / truncated files, a writer killed
mid-write, SIGTERM during training, and nothing but safetensors / JSON / YAML being read."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import write_toy_dataset
import torch
from ddp_worker import make_trainer
from safetensors import safe_open
from safetensors.torch import load_file
from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import RecipeError

from vlablocks.io.manifest import CheckpointError, read_manifest, verify_manifest, write_manifest
from vlablocks.policy.checks import random_batch
from vlablocks.cli import EXIT_TERMINATED, main
from vlablocks.train.checkpoint import latest_checkpoint, recover_checkpoints
from vlablocks.train.config import TrainConfig
from vlablocks.recipes.builder import from_pretrained

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return build("tiny_pi0").save_pretrained(tmp_path_factory.mktemp("ckpt") / "policy")


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    target.mkdir()
    for path in saved.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data in a safetensors file."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    begin, end = header[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


# ------------------------------------------------------------------------------------ manifests


def test_every_checkpoint_file_gets_the_usual_permissions(tmp_path):
    """safetensors recreates its file 0600; a checkpoint's files all get ``0666 & ~umask`` (0644)."""
    old = os.umask(0o022)
    try:
        trainer = make_trainer(tmp_path, TrainConfig(steps=1, batch_size=2, save_every=1))
        trainer.train()
        policy = build("tiny_pi0").save_pretrained(tmp_path / "policy")
    finally:
        os.umask(old)
    files = [p for d in (latest_checkpoint(tmp_path), policy) for p in d.iterdir()]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".yaml"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_manifest_lists_every_file_with_per_tensor_checksums(saved):
    manifest = read_manifest(saved)
    assert set(manifest["files"]) == {"model.safetensors", "recipe.yaml"}
    recipe = manifest["files"]["recipe.yaml"]
    assert recipe == {"bytes": (saved / "recipe.yaml").stat().st_size,
                      "sha256": hashlib.sha256((saved / "recipe.yaml").read_bytes()).hexdigest()}
    weights = manifest["files"]["model.safetensors"]
    with safe_open(saved / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert set(weights["tensors"]) == names
    name = sorted(names)[0]
    begin, end = tensor_span(saved / "model.safetensors", name)
    assert weights["tensors"][name] == hashlib.sha256((saved / "model.safetensors").read_bytes()[begin:end]).hexdigest()
    assert verify_manifest(saved) is True


def test_a_flipped_byte_is_reported_with_the_tensor_it_hit(saved, tmp_path):
    policy = copy_of(saved, tmp_path)
    weights = policy / "model.safetensors"
    name = "head.denoiser.suffix_encoder.action_out_proj.weight"
    begin, _ = tensor_span(weights, name)
    data = bytearray(weights.read_bytes())
    data[begin + 5] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: checksum mismatch in tensor\(s\) '{name}' \(the file is corrupted\)"):
        from_pretrained(policy)


def test_a_truncated_file_is_reported_with_both_sizes(saved, tmp_path):
    policy = copy_of(saved, tmp_path)
    weights = policy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {size // 2} bytes, the manifest records {size} \(truncated"):
        from_pretrained(policy)
    # without a manifest (loaded unverified) the safetensors reader still refuses it, naming the file
    (policy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        from_pretrained(policy, verify=False)


def test_an_edited_recipe_and_a_missing_file_are_detected(saved, tmp_path):
    policy = copy_of(saved, tmp_path)
    text = (policy / "recipe.yaml").read_text()
    (policy / "recipe.yaml").write_text(text.replace("horizon: 4", "horizon: 5"))
    assert text != (policy / "recipe.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"recipe\.yaml: (checksum mismatch|\d+ bytes, the manifest)"):
        from_pretrained(policy)
    manifest = json.loads((policy / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"bytes": 3, "sha256": "0" * 64}
    (policy / "recipe.yaml").write_text(text)
    (policy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing \(listed in manifest\.json\)"):
        from_pretrained(policy)
    (policy / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is not valid JSON"):
        from_pretrained(policy)


def test_without_a_manifest_loading_needs_an_explicit_opt_out(saved, tmp_path, caplog):
    policy = copy_of(saved, tmp_path)
    (policy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no manifest.json, so its files cannot be checked for corruption; .*"
                                              r"verify=False \(CLI: --no-verify\)"):
        from_pretrained(policy)
    with caplog.at_level(logging.WARNING, logger="vlablocks.io.manifest"):
        loaded = from_pretrained(policy, verify=False)
    assert "loading WITHOUT verifying its files against manifest.json (verify=False)" in caplog.text
    reference = from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda files: files["model.safetensors"].pop("bytes"), r"the entry of 'model.safetensors' lacks 'bytes' and a checksum"),
    (lambda files: files.__setitem__("../outside.json", {"bytes": 1, "sha256": "0"}), r"lists '../outside.json', a path outside"),
])
def test_a_malformed_manifest_is_named(saved, tmp_path, edit, message):
    policy = copy_of(saved, tmp_path)
    manifest = json.loads((policy / "manifest.json").read_text())
    edit(manifest["files"])
    (policy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(policy)


def test_weights_that_do_not_fit_the_recipe_are_named(saved, tmp_path):
    policy = copy_of(saved, tmp_path)
    text = (policy / "recipe.yaml").read_text()
    assert "action_dim: 6" in text
    (policy / "recipe.yaml").write_text(text.replace("action_dim: 6", "action_dim: 7"))
    write_manifest(policy)  # a consistent manifest: the mismatch is between recipe and weights
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit the model: .*shape mismatch: "
                                              r"head\.denoiser\.suffix_encoder\.action_in_proj\.weight \[32, 6\] \(expected \[32, 7\]\)"):
        from_pretrained(policy)


def test_a_recipe_file_with_a_python_tag_constructs_nothing(saved, tmp_path):
    policy = copy_of(saved, tmp_path)
    marker = tmp_path / "pwned"
    text = (policy / "recipe.yaml").read_text()
    (policy / "recipe.yaml").write_text(
        text + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    (policy / "manifest.json").unlink()
    with pytest.raises(RecipeError, match=r"extra: YAML tag '!!python/object/apply:os.system' is not allowed"):
        from_pretrained(policy, verify=False)
    assert not marker.exists()


def test_the_package_never_unpickles():
    """No ``torch.load``, ``pickle.load(s)``, ``numpy.load(allow_pickle=True)``, unsafe ``yaml.load``
    or ``pandas.read_pickle`` anywhere in the installed packages' source."""
    offences = []
    for path in sorted((ROOT / "vlablocks").rglob("*.py")):
        if path.is_symlink():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            call = f"{owner}.{node.func.attr}"
            keywords = {k.arg: k.value for k in node.keywords}
            unsafe_yaml = call == "yaml.load" and not (
                isinstance(keywords.get("Loader"), ast.Name) and keywords["Loader"].id in {"SafeLoader", "_UniqueKeyLoader"})
            pickled_numpy = call in {"np.load", "numpy.load"} and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                and keywords["allow_pickle"].value
            if call in {"torch.load", "pickle.load", "pickle.loads", "pd.read_pickle", "pandas.read_pickle"} \
                    or unsafe_yaml or pickled_numpy:
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno} {call}")
    assert not offences, offences


# ------------------------------------------------------------------------------------ trainer checkpoints


def test_a_corrupted_trainer_state_stops_resume(tmp_path):
    config = TrainConfig(steps=2, batch_size=2, log_every=1, save_every=None)
    make_trainer(tmp_path / "run", config).train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    manifest = read_manifest(checkpoint)
    assert set(manifest["files"]) == {"model.safetensors", "recipe.yaml", "trainer_state.safetensors", "trainer_state.json"}
    state = checkpoint / "trainer_state.safetensors"
    name = next(n for n in manifest["files"]["trainer_state.safetensors"]["tensors"] if n.startswith("optimizer."))
    begin, _ = tensor_span(state, name)
    data = bytearray(state.read_bytes())
    data[begin] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"trainer_state\.safetensors: checksum mismatch in tensor\(s\) '{re_escape(name)}'"):
        make_trainer(tmp_path / "again", config).resume(checkpoint)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_stale_write_directories_are_recovered(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_0000004.abc.tmp").mkdir(parents=True)
    (root / ".step_0000004.abc.tmp" / "model.safetensors").write_bytes(b"half")
    (root / ".step_0000002.old-123").mkdir()
    (root / ".step_0000002.old-123" / "model.safetensors").write_bytes(b"whole")
    (root / "step_0000003").mkdir()
    (root / ".step_0000003.old-99").mkdir()
    recover_checkpoints(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000003"]
    assert (root / "step_0000002" / "model.safetensors").read_bytes() == b"whole"


KILL_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import torch
    import vlablocks.train.checkpoint as checkpoint_module
    from ddp_worker import make_trainer
    from vlablocks.train.config import TrainConfig

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    trainer = make_trainer(out, TrainConfig(steps=4, batch_size=2, log_every=1, save_every=2, ema_decay=0.9))
    real_save = checkpoint_module.save_file

    def save_then_hang(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if trainer.step == 4:  # the second checkpoint: leave half a file and wait to be killed
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            (out / "writing").touch()
            time.sleep(600)

    checkpoint_module.save_file = save_then_hang
    trainer.train()
""")


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", KILL_WORKER, str(out), str(TESTS)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "writing").exists():
            assert child.poll() is None, f"the worker exited early with {child.returncode}"
            assert time.monotonic() < deadline, "the worker never reached the second checkpoint"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(60)
    root = out / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".step_0000004.")]
    assert len(partial) == 1 and any(p.stat().st_size for p in partial[0].iterdir()), "the kill came mid-write"
    assert latest_checkpoint(out) == root / "step_0000002"
    assert not (root / "step_0000004").exists()
    assert verify_manifest(root / "step_0000002") is True
    policy = from_pretrained(root / "step_0000002")
    assert torch.isfinite(policy.predict_action(random_batch(policy, 2))).all()

    config = TrainConfig(steps=4, batch_size=2, log_every=1, save_every=2, ema_decay=0.9)
    resumed = make_trainer(out, config)
    resumed.resume(latest_checkpoint(out))
    resumed.train()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    assert verify_manifest(root / "step_0000004") is True


# ------------------------------------------------------------------------------------ SIGTERM


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """A 3-episode LeRobot dataset that fits ``tiny_pi0`` with 4-dim state and actions."""
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy", lengths=(9, 12, 10))


def test_sigterm_writes_a_checkpoint_and_resume_loses_no_step(demo_data, tmp_path):
    common = ["tiny_pi0", "--data", str(demo_data), "policy.action_dim=4", "policy.state_dim=4", "train.batch_size=4",
              "train.schedule=constant", "train.log_every=1", "train.save_every=100000", "train.ema_decay=0.9"]
    run = tmp_path / "run"
    # the same thread count as the in-process runs below: bitwise equality needs the same reductions
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([sys.executable, "-m", "vlablocks.cli", "train", *common, "--out", str(run), "--steps", "100000"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.csv").is_file() or len((run / "metrics.csv").read_text().splitlines()) < 4:
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never logged 3 steps"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == EXIT_TERMINATED, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stdout and "--resume" in stdout
    checkpoint = latest_checkpoint(run)
    step = int(checkpoint.name.removeprefix("step_"))
    assert 3 <= step < 100000
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    assert meta["step"] == step
    optimizer_steps = {v.item() for k, v in load_file(checkpoint / "trainer_state.safetensors").items() if k.endswith(".step")}
    assert optimizer_steps == {float(step)}, "every optimizer step taken is in the checkpoint"
    assert int((run / "metrics.csv").read_text().splitlines()[-1].split(",")[0]) == step

    assert main(["train", *common, "--out", str(run), "--steps", str(step + 2), "--resume"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "straight"), "--steps", str(step + 2)]) == 0
    final = f"checkpoints/step_{step + 2:07d}"
    for name in ("model.safetensors", "ema.safetensors"):
        resumed, straight = load_file(run / final / name), load_file(tmp_path / "straight" / final / name)
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in resumed), name


def test_a_trainer_outside_the_main_thread_trains_without_a_handler(tmp_path):
    """Signal handlers can only be installed in the main thread: elsewhere training just runs."""
    import threading

    trainer = make_trainer(tmp_path, TrainConfig(steps=1, batch_size=2, log_every=1, save_every=None))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            trainer.train()
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not failures and trainer.step == 1 and not trainer.interrupted


def test_the_previous_sigterm_handler_is_restored(tmp_path):
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        make_trainer(tmp_path, TrainConfig(steps=1, batch_size=2, log_every=1, save_every=None)).train()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
