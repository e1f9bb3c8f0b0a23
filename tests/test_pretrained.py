"""Checkpoints: save_pretrained -> from_pretrained is bitwise, pickle-free; local SigLIP / LLaVA-layout weights load."""

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import save_tiny_siglip, save_tiny_tokenizer
from vlablocks.policy.checks import random_batch
from vlablocks.recipes.builder import build
from vlablocks.recipes.loader import RecipeError, load_recipe
from vlablocks.recipes.builder import from_pretrained
from vlablocks.io.manifest import CheckpointError, write_manifest


@pytest.fixture
def no_pickle(monkeypatch):
    """Fail the test if anything unpickles while loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("name", ["tiny_pi0", "tiny_pi05", "tiny_smolvla", "tiny_llava3d_deepfusion"])
def test_save_and_load_give_bitwise_identical_actions(name, tmp_path, no_pickle):
    torch.manual_seed(0)
    vla = build(name)
    for name, dim in (("action", 3), ("state", vla.config.state_dim)):
        low = torch.randn(dim)
        vla.normalizer[name].set_stats(mean=torch.randn(dim), std=torch.rand(dim) + 0.5, q01=low, q99=low + 2.0)
    batch = random_batch(vla, 2)
    batch["actions"] = batch["actions"][..., :3]
    vla.eval()
    expected = vla.predict_action(batch, generator=torch.Generator().manual_seed(3))
    assert expected.shape == (2, vla.config.horizon, 3)  # the data's 3 action dims, un-normalised

    vla.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["manifest.json", "model.safetensors", "recipe.yaml"]
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    actual = loaded.predict_action(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(actual, expected)
    assert loaded.normalizer["action"].width == 3


def llava_checkpoint(tmp_path):
    """A tiny LLaMA saved in the LLaVA key layout (LLM under model., mm_projector, vision tower)."""
    torch.manual_seed(1)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, vocab_size=32, rms_norm_eps=1e-5,
                                         attn_implementation="eager")).eval()
    tensors = {k: v.clone() for k, v in llama.state_dict().items()}
    tensors["model.mm_projector.0.weight"] = torch.randn(64, 32)
    tensors["model.mm_projector.0.bias"] = torch.randn(64)
    tensors["model.mm_projector.2.weight"] = torch.randn(64, 64)
    tensors["model.mm_projector.2.bias"] = torch.randn(64)
    (tmp_path / "llava").mkdir()
    save_file(tensors, str(tmp_path / "llava" / "model.safetensors"))
    return str(tmp_path / "llava"), llama, tensors


def llava_recipe(tmp_path, siglip_path, llava_path, tokenizer_path):
    recipe = {
        "policy": {"horizon": 4, "action_dim": 4, "state_dim": 3},
        "vision": {"type": "siglip", "path": siglip_path},
        "projector": {"type": "mlp2x_gelu"},
        "text": {"tokenizer": {"type": "hf", "path": tokenizer_path, "max_length": 16}, "vocab_size": 32},
        "backbone": {"type": "deep_fusion", "num_layers": 2, "experts": [
            {"name": "llm", "width": 64, "mlp_dim": 128, "norm_eps": 1e-5,
             "head_space": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}},
            {"name": "action", "width": 32, "mlp_dim": 64, "norm_eps": 1e-5,
             "head_space": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}}]},
        "suffix": {"time_fusion": {"type": "token"}},
        "pretrained": {"llm": llava_path, "layout": "llava"},
    }
    path = tmp_path / "llava_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_siglip_and_llava_layout_checkpoints_reproduce_the_transformers_models(tmp_path, no_pickle):
    siglip_path, siglip = save_tiny_siglip(tmp_path / "siglip")
    tokenizer_path = save_tiny_tokenizer(tmp_path / "tokenizer")
    llava_path, llama, tensors = llava_checkpoint(tmp_path)
    vla = build(load_recipe(llava_recipe(tmp_path, siglip_path, llava_path, tokenizer_path))).eval()

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_vision = siglip(pixel_values=(images - 0.5) / 0.5).last_hidden_state
        assert (vla.vision(images) - expected_vision).abs().max() <= 1e-5

        projected = vla.projector(expected_vision)
        w0, b0, w2, b2 = (tensors[f"model.mm_projector.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
        manual = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(expected_vision, w0, b0)), w2, b2)
        assert (projected - manual).abs().max() <= 1e-5

        ids = torch.tensor([[2, 5, 7, 9, 11]])
        embeds = vla.text.embed(ids)
        assert torch.equal(embeds, llama.model.embed_tokens(ids))
        stack = vla.backbone
        causal = torch.ones(1, 5, 5, dtype=torch.bool).tril()
        ours = stack([embeds, None], causal, torch.arange(5)[None]).hidden_states[0]
        reference = llama.model(input_ids=ids).last_hidden_state
        assert (ours - reference).abs().max() <= 1e-5

    # the checkpoint is self-contained: the recipe no longer points at the original files
    vla.save_pretrained(tmp_path / "ckpt")
    saved = yaml.safe_load((tmp_path / "ckpt" / "recipe.yaml").read_text())
    assert "pretrained" not in saved and "path" not in saved["vision"] and saved["vision"]["config"]["num_hidden_layers"] == 2
    assert saved["text"]["tokenizer"]["path"] == "tokenizer" and (tmp_path / "ckpt" / "tokenizer").is_dir()
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    batch = random_batch(vla, 2)
    torch.testing.assert_close(loaded.predict_action(batch, generator=torch.Generator().manual_seed(0)),
                               vla.predict_action(batch, generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"recipe\.yaml not found: not a vlablocks checkpoint directory"):
        from_pretrained(tmp_path)


def paligemma_checkpoint(tmp_path):
    """A tiny PaliGemmaForConditionalGeneration (SigLIP 32 px / 8, Gemma 64 x 2) saved as safetensors."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(2)
    config = PaliGemmaConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "patch_size": 8, "image_size": 32},
        text_config={"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300,
                     "attn_implementation": "eager"},
        projection_dim=64,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "paligemma", safe_serialization=True)
    return str(tmp_path / "paligemma"), model


