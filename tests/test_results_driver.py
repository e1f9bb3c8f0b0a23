"""benchmarks/mt10.py: the records, the table of docs/results.md and the skip-what-is-done logic."""

import argparse
import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from vlablocks.envs.metaworld.tasks import MT10

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mt10_driver", ROOT / "benchmarks" / "mt10.py")
mt10 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mt10)


def fake_run(root: Path, recipe: str, seed: int, steps: int, success: dict[str, float], loss: float) -> Path:
    """A run directory as ``vlablocks train`` + ``vlablocks eval`` leave it (no checkpoint weights)."""
    run = root / mt10.run_name(recipe, seed, steps)
    (run / "eval").mkdir(parents=True)
    (run / "checkpoints" / "latest").mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "loss", "vel_cosine", "grad_total_norm", "guard_hits", "wall_time_s"])
        writer.writeheader()
        writer.writerow({"step": steps // 2, "loss": 2 * loss, "vel_cosine": 0.5, "grad_total_norm": 3.0,
                         "guard_hits": 0, "wall_time_s": 60.0})
        writer.writerow({"step": steps, "loss": loss, "vel_cosine": 0.9, "grad_total_norm": "", "guard_hits": 0,
                         "wall_time_s": 120.0})
    results = {"per_task": success, "per_bucket": {"easy": 0.5}, "mean": statistics.fmean(success.values()),
               "episodes": 10, "execute_steps": 4, "ema": False, "checkpoint": str(run / "checkpoints" / "x")}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    return run


def args_for(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(runs=str(tmp_path / "runs"), records=str(tmp_path / "records"), data=str(tmp_path / "data"),
                steps=100, episodes=10, execute_steps=4, eval_seed=0, override=[])
    return argparse.Namespace(**{**base, **kw})


def test_a_finished_run_is_recorded_without_retraining_and_tabulated_with_mean_and_spread(tmp_path, monkeypatch):
    args = args_for(tmp_path)
    calls = []
    monkeypatch.setattr(mt10, "_call", lambda command, log_file, threads: calls.append(command))
    rates = {0: dict.fromkeys(MT10, 0.4), 1: dict.fromkeys(MT10, 0.6)}
    rates[1]["reach-v3"] = 1.0
    for seed, success in rates.items():
        fake_run(Path(args.runs), "mt10_deepfusion", seed, 100, success, loss=0.1 * (seed + 1))
        record = mt10.train_and_eval("mt10_deepfusion", seed, args, threads=1)
        assert record == Path(args.records) / f"mt10_deepfusion_s{seed}_100.json"
    assert calls == []  # trained and evaluated already: nothing is rerun

    saved = json.loads(record.read_text())
    assert saved["final"]["loss"] == pytest.approx(0.2) and saved["final"]["step"] == 100
    assert [row["step"] for row in saved["curve"]] == [50, 100]
    assert "grad_total_norm" not in saved["curve"][1]  # an empty cell stays out
    assert saved["eval"]["per_task"]["reach-v3"] == 1.0 and saved["machine"]["torch_threads"] == 1

    table = mt10.collect(Path(args.records), ["mt10_deepfusion", "mt10_hybrid"], [0, 1], 100)
    assert list(table["recipes"]) == ["mt10_deepfusion"]  # no record, no row
    row = table["recipes"]["mt10_deepfusion"]
    means = [statistics.fmean(rates[s].values()) for s in (0, 1)]
    assert row["success"] == pytest.approx(means)
    assert row["success_mean"] == pytest.approx(statistics.fmean(means))
    assert row["success_std"] == pytest.approx(statistics.stdev(means))
    assert row["per_task_mean"]["reach-v3"] == pytest.approx(0.7)
    assert row["loss_mean"] == pytest.approx(0.15)

    text = mt10.markdown(table)
    assert f"| E1 deep fusion (`mt10_deepfusion`) | 2 | {100 * statistics.fmean(means):.1f} +- " in text
    assert "| reach-v3 | 70 |" in text


def test_a_recorded_run_is_skipped_and_an_unfinished_one_resumes(tmp_path, monkeypatch):
    args = args_for(tmp_path, steps=200)
    calls = []
    monkeypatch.setattr(mt10, "_call", lambda command, log_file, threads: calls.append(command))
    Path(args.records).mkdir(parents=True)
    (Path(args.records) / "mt10_hybrid_s0_200.json").write_text("{}")
    assert mt10.train_and_eval("mt10_hybrid", 0, args, threads=1).name == "mt10_hybrid_s0_200.json"
    assert calls == []

    # half-trained (metrics stop at step 100 of 200), with a checkpoint: resumed, then evaluated
    run = fake_run(Path(args.runs) / "tmp", "mt10_deepfusion", 0, 100, dict.fromkeys(MT10, 0.5), loss=0.1)
    run.rename(Path(args.runs) / "mt10_deepfusion_s0_200")
    (Path(args.runs) / "mt10_deepfusion_s0_200" / "eval" / "results.json").unlink()
    with pytest.raises(FileNotFoundError):  # the fake _call writes no results: the record is not made
        mt10.train_and_eval("mt10_deepfusion", 0, args, threads=1)
    train, evaluate = calls
    assert train[3:5] == ["train", "mt10_deepfusion"] and "--resume" in train and "train.seed=0" in train
    assert evaluate[3] == "eval" and evaluate[evaluate.index("--tasks") + 1] == ",".join(MT10)
    assert not (Path(args.records) / "mt10_deepfusion_s0_200.json").exists()


def test_the_driver_refuses_a_missing_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mt10.main(["--data", str(tmp_path / "nope"), "--runs", str(tmp_path), "--records", str(tmp_path)])
    assert "is not a dataset (no meta/info.json)" in capsys.readouterr().err


#: each ablation of benchmarks/ablations/ and the recipe leaves it changes (besides its description)
ABLATIONS = {
    "mt10_e1_uniform_time": {"head.time_sampler.type"},
    "mt10_e1_quantile_norm": {"policy.state_norm", "policy.action_norm"},
    "mt10_e1_chunk8": {"policy.horizon"},
    "mt10_e1_expert64": {"backbone.experts.1.width", "backbone.experts.1.mlp_dim"},
    "mt10_e1_state_in_prefix": {"policy.state_mode"},
}


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def test_each_ablation_changes_one_thing_of_e1_and_builds():
    from vlablocks.recipes.builder import build
    from vlablocks.recipes.loader import load_recipe

    files = sorted((ROOT / "benchmarks" / "ablations").glob("*.yaml"))
    assert {f.stem for f in files} == set(ABLATIONS)
    base = _leaves(load_recipe("mt10_deepfusion").data)
    for path in files:
        leaves = _leaves(load_recipe(path).data)
        changed = {k for k in base.keys() | leaves.keys() if base.get(k) != leaves.get(k)} - {"description"}
        assert changed == ABLATIONS[path.stem], path.name
        assert build(str(path), device="meta").config.horizon == leaves["policy.horizon"]
        assert mt10.run_name(str(path), 0, 1500) == f"{path.stem}_s0_1500"
