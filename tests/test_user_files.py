"""A user's files are sacred (issue 19): a second training run, a bad data command, ``--overwrite``
of something that is not a dataset and a forged ``checkpoints/latest`` leave earlier files
byte-identical, and the errors name the path."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import write_toy_dataset

from vlablocks.cli import main
from vlablocks.data import DatasetWriter, LeRobotDataset
from vlablocks.data.format import INFO_FILE
from vlablocks.train.checkpoint import LatestPointerError, latest_checkpoint
from vlablocks.train.workflow import RunExistsError, train_from_recipe

TASK = "button-press-topdown-v3"
TRAIN = ["tiny_pi0", "policy.action_dim=4", "policy.state_dim=4", "train.batch_size=2", "train.warmup_steps=0"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative paths), and each directory (as ``dir``)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }




@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy")


def train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", *TRAIN, "--data", str(data), "--out", str(run), "--steps", "1", *extra])


def refused(capsys, argv: list[str], *fragments: str) -> None:
    """``vlablocks ARGV`` fails with one line on stderr holding every fragment."""
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(fragment in err for fragment in fragments), err


def test_a_second_run_is_refused_and_move_aside_keeps_the_first(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()  # an empty directory is fine to train into
    assert train(toy_data, run) == 0
    before = tree_hashes(run)
    assert {"metrics.csv", "data.json", "checkpoints/step_0000001/model.safetensors"} <= set(before)
    common = ["train", *TRAIN, "--data", str(toy_data), "--out", str(run), "--steps", "2", "train.seed=3"]
    refused(capsys, common, f"{run} already holds a run", "--resume", "--move-aside")
    assert tree_hashes(run) == before
    with pytest.raises(RunExistsError, match=rf"{run} already holds a run; pass --resume .* --move-aside"):
        train_from_recipe("tiny_pi0", toy_data, out=run, overrides=TRAIN[1:], steps=2)
    refused(capsys, [*common, "--resume", "--move-aside"], "pass one of them")
    assert tree_hashes(run) == before

    assert train(toy_data, run, "train.seed=3", "--move-aside") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == before  # the first run, moved whole
    assert (run / "checkpoints" / "step_0000001").is_dir()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # header + the new run's one step


def test_resume_with_nothing_to_resume_is_one_clear_error(toy_data, tmp_path, capsys):
    run = tmp_path / "empty"
    refused(capsys, ["train", *TRAIN, "--data", str(toy_data), "--out", str(run), "--resume"],
            f"--resume: {run} has no checkpoint to resume from")
    assert not run.exists()  # nothing written


def test_a_latest_that_leaves_the_run_is_refused(toy_data, tmp_path, capsys):
    foreign, run = tmp_path / "foreign", tmp_path / "run"
    assert train(toy_data, foreign) == 0
    assert train(toy_data, run) == 0
    pointer = run / "checkpoints" / "latest"
    for name in [str(foreign / "checkpoints" / "step_0000001"), "../../foreign/checkpoints/step_0000001",
                 "step_0000001/../../../foreign/checkpoints/step_0000001", "step_0000009", "model.safetensors"]:
        pointer.write_text(name + "\n")
        before = {**tree_hashes(run), **{f"foreign/{k}": v for k, v in tree_hashes(foreign).items()}}
        refused(capsys, ["train", *TRAIN, "--data", str(toy_data), "--out", str(run), "--steps", "2", "--resume"],
                f"{pointer} says '{name}'", "expected")
        with pytest.raises(LatestPointerError, match=re.escape(f"{pointer} says '{name}'")):
            latest_checkpoint(run)
        assert {**tree_hashes(run), **{f"foreign/{k}": v for k, v in tree_hashes(foreign).items()}} == before
    pointer.write_text("step_0000001\n")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_0000001"


def test_overwrite_refuses_what_is_not_a_dataset(tmp_path):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "precious.bin").write_bytes(b"\x00\x01 do not delete")
    (mine / "notes.txt").write_text("my notes")
    before = tree_hashes(mine)
    with pytest.raises(FileExistsError, match=rf"{mine} is not a dataset written by vlablocks.*nothing in it was touched"):
        write_toy_dataset(mine, overwrite=True)
    with pytest.raises(FileExistsError, match=rf"{mine} exists and is not empty"):
        write_toy_dataset(mine)
    assert tree_hashes(mine) == before
    # a dataset with a file of the user's in it is not one the writer wrote either
    data = write_toy_dataset(tmp_path / "data")
    (data / "README.md").write_text("mine")
    before = tree_hashes(data)
    with pytest.raises(FileExistsError, match=r"is not a dataset written by vlablocks"):
        write_toy_dataset(data, overwrite=True)
    assert tree_hashes(data) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_overwrite_swaps_the_new_dataset_in_only_when_complete(tmp_path):
    root = write_toy_dataset(tmp_path / "d")
    before = tree_hashes(root)
    writer = DatasetWriter(root, fps=10, cameras=["corner"], state_dim=4, action_dim=4, overwrite=True)
    with pytest.raises(ValueError, match="must have exactly the keys"):
        writer.add_episode({"observation.state": np.zeros((2, 4), np.float32)}, "t")
    assert tree_hashes(root) == before  # the old dataset is untouched while the new one is written
    writer.abort()
    assert tree_hashes(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]

    write_toy_dataset(root, lengths=(3,), seed=1, overwrite=True)
    assert json.loads((root / INFO_FILE).read_text())["total_episodes"] == 1
    assert len(LeRobotDataset(root, horizon=1)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the old one and the staging dir are gone


@pytest.mark.parametrize("bad", [["--image-size", "-5"], ["--camera", "bogus"], ["--episodes", "0"], ["--workers", "0"],
                                 ["--tasks", "no-such-task-v3"]])
def test_data_validates_every_argument_before_touching_the_output(tmp_path, bad, capsys):
    root = write_toy_dataset(tmp_path / "d")
    before = tree_hashes(root)
    args = {"--tasks": TASK, "--episodes": "1", "--image-size": "32", "--workers": "1", bad[0]: bad[1]}
    refused(capsys, ["data", "metaworld", *[x for kv in args.items() for x in kv], "--out", str(root), "--overwrite"],
            bad[1])
    assert tree_hashes(root) == before


def test_data_overwrite_refuses_a_directory_that_is_not_a_dataset(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "results.csv").write_text("1,2,3\n")
    before = tree_hashes(mine)
    refused(capsys, ["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--image-size", "32", "--workers", "1",
                     "--out", str(mine), "--overwrite"], f"{mine} is not a dataset")
    assert tree_hashes(mine) == before