def paligemma_recipe(path: str) -> dict:
    return {
        "policy": {"horizon": 4, "action_dim": 4, "state_dim": 3},
        "vision": {"type": "siglip", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 2, "patch_size": 8, "image_size": 32}},
        "projector": {"type": "linear"},
        "text": {"tokenizer": {"type": "byte", "max_length": 16}, "vocab_size": 300, "embed_scale": 8.0},
        "backbone": {"type": "deep_fusion", "num_layers": 2, "experts": [
            {"name": "vlm", "width": 64, "mlp_dim": 128, "activation": "gelu_tanh", "norm": "gemma",
             "head_space": {"num_heads": 4, "num_kv_heads": 1, "head_dim": 16}},
            {"name": "action", "width": 32, "mlp_dim": 64, "activation": "gelu_tanh", "norm": "gemma",
             "head_space": {"num_heads": 4, "num_kv_heads": 1, "head_dim": 16}}]},
        "suffix": {"time_fusion": {"type": "concat_mlp"}},
        "pretrained": {"llm": path, "layout": "paligemma"},
    }


def test_paligemma_layout_loads_tower_projector_decoder_and_embedding(tmp_path, no_pickle):
    path, paligemma = paligemma_checkpoint(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(paligemma_recipe(path)))
    vla = build(load_recipe(tmp_path / "recipe.yaml")).eval()
    inner = paligemma.model
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tower = inner.vision_tower(pixel_values=(images - 0.5) / 0.5).last_hidden_state
        assert (vla.vision(images) - tower).abs().max() <= 1e-5
        assert torch.equal(vla.projector.weight, inner.multi_modal_projector.linear.weight)
        ids = torch.tensor([[2, 5, 7, 9, 11]])
        assert torch.equal(vla.text.embedding.weight, inner.language_model.embed_tokens.weight)
        embeds = vla.text.embed(ids)  # the recipe's embed_scale 8 = sqrt(width), as Gemma scales before layer 0
        assert inner.language_model.config.use_bidirectional_attention  # PaliGemma: a prefix-LM, like pi0's prefix
        full = torch.ones(1, 5, 5, dtype=torch.bool)
        ours = vla.backbone([embeds, None], full, torch.arange(5)[None]).hidden_states[0]
        reference = inner.language_model(input_ids=ids).last_hidden_state
        assert (ours - reference).abs().max() <= 1e-5


