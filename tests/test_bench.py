"""vlablocks bench: what it measures is what it says (the figures themselves are for docs/benchmarks.md)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vlablocks.tools.bench import BenchSettings, counted_flops, format_table, run_bench, token_work_ratio
from vlablocks.tools.bench_setup import bench_batch, read_prompts
from vlablocks.tools.memory import measure_memory
from vlablocks.policy.checks import random_batch
from vlablocks.cli import main
from vlablocks.recipes.builder import build

QUICK = dict(repeats=1, warmup=0, train_batch=2)
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("restructure_script", ROOT / "benchmarks" / "restructure.py")
restructure = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = restructure  # its dataclasses look their module up there
spec.loader.exec_module(restructure)


def test_token_work_ratio_counts_the_tokens_each_variant_pushes_through_the_stack():
    # no cache: N passes over P + S tokens; cache: one pass over P, then N over S
    assert token_work_ratio(300, 51, 10) == pytest.approx(10 * 351 / (300 + 510))
    assert token_work_ratio(300, 51, 1) == pytest.approx(1.0)
    assert token_work_ratio(0, 51, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("field, value, match", [
    ("dtype", "fp16", "dtype must be one of"),
    ("compile", "yes", "compile must be 'off', 'step' or 'chunk'"),
    ("device", "tpu", "device must be 'cpu' or 'cuda'"),
    ("steps", 0, "steps must be >= 1; got 0"),
    ("warmup", -1, "warmup must be >= 0; got -1"),
])
def test_settings_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        BenchSettings(device="cuda")


def test_run_bench_reports_consistent_figures_for_a_deep_fusion_recipe():
    overrides = ["policy.horizon=20"]
    result = run_bench("tiny_llava3d_deepfusion", overrides, BenchSettings(memory=False, steps=4, **QUICK))
    vla = build("tiny_llava3d_deepfusion", overrides)
    assert result.prefix_tokens == vla.encode(random_batch(vla, 1)).prefix.embeds.shape[1]
    assert result.suffix_tokens == 20 + 2  # state token, 20 action tokens, time token
    assert result.parameters == sum(p.numel() for p in vla.parameters())
    for name in ("encode_ms", "input_checks_ms", "output_checks_ms", "prefix_ms", "step_ms", "chunk_cached_ms", "chunk_recompute_ms",
                 "train_step_ms", "train_step_checkpointed_ms", "train_checks_ms"):
        assert getattr(result, name) > 0, name
    assert result.speedup == pytest.approx(result.chunk_recompute_ms / result.chunk_cached_ms)
    assert result.token_work_ratio == pytest.approx(token_work_ratio(result.prefix_tokens, 22, 4))
    assert result.speedup_vs_theory == pytest.approx(result.speedup / result.token_work_ratio)
    assert result.train_samples_per_s == pytest.approx(2000 / result.train_step_ms)
    # the narrower expert makes a recomputed chunk cost more FLOPs than the token count says
    assert result.flop_ratio > result.token_work_ratio > 1
    table = format_table(result)
    assert "cache speed-up" in table and "achieved / token-work ratio" in table and "training step (batch 2)" in table
    assert "batch checks of predict_action" in table and "share of the training step" in table


def test_counted_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert counted_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_dit_recipe_has_no_recompute_figure():
    result = run_bench("tiny_llava3d_dit_layerwise", [], BenchSettings(memory=False, train=False, **QUICK))
    assert result.chunk_recompute_ms is None and result.speedup is None and result.chunk_cached_ms > 0
    assert "full recompute" not in format_table(result)


def test_gradient_checkpointing_lowers_the_measured_training_peak():
    settings = BenchSettings(train_batch=8)
    overrides = ["vision.image_size=256"]  # enough activations to dwarf the fixed allocations
    plain = measure_memory("train", "tiny_llava3d_deepfusion", overrides, settings)
    checkpointed = measure_memory("train_checkpointed", "tiny_llava3d_deepfusion", overrides, settings)
    inference = measure_memory("inference", "tiny_llava3d_deepfusion", overrides, settings)
    assert 0 < checkpointed < 0.8 * plain, (checkpointed, plain)
    assert 0 < inference < plain


def test_cli_bench_prints_the_table_and_writes_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code = main(["bench", "tiny_llava3d_deepfusion", "policy.horizon=8", "--steps", "3", "--repeats", "1",
                 "--warmup", "0", "--no-train", "--no-memory", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0 and "chunk, cached (3 steps)" in out and f"written to {path}" in out
    data = json.loads(path.read_text())
    assert data["settings"]["steps"] == 3 and data["overrides"] == ["policy.horizon=8"]
    assert data["suffix_tokens"] == 10 and data["train_step_ms"] is None and data["memory_mib"] == {}
    assert data["speedup_vs_theory"] == pytest.approx(data["speedup"] / data["token_work_ratio"])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left behind


def test_cli_bench_rejects_bad_settings(capsys):
    assert main(["bench", "tiny_llava3d_deepfusion", "--steps", "0"]) == 2
    assert "steps must be >= 1; got 0" in capsys.readouterr().err


def test_cli_bench_times_the_policy_optimised_for_inference(capsys, tmp_path):
    """--fuse --quantize int8: the inference figures are the optimised policy's (no FLOP count: int8 ops are not counted)."""
    path = tmp_path / "bench.json"
    assert main(["bench", "tiny_pi0", "--fuse", "--quantize", "int8", "--repeats", "1", "--warmup", "0", "--no-train",
                 "--no-memory", "--json", str(path)]) == 0
    assert "cpu fp32, fused, int8, batch 1" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["settings"]["fuse"] is True and data["settings"]["quantize"] == "int8"
    assert data["step_ms"] > 0 and data["flop_ratio"] is None
    with pytest.raises(ValueError, match="quantize='int8' is dynamic CPU quantisation; got device 'cuda'"):
        BenchSettings(device="cuda", quantize="int8")


