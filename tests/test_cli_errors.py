"""Every CLI mistake is answered with one line on stderr naming what is wrong, exit status 2 for a
usage error and 1 for a failure, and leaves every existing file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import write_toy_dataset

from vlablocks import cli
from vlablocks.cli import describe_error, main, one_line
from vlablocks.recipes.loader import RecipeError, load_recipe, parse_override_value
from vlablocks.train.config import train_config

USAGE, FAILURE = 2, 1
SHOW = ["show", "tiny_pi0", "--no-tree"]
MW = ["data", "metaworld", "--tasks", "reach-v3", "--out", "new_data"]


def _write_dataset(root: Path) -> None:
    """Two 6-step episodes of one 32 px camera, state and action [4] (tiny_pi0 with dims 4 trains on it)."""
    write_toy_dataset(root, lengths=(6, 6))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with a dataset, a 1-step run, an empty folder, a file, broken datasets and bad recipes."""
    root = tmp_path_factory.mktemp("cli_errors")
    _write_dataset(root / "data")
    assert main(["train", "tiny_pi0", "--data", str(root / "data"), "--out", str(root / "run"), "--steps", "1",
                 "policy.action_dim=4", "policy.state_dim=4", "train.batch_size=2", "train.ema_decay=0.9"]) == 0
    (root / "empty").mkdir()
    (root / "a_file.txt").write_text("not a dataset\n")
    shutil.copytree(root / "data", root / "broken")
    (root / "broken" / "meta" / "info.json").write_text("{not json")
    shutil.copytree(root / "data", root / "nan_stats")
    stats = json.loads((root / "nan_stats" / "meta" / "stats.json").read_text())
    stats["action"]["mean"][1] = float("nan")
    (root / "nan_stats" / "meta" / "stats.json").write_text(json.dumps(stats))
    (root / "bad.yaml").write_text("extends: tiny_pi0\nhead: {num_steps: 3\n")
    (root / "dir.yaml").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# (argv, exit status, text the line must contain: the offending argument, key or file)
CASES = [
    # usage errors: argparse, or the CLI's own range checks, before anything runs
    (["bogus"], USAGE, "'bogus'"),
    (["show"], USAGE, "recipe"),
    (["show", "tiny_pi0", "--zzz"], USAGE, "--zzz"),
    (["train", "tiny_pi0"], USAGE, "--data"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "--steps", "0"], USAGE, "--steps"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "--steps", "ten"], USAGE, "--steps"),
    (["eval", "run", "--tasks", "reach-v3", "--episodes", "0"], USAGE, "--episodes"),
    (["eval", "run", "--tasks", "reach-v3", "--workers", "-1"], USAGE, "--workers"),
    (["eval", "run", "--tasks", "reach-v3", "--workers", "0"], USAGE, "--workers"),
    (["eval", "run", "--tasks", "reach-v3", "--execute-steps", "0"], USAGE, "--execute-steps"),
    (["eval", "run", "--tasks", "reach-v3", "--env", "atari"], USAGE, "--env"),
    ([*MW[:4], "--episodes", "0", *MW[4:]], USAGE, "--episodes"),
    ([*MW, "--episodes", "1", "--workers", "0"], USAGE, "--workers"),
    ([*MW, "--episodes", "1", "--image-size", "-5"], USAGE, "--image-size"),
    ([*MW, "--episodes", "1", "--camera", "bogus"], USAGE, "--camera"),
    ([*MW, "--episodes", "1", "--state", "goal"], USAGE, "--state"),
    ([*MW, "--episodes", "1", "--format", "v4.0"], USAGE, "--format"),
    (["check", "tiny_pi0", "--batch", "0"], USAGE, "--batch"),
    (["report", "run", "--t-bins", "0"], USAGE, "--t-bins"),
    (["report", "run", "--samples", "0"], USAGE, "--samples"),
    (["bench", "tiny_pi0", "--repeats", "0"], USAGE, "repeats"),
    (["bench", "tiny_pi0", "--steps", "0"], USAGE, "steps"),
    (["bench", "tiny_pi0", "--batch", "x"], USAGE, "--batch"),
    # failures: a bad recipe, override, dataset, run or file
    ([*SHOW[:1], "no_such_recipe"], FAILURE, "no_such_recipe"),
    ([*SHOW, "head.num_stepz=3"], FAILURE, "head.num_stepz"),
    ([*SHOW, "head.num_steps=ten"], FAILURE, "head.num_steps"),
    ([*SHOW, "train.lr=abc"], FAILURE, "train.lr"),
    ([*SHOW, "train.lr=-1"], FAILURE, "override train.lr=-1"),
    ([*SHOW, "head.num_steps=0"], FAILURE, "override head.num_steps=0"),
    ([*SHOW, "backbone.experts.0.norm_eps=-1"], FAILURE, "override backbone.experts.0.norm_eps=-1"),
    ([*SHOW, "train.lrr=0.1"], FAILURE, "lrr"),
    ([*SHOW, "train.lora.rank=4"], FAILURE, "TrainConfig.lora is set but finetune is 'full'"),
    ([*SHOW, "train.finetune=lora", "train.lora.rank=0"], FAILURE, "LoraSettings.rank must be an integer >= 1; got 0"),
    ([*SHOW, "train.finetune=lora", "train.lora.experts=[gripper]"], FAILURE, "unknown expert(s) ['gripper']"),
    (["train", "empty", "--data", "data", "--out", "run_new"], FAILURE, "is a directory without recipe.yaml"),
    (["export", "run", "data"], FAILURE, "not written by vlablocks export"),
    ([*SHOW, "backbone.experts.7.width=8"], FAILURE, "backbone.experts.7"),
    (["show", "bad.yaml"], FAILURE, "bad.yaml"),
    (["show", "dir.yaml"], FAILURE, "dir.yaml"),
    (["show", "missing.yaml"], FAILURE, "missing.yaml"),
    (["check", "bad.yaml"], FAILURE, "bad.yaml"),
    (["train", "tiny_pi0", "--data", "nowhere", "--out", "run_new"], FAILURE, "nowhere"),
    (["train", "tiny_pi0", "--data", "empty", "--out", "run_new"], FAILURE, "empty"),
    (["train", "tiny_pi0", "--data", "a_file.txt", "--out", "run_new"], FAILURE, "a_file.txt"),
    (["train", "tiny_pi0", "--data", "broken", "--out", "run_new"], FAILURE, "info.json"),
    (["train", "tiny_pi0", "--data", "nan_stats", "--out", "run_new", "policy.action_dim=4", "policy.state_dim=4"],
     FAILURE, "meta/stats.json"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "backbone.experts.1.norm_eps=-1"], FAILURE,
     "override backbone.experts.1.norm_eps=-1"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "--resume"], FAILURE, "run_new"),
    (["eval", "empty", "--tasks", "reach-v3"], FAILURE, "empty"),
    (["eval", "nowhere", "--tasks", "reach-v3"], FAILURE, "nowhere"),
    (["eval", "run", "--tasks", "nope-v3"], FAILURE, "nope-v3"),
    (["eval", "run", "--tasks", "reach-v3", "--execute-steps", "100"], FAILURE, "execute_steps=100"),
    (["report", "data"], FAILURE, "metrics.csv"),
    (["report", "empty"], FAILURE, "empty"),
    ([*MW[:4], "--episodes", "1", "--out", "data"], FAILURE, "data"),
    (["data", "metaworld", "--tasks", "nope-v3", "--episodes", "1", "--out", "new_data"], FAILURE, "nope-v3"),
    ([*MW, "--episodes", "1", "--video", "--image-size", "33"], FAILURE, "image_size must be even"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "--cameras", "top"], FAILURE, "cameras ['top']"),
    (["train", "tiny_pi0", "--data", "data", "--out", "run_new", "--state-key", "observation.joints"], FAILURE,
     "'observation.joints'"),
    (["train", "tiny_pi0", "--data", "no_org/no_such_dataset", "--out", "run_new"], FAILURE, "no_org/no_such_dataset"),
]


