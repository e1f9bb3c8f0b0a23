"""The command-line workflow end to end on a tiny scale: data -> train -> resume -> eval."""

import json
import re

import pytest
import torch

from vlablocks.cli import main

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw") / "data"
    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "2", "--image-size", "32", "--out", str(out)]) == 0
    return out


def test_train_resume_and_eval_through_the_cli(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "tiny_pi0", "--data", str(data_dir), "--out", str(run), "policy.action_dim=4", "policy.state_dim=4",
              "train.batch_size=4", "train.save_every=2", "train.ema_decay=0.9", "train.log_every=1"]
    assert main([*common, "--steps", "2"]) == 0
    assert main([*common, "--steps", "3", "--resume"]) == 0
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step") and rows[-1].split(",")[0] == "3"
    assert (run / "curves.png").is_file() and (run / "data.json").is_file()
    # the eval finds the state layout from the names the dataset recorded
    assert json.loads((run / "data.json").read_text())["state_names"] == ["hand_x", "hand_y", "hand_z", "gripper"]
    # 2 rollout processes: each loads the checkpoint itself (CheckpointPolicy ships only the path)
    assert main(["eval", str(run), "--tasks", TASK, "--episodes", "2", "--execute-steps", "4", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert TASK in out and "mean over tasks" in out
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["per_task"]) == {TASK} and 0.0 <= results["mean"] <= 1.0 and results["ema"] is True
    assert results["state"] == "proprio"
    # the diagnostic report, on the data the run trained on (found through data.json)
    assert main(["report", str(run), "--samples", "8", "--batch", "4", "--t-bins", "4"]) == 0
    out = capsys.readouterr().out
    assert "## Loss by flow time" in out and "| 0.88 |" in out and f"written to {run / 'report'}/" in out
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["training"]["steps"] == 3 and report["samples"] == 8
    assert report["t_centres"] == [0.125, 0.375, 0.625, 0.875] and len(report["loss_by_t"]) == 4
    assert len(report["error_by_dim"]) == 4 and len(report["error_by_step"]) == 4  # tiny_pi0: horizon 4
    assert all(x > 0 for x in report["loss_by_t"]) and report["residual_var"] > 0
    assert {p.name for p in (run / "report").iterdir()} == {"report.md", "report.json", "report.png"}


def test_train_rejects_a_dataset_that_does_not_fit(data_dir, tmp_path, capsys):
    assert main(["train", "tiny_llava3d_deepfusion", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--steps", "200"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the data-loading progress bar
    assert re.fullmatch(r"vlablocks train: .*does not fit the recipe: the recipe "
                        r"has a geometry encoder but the dataset has no depth.*", last)


def test_a_run_is_reproducible_from_its_recipe_and_seed(data_dir, tmp_path):
    """Initial weights come from train.seed, not from whatever the process's random stream holds."""
    from safetensors.torch import load_file

    from vlablocks.train.workflow import train_from_recipe

    def weights(name, *overrides):
        common = ["policy.action_dim=4", "policy.state_dim=4", "train.batch_size=2", "train.warmup_steps=0", *overrides]
        run = train_from_recipe("tiny_pi0", data_dir, out=tmp_path / name, overrides=common, steps=1)
        return load_file(run.checkpoint / "model.safetensors")

    first, again, other = weights("a"), weights("b"), weights("c", "train.seed=1")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_refuses_a_bad_episode_unless_told_to_skip_it(tmp_path, capsys):
    from vlablocks.data.format import episode_path
    from vlablocks.data.table import EpisodeError

    data = tmp_path / "data"  # format v2.1: a file per episode, so one can break alone
    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "2", "--image-size", "32", "--out", str(data),
                 "--format", "v2.1"]) == 0
    broken = data / episode_path(1)
    broken.write_bytes(broken.read_bytes()[:-64])  # truncated: the parquet footer is gone
    run = tmp_path / "run"
    common = ["train", "tiny_pi0", "--data", str(data), "--out", str(run), "policy.action_dim=4", "policy.state_dim=4",
              "train.batch_size=2", "--steps", "1"]
    assert main(common) == 1
    assert re.search(r"^vlablocks train: .*episode_000001.parquet \(episode 1\): ", capsys.readouterr().err.splitlines()[-1])
    with pytest.raises(EpisodeError, match=r"episode_000001.parquet \(episode 1\): "):  # --debug: the exception itself
        main(["--debug", *common])
    assert not (run / "checkpoints").exists()
    assert main([*common, "--skip-bad-episodes"]) == 0
    skipped = json.loads((run / "data.json").read_text())["skipped_episodes"]
    assert [s["episode"] for s in skipped] == [1] and skipped[0]["problem"]
    assert (run / "checkpoints" / "step_0000001").is_dir()


def test_the_tutorial_recipe_trains_on_demo_format_data(tmp_path):
    """docs/tutorial.md: the three-expert variant trains through `vlablocks train` on data made
    like `make demo`'s (96 px RGB + depth), and its checkpoint reloads."""
    from vlablocks.recipes.builder import from_pretrained

    data = tmp_path / "data"
    assert main(["data", "metaworld", "--tasks", TASK, "--episodes", "1", "--image-size", "96", "--depth", "--out", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", "tutorial_state_expert", "--data", str(data), "--out", str(run), "--steps", "3",
                 "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0"]) == 0
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().strip().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3] and all(float(r[1]) > 0 for r in rows)
    policy = from_pretrained(run / "checkpoints" / "step_0000003")
    assert [spec.name for spec in policy.backbone.experts] == ["llm", "state", "action"]
    assert policy.head.denoiser.state_expert == 1


def test_a_goal_state_run_is_evaluated_with_the_goal_state(tmp_path, capsys):
    """The eval must feed the 7-number state the run trained on (a 4-number one would pass the
    state <= state_dim check silently): the layout comes from the names in data.json."""
    data, run = tmp_path / "goal", tmp_path / "run"
    assert main(["data", "metaworld", "--tasks", "reach-v3", "--episodes", "1", "--image-size", "32", "--state",
                 "proprio_goal", "--out", str(data)]) == 0
    assert main(["train", "tiny_pi0", "--data", str(data), "--out", str(run), "--steps", "1", "policy.action_dim=4",
                 "policy.state_dim=7", "train.batch_size=2"]) == 0
    assert json.loads((run / "data.json").read_text())["state_names"][4:] == ["goal_x", "goal_y", "goal_z"]
    # tiny_pi0 predicts chunks of 4 actions: more executed steps than that is refused, not cut short
    assert main(["eval", str(run), "--tasks", "reach-v3", "--episodes", "1", "--execute-steps", "16"]) == 1
    assert "execute_steps=16 is more than the policy's chunk of horizon=4 actions" in capsys.readouterr().err
    assert main(["eval", str(run), "--tasks", "reach-v3", "--episodes", "1"]) == 0  # default: min(8, horizon)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["execute_steps"] == 4
    assert (results["state"], results["env"], results["camera"]) == ("proprio_goal", "metaworld", "corner")