def test_a_tied_embedding_kept_only_as_lm_head_is_loaded_and_a_missing_one_is_an_error(tmp_path):
    """Released pi0 checkpoints keep the tied embedding only as ``lm_head.weight``: it becomes the
    token embedding. Without either, loading fails instead of leaving the embedding random."""
    path, paligemma = paligemma_checkpoint(tmp_path)
    files = sorted(Path(path).glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    embedding_key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    lm_head = tensors.pop(embedding_key).clone()
    for f in files:
        f.unlink()
    save_file({**tensors, "lm_head.weight": lm_head}, Path(path) / "model.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(paligemma_recipe(path)))
    assert torch.equal(build(load_recipe(recipe)).text.embedding.weight, lm_head)
    save_file(tensors, Path(path) / "model.safetensors")
    with pytest.raises(RecipeError, match=r"has no token embedding \(embed_tokens.weight, nor a tied lm_head.weight"):
        build(load_recipe(recipe))


def test_a_checkpoint_that_is_not_paligemma_is_refused(tmp_path):
    llava_path, _, _ = llava_checkpoint(tmp_path)
    from vlablocks.recipes.pretrained import load_pretrained

    with pytest.raises(ValueError, match=r"is not a PaliGemma checkpoint: expected keys under .*model\.language_model\."):
        load_pretrained(build("tiny_pi0"), llava_path, layout="paligemma")


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_checkpoints_recipe_naming_a_file_outside_it_is_refused(tmp_path, no_pickle, where):
    """A checkpoint's weights are its model.safetensors: a timm ``weights_path`` in its recipe.yaml
    that leaves the directory (here a pickle beside it) is refused, naming the file and the key,
    and nothing is opened or unpickled."""
    torch.manual_seed(0)
    vla = build("tiny_pi0", overrides=["vision={type: timm, model_name: resnet18, image_size: 32}"]).eval()
    directory = vla.save_pretrained(tmp_path / "policy")
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"\x80\x04not really a pickle")
    recipe = (directory / "recipe.yaml").read_text()
    assert "model_name: resnet18" in recipe and "weights_path" not in recipe  # saved self-contained
    value = str(outside) if where == "absolute" else "../outside.pt"
    (directory / "recipe.yaml").write_text(recipe.replace("model_name: resnet18", f"model_name: resnet18\n  weights_path: {value}"))
    write_manifest(directory)
    with pytest.raises(CheckpointError, match=rf"policy/recipe.yaml: vision.weights_path: '{re.escape(value)}' points "
                                              r"outside the checkpoint"):
        from_pretrained(directory)
    (directory / "recipe.yaml").write_text(recipe)
    write_manifest(directory)
    loaded, batch = from_pretrained(directory).eval(), random_batch(vla, 2)
    torch.manual_seed(1)
    expected = vla.predict_action(batch)
    torch.manual_seed(1)
    assert torch.equal(loaded.predict_action(batch), expected)


def test_a_hub_model_id_is_fetched_without_pickles(tmp_path, monkeypatch):
    """``from_pretrained("org/name")`` fetches the repository through huggingface_hub (stubbed:
    no network here) asking only for safetensors / JSON / YAML / tokenizer files."""
    from fnmatch import fnmatch

    from vlablocks.io import hub

    torch.manual_seed(0)
    saved = build("tiny_pi0").eval().save_pretrained(tmp_path / "saved")
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle the fetch must skip")
    calls = []

    def fake_snapshot_download(repo_id: str, repo_type: str, revision: str | None, allow_patterns: list) -> str:
        calls.append((repo_id, repo_type, revision))
        target = tmp_path / "cache" / repo_id.replace("/", "--")
        for file in saved.rglob("*"):
            relative = file.relative_to(saved).as_posix()
            if file.is_file() and any(fnmatch(relative, pattern) for pattern in allow_patterns):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                (target / relative).write_bytes(file.read_bytes())
        return str(target)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    loaded = from_pretrained("someone/tiny-pi0")
    assert calls == [("someone/tiny-pi0", "model", None)]
    assert not (tmp_path / "cache" / "someone--tiny-pi0" / "pytorch_model.bin").exists()
    reference = from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))
    assert {"model.safetensors", "recipe.yaml", "manifest.json"} <= {p.name for p in (tmp_path / "cache" / "someone--tiny-pi0").iterdir()}
    assert not any(fnmatch(name, pattern) for name in ("pytorch_model.bin", "model.pt", "x.pkl") for pattern in hub.POLICY_FILES)
    with pytest.raises(FileNotFoundError, match=r"no such model directory \(nor a Hub model id"):
        from_pretrained(tmp_path / "missing")