@pytest.mark.parametrize("argv, status, names", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_mistake_gets_one_line_and_changes_nothing(world, monkeypatch, capsys, argv, status, names):
    monkeypatch.chdir(world)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    before = snapshot(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == status, err
    assert len(lines) == 1 and lines[0].strip() and "Traceback" not in err, err
    command = " ".join(["vlablocks", *argv[: 2 if argv[0] == "data" else 1]]) if argv[0] != "bogus" else "vlablocks"
    assert lines[0].startswith(f"{command}: "), lines[0]
    assert names in lines[0], lines[0]
    after = snapshot(world)
    assert {k: after.get(k) for k in before} == before


def test_scientific_notation_overrides_are_floats_as_in_yaml_1_2(world, monkeypatch, capsys):
    assert [parse_override_value(t) for t in ("5e-4", "1E6", "-2e+3", "5e-4x", "1.5", "3")] == [
        0.0005, 1e6, -2000.0, "5e-4x", 1.5, 3]
    assert train_config(load_recipe("tiny_pi0"), ["train.lr=5e-4"]).lr == 0.0005
    assert load_recipe("tiny_pi0", ["train.weight_decay=1e-2"]).data["train"]["weight_decay"] == 0.01
    monkeypatch.chdir(world)
    assert main([*SHOW, "train.lr=5e-4", "head.num_steps=3"]) == 0
    assert "num_steps: 3" in capsys.readouterr().out


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(RecipeError, match="no_such_recipe"):
        main(["--debug", "show", "no_such_recipe"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RecipeError, match="no_such_recipe"):
        main(["show", "no_such_recipe"])


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(_):
        raise ZeroDivisionError("boom")

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "cmd_recipes", broken)
    assert main(["recipes"]) == FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: boom" in err
    assert err.splitlines()[-1].startswith("vlablocks recipes: internal error (ZeroDivisionError: boom)")
    assert "report" in err.splitlines()[-1]
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "recipes"])


def test_messages_become_one_line():
    assert one_line("first\n  second\n\nthird ") == "first second third"
    assert describe_error(KeyError("action")) == "missing key 'action'"
    assert describe_error(FileNotFoundError(2, "No such file or directory", "x/meta.json")) == "x/meta.json: No such file or directory"
    assert describe_error(ValueError("a\nb")) == "a b"
    assert json.loads(json.dumps(describe_error(RecipeError("bad", "head.x", "f.yaml")))).startswith("recipe error: f.yaml: head.x")