# ------------------------------------------------------------------ prompts, spread, training phases

TIMED = ("encode_ms", "input_checks_ms", "output_checks_ms", "prefix_ms", "step_ms", "chunk_cached_ms", "chunk_recompute_ms",
         "train_fwd_bwd_ms", "train_optimizer_ms", "train_step_ms", "train_step_checkpointed_ms", "train_checks_ms")


def _image_tokens(vla, batch):
    return vla.embed_images(batch)[0].shape[1]


@pytest.mark.parametrize("recipe", ["tiny_pi0", "tiny_pi05", "tiny_smolvla"])
def test_prompt_tokens_make_every_prompt_exactly_n_tokens_up_to_max_length(recipe, caplog):
    vla = build(recipe, [], load_weights=False)
    top = vla.text.tokenizer.max_length
    extra = 1 if recipe == "tiny_smolvla" else 0  # SmolVLA's state token closes the prefix
    for n in (top - 5, top - 1, top):  # at max_length: nothing truncated (no warning)
        batch = bench_batch(vla, 3, BenchSettings(prompt_tokens=n))
        with torch.no_grad():
            prefix = vla.encode(batch).prefix
        assert prefix.pad.sum(1).tolist() == [_image_tokens(vla, batch) + n + extra] * 3, (n, batch["task"])
        assert len(set(batch["task"])) == 3  # each sample its own text
    assert "truncated" not in caplog.text


def test_run_bench_records_the_prefix_of_n_token_prompts():
    result = run_bench("tiny_pi0", [], BenchSettings(prompt_tokens=20, memory=False, train=False, repeats=2, warmup=0))
    vla = build("tiny_pi0", [], load_weights=False)
    batch = bench_batch(vla, 1, BenchSettings(prompt_tokens=20))
    assert result.prefix_tokens == _image_tokens(vla, batch) + 20 == vla.encode(batch).prefix.embeds.shape[1]
    assert result.settings["prompt_tokens"] == 20 and "20-token prompts" in format_table(result)


def test_prompt_tokens_beyond_the_text_encoders_max_length_name_it():
    with pytest.raises(ValueError, match=r"prompt_tokens must be <= the text encoder's max_length 24; got 25"):
        run_bench("tiny_pi0", [], BenchSettings(prompt_tokens=25, memory=False, train=False, repeats=1, warmup=0))
    vla = build("tiny_pi05", [], load_weights=False)  # pi0.5's template ("Task: ..., State: ...") alone is longer
    with pytest.raises(ValueError, match=r"prompt_tokens must be >= \d+ for this policy .*; got 3"):
        bench_batch(vla, 1, BenchSettings(prompt_tokens=3))


def test_prompts_come_from_a_file_or_a_datasets_tasks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("stack the blue cup on the plate\n\n  wipe the table  \n")
    vla = build("tiny_pi0", [], load_weights=False)
    batch = bench_batch(vla, 3, BenchSettings(prompts=str(path)))
    assert batch["task"] == ["stack the blue cup on the plate", "wipe the table", "stack the blue cup on the plate"]
    for dataset in ("v21", "v30_images"):
        assert read_prompts(ROOT / "tests" / "data" / "lerobot" / dataset) == ["pick the cube", "open the drawer"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="at least one task string"):
        read_prompts(tmp_path / "empty.txt")


@pytest.mark.parametrize("settings, match", [
    (dict(prompt_tokens=8, prompts="x.txt"), "give prompt_tokens or prompts, not both"),
    (dict(prompt_tokens=0), "prompt_tokens must be >= 1; got 0"),
    (dict(prompts="/no/such/prompts.txt"), "prompts must be a text file or a LeRobot dataset directory"),
])
def test_prompt_settings_errors_name_the_field(settings, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**settings)


def test_every_timed_figure_has_ordered_stats_and_training_is_split():
    settings = BenchSettings(memory=False, repeats=6, warmup=0, train_batch=2)  # training: 3 rounds
    result = run_bench("tiny_pi0", [], settings)
    assert set(result.spread) == set(TIMED)
    for name, stats in result.spread.items():
        assert set(stats) == {"min", "median", "max"}, name
        assert 0 < stats["min"] <= stats["median"] <= stats["max"], (name, stats)
        assert stats["median"] == getattr(result, name), name
    assert result.train_fwd_bwd_ms > 0 and result.train_optimizer_ms > 0
    # the whole step is their sum in each round: bounded by the sums of their extremes
    fwd, opt, step = (result.spread[k] for k in ("train_fwd_bwd_ms", "train_optimizer_ms", "train_step_ms"))
    assert fwd["min"] + opt["min"] <= step["min"] and step["max"] <= fwd["max"] + opt["max"]
    assert result.train_samples_per_s == pytest.approx(2000 / result.train_step_ms)
    assert result.train_fwd_bwd_samples_per_s == pytest.approx(2000 / result.train_fwd_bwd_ms)
    assert result.train_fwd_bwd_samples_per_s > result.train_samples_per_s
    table = format_table(result)
    assert "min" in table.splitlines()[5] and "median" in table and "max" in table
    assert "forward + backward" in table and "optimizer step" in table and "samples / s (whole step)" in table


def test_cli_bench_accepts_the_prompt_options(capsys, tmp_path):
    path, prompts = tmp_path / "bench.json", tmp_path / "prompts.txt"
    quick = ["--repeats", "2", "--warmup", "0", "--no-train", "--no-memory"]
    assert main(["bench", "tiny_pi0", "--prompt-tokens", "12", *quick, "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["settings"]["prompt_tokens"] == 12 and data["prefix_tokens"] == 16 + 12  # 16 image tokens at 32 px
    assert data["spread"]["step_ms"]["min"] <= data["spread"]["step_ms"]["max"]
    prompts.write_text("a much longer task than the built-in ones\n")
    assert main(["bench", "tiny_pi0", "--prompts", str(prompts), *quick, "--json", str(path)]) == 0
    assert json.loads(path.read_text())["settings"]["prompts"] == str(prompts)
    capsys.readouterr()
    assert main(["bench", "tiny_pi0", "--prompt-tokens", "12", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not allowed with argument" in err
    assert main(["bench", "tiny_pi0", "--prompt-tokens", "25", *quick]) == 1
    assert "max_length 24; got 25" in capsys.readouterr().err


def test_replace_section_rewrites_only_between_its_markers(tmp_path):
    from vlablocks.io.atomic import replace_section

    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- t:begin -->\nold\nrows\n<!-- t:end -->\noutro\n<!-- u:begin -->\nkeep\n<!-- u:end -->\n")
    replace_section(doc, "t", "| new |\n")
    assert doc.read_text() == "intro\n<!-- t:begin -->\n| new |\n<!-- t:end -->\noutro\n<!-- u:begin -->\nkeep\n<!-- u:end -->\n"
    with pytest.raises(ValueError, match="has no '<!-- v:begin -->'"):
        replace_section(doc, "v", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]


def test_restructure_timing_child_times_the_tree_it_is_given(tmp_path):
    # the working tree only (no git): copied into an importable tree, timed by one fresh child
    tree = restructure.tree_at(ROOT, None, tmp_path / "tree")
    assert (tree / "vlablocks" / "blocks").is_dir() and (tree / "vlablocks" / "recipes" / "tiny_pi05.yaml").is_file()
    result = restructure.run_child(tree, restructure.ChildSettings(repeats=2, warmup=1, inner=2))
    assert Path(result["vlablocks_file"]) == (tree / "vlablocks" / "__init__.py").resolve()
    assert result["api"] == "encode" and result["threads"] == 1
    assert set(result["figures"]) == set(restructure.FIGURES)
    for name, samples in result["figures"].items():
        assert len(samples) == 2 and min(samples) > 0, name
    rows = restructure.summarise({"old": [result], "new": [result]})
    assert [row.speedup for row in rows] == [1.0, 1.0, 1.0] and all(row.noise is None for row in rows)
    # the child's guard: this process's vlablocks (the editable install) is not from that tree
    child_spec = importlib.util.spec_from_file_location("restructure_child", restructure.CHILD)
    child = importlib.util.module_from_spec(child_spec)
    child_spec.loader.exec_module(child)
    with pytest.raises(SystemExit, match="modules imported from outside"):
        child.check_modules(tree)
