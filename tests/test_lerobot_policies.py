"""LeRobot 0.6.1's own pi0 / pi0.5 policies, converted, predict what LeRobot predicted.

The fixtures in ``tests/data/lerobot_policies`` (README there) were written by LeRobot's policy
classes at tiny sizes with random weights, with the inputs, noise and flow times they were given
and what they computed: per-element losses, gradients and sampled chunks. This suite converts
them with :mod:`vlablocks.convert.lerobot` and compares; it does not need LeRobot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlablocks.convert.lerobot import (
    PREPROCESSOR_FILE, ConversionError, convert_lerobot, load_lerobot_policy, read_policy,
)
from vlablocks.convert.lerobot_config import FAMILIES
from vlablocks.policy.images import resize_with_pad
from vlablocks.recipes.builder import from_pretrained

FIXTURES = Path(__file__).resolve().parent / "data" / "lerobot_policies"
TOKENIZER = FIXTURES / "tokenizer"
#: the tiny SigLIP's head count: the one size neither config.json nor the weights carry.
TINY = ["vision.config.num_attention_heads=2"]
POLICIES = ("pi0", "pi05")
TOLERANCE = 1e-5


def reference(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((FIXTURES / name / "reference.json").read_text()), load_file(FIXTURES / name / "reference.safetensors")


def raw_batch(info: dict, ref: dict[str, torch.Tensor]) -> dict:
    """What a robot gives the policy: a 24 x 40 camera in [0, 1], raw state and actions, the task."""
    return {"images": ref["raw.image"][:, None], "task": list(info["tasks_raw"]), "state": ref["raw.state"],
            "actions": ref["raw.action"]}


@pytest.fixture(scope="module", params=POLICIES)
def converted(request, tmp_path_factory):
    """``(name, the policy converted and read back by from_pretrained)``."""
    out = tmp_path_factory.mktemp(request.param) / "converted"
    convert_lerobot(FIXTURES / request.param, out, tokenizer=TOKENIZER, overrides=TINY)
    return request.param, from_pretrained(out).eval()


def test_prompt_and_image_are_what_lerobots_model_saw(converted):
    name, vla = converted
    info, ref = reference(name)
    batch = raw_batch(info, ref)
    vla.check_batch(batch, actions=True)  # any image size: the policy resizes with padding
    tasks = [t + "\n" for t in info["tasks_raw"]] if vla.config.task_newline else info["tasks_raw"]
    assert vla.config.task_newline == (name == "pi0")  # pi0.5 writes its own prompt
    if name == "pi0":
        ids, mask = vla.text.tokenizer(tasks)
        expected = ref["model.lang_tokens"][:, : ids.shape[1]]
        assert torch.equal(ids[mask], expected[ref["model.lang_masks"][:, : ids.shape[1]]])
        assert torch.equal(mask, ref["model.lang_masks"][:, : ids.shape[1]])
        assert not ref["model.lang_masks"][:, ids.shape[1]:].any()
    assert vla.config.resize_images == "pad_center"
    resized = resize_with_pad(ref["raw.image"], vla.vision.image_size, "center")
    torch.testing.assert_close(resized * 2 - 1, ref["model.image"], rtol=0, atol=1e-6)


def test_per_element_loss_and_training_loss_match(converted):
    name, vla = converted
    info, ref = reference(name)
    out = vla(raw_batch(info, ref), t=ref["time"], noise=ref["noise"], reduction="none")
    loss = out.loss.squeeze(0)
    assert loss.shape == ref["loss_per_element"].shape == (2, 4, 8)
    assert (loss - ref["loss_per_element"]).abs().max().item() <= TOLERANCE
    mean = vla(raw_batch(info, ref), t=ref["time"], noise=ref["noise"]).loss
    assert abs(mean.item() - ref["policy_forward_loss"].item()) <= TOLERANCE  # LeRobot: mean over the 3 real dims


def test_gradients_match(converted):
    name, vla = converted
    info, ref = reference(name)
    vla.zero_grad()
    out = vla(raw_batch(info, ref), t=ref["time"], noise=ref["noise"], reduction="none")
    out.loss.squeeze(0)[:, :, :3].sum().backward()
    params = dict(vla.named_parameters())
    config = json.loads((FIXTURES / name / "config.json").read_text())
    key = FAMILIES[name].keys(config, {k: list(v.shape) for k, v in load_file(FIXTURES / name / "model.safetensors").items()})
    assert len(info["grad_params"]) >= 7
    for lerobot_name in info["grad_params"]:
        grad, expected = params[key(lerobot_name)].grad, ref[f"grad.{lerobot_name}"]
        if not expected.any():  # pi0.5's time MLP: LeRobot zero-initialises the adaRMS dense layers after it
            assert not grad.any(), lerobot_name
            continue
        relative = (grad - expected).abs().max() / expected.abs().max()
        assert relative.item() <= TOLERANCE, (lerobot_name, relative.item())


def test_sampled_actions_match(converted):
    name, vla = converted
    info, ref = reference(name)
    batch = raw_batch(info, ref)
    actions = vla.predict_action(batch, noise=ref["sample_noise"])
    assert actions.shape == ref["predict_action_chunk_unnormalized"].shape == (2, 4, 3)
    assert (actions - ref["predict_action_chunk_unnormalized"]).abs().max().item() <= TOLERANCE
    prefix, state = vla.encode(batch)
    chunk = vla.head.sample(prefix, state, noise=ref["sample_noise"])  # normalised, padded dims included
    assert (chunk - ref["sampled_actions"]).abs().max().item() <= TOLERANCE


def test_converted_directory(tmp_path):
    out = convert_lerobot(FIXTURES / "pi0", tmp_path / "out", tokenizer=TOKENIZER, overrides=TINY)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"model.safetensors", "recipe.yaml", "manifest.json", "conversion.json", "lerobot/config.json",
            "lerobot/policy_preprocessor.json", "lerobot/policy_postprocessor.json"} <= set(names)
    assert any(n.startswith("tokenizer/") for n in names)  # the tokenizer travels with the policy
    recipe = (out / "recipe.yaml").read_text()
    assert str(TOKENIZER) not in recipe and "norm_convention: lerobot" in recipe
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="busy"):
        convert_lerobot(FIXTURES / "pi0", tmp_path / "busy", tokenizer=TOKENIZER, overrides=TINY)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def copy_policy(tmp_path: Path, name: str, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    """A copy of a fixture policy with tensors dropped from / added to its weights."""
    target = tmp_path / name
    target.mkdir()
    for path in (FIXTURES / name).iterdir():
        if path.name not in ("model.safetensors", "reference.safetensors", "reference.json", "keys_full.json"):
            (target / path.name).write_bytes(path.read_bytes())
    weights = {k: v for k, v in load_file(FIXTURES / name / "model.safetensors").items() if k not in drop}
    save_file({**weights, **(add or {})}, str(target / "model.safetensors"))
    return target


LM_HEAD = "model.paligemma_with_expert.paligemma.lm_head.weight"
EMBED = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"


def test_embedding_tied_to_lm_head_is_used(tmp_path, caplog):
    """Released pi0 checkpoints keep the embedding only as lm_head: it becomes the embedding."""
    source = copy_policy(tmp_path, "pi0", drop=(EMBED,))
    with caplog.at_level(logging.INFO, logger="vlablocks.convert.lerobot"):
        vla = load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)
    assert torch.equal(vla.text.embedding.weight, load_file(FIXTURES / "pi0" / "model.safetensors")[LM_HEAD])
    assert "text.embedding.weight is the tied" in caplog.text


LACKS = "tensors the policy needs but the checkpoint lacks: "


@pytest.mark.parametrize("drop, message", [
    ((EMBED, LM_HEAD), r"missing the token embedding: neither .*embed_tokens.weight' nor the tied .*lm_head.weight'"),
    (("model.state_proj.weight",), LACKS + "head.denoiser.suffix_encoder.state_proj.weight"),
    (("model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj.weight",),
     LACKS + r"head.denoiser.stack.layers.1.mlp.*down"),
])
def test_a_missing_tensor_is_an_error_naming_it(tmp_path, drop, message):
    """Never a random language embedding, never a silently random layer."""
    source = copy_policy(tmp_path, "pi0", drop=drop)
    with pytest.raises(ConversionError, match=message):
        load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)


def test_unknown_tensor_and_wrong_shape_are_errors(tmp_path):
    source = copy_policy(tmp_path, "pi0", add={"model.extra_head.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match="keys the key table does not know: model.extra_head.weight"):
        load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)
    with pytest.raises(Exception, match="shape|size"):  # a head count that does not fit the weights
        load_lerobot_policy(FIXTURES / "pi0", tokenizer=TOKENIZER, overrides=["vision.config.num_attention_heads=3"])


def test_processor_steps_vlablocks_cannot_reproduce_are_refused(tmp_path):
    source = copy_policy(tmp_path, "pi0")
    steps = json.loads((source / PREPROCESSOR_FILE).read_text())
    relative = next(s for s in steps["steps"] if s["registry_name"] == "relative_actions_processor")
    relative["config"]["enabled"] = True
    (source / PREPROCESSOR_FILE).write_text(json.dumps(steps))
    with pytest.raises(ConversionError, match="'relative_actions_processor' is enabled"):
        load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)
    steps["steps"] = [{"registry_name": "my_crop_processor", "config": {}}]
    (source / PREPROCESSOR_FILE).write_text(json.dumps(steps))
    with pytest.raises(ConversionError, match="processor step 'my_crop_processor' is not one vlablocks reproduces"):
        load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)


def test_statistics_of_a_checkpoint_without_processors(tmp_path):
    """Checkpoints from before LeRobot's processors keep the statistics as normalize buffers."""
    stats = read_policy(FIXTURES / "pi0").stats
    buffers = {f"normalize_inputs.buffer_observation_state.{k}": v for k, v in stats["observation.state"].items()}
    buffers |= {f"unnormalize_outputs.buffer_action.{k}": v for k, v in stats["action"].items()}
    source = copy_policy(tmp_path, "pi0", add=buffers)
    for path in source.glob("policy_*"):
        path.unlink()
    vla = load_lerobot_policy(source, tokenizer=TOKENIZER, overrides=TINY)
    assert torch.equal(vla.normalizer["action"].std[:3], stats["action"]["std"])
    assert torch.equal(vla.normalizer["state"].mean[:4], stats["observation.state"]["mean"])


def test_missing_tokenizer_offline_is_one_clear_error():
    with pytest.raises(ConversionError, match=r"tokenizer: google/paligemma-3b-pt-224: .*--tokenizer DIR"):
        load_lerobot_policy(FIXTURES / "pi0", overrides=TINY)  # conftest sets HF_HUB_OFFLINE=1


def test_not_a_lerobot_policy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"config.json: type: expected one of \[.*'pi0'.*\]; got 'act'"):
        load_lerobot_policy(tmp_path, tokenizer=TOKENIZER)


def test_lerobot_normalisation_convention():
    """LeRobot: eps 1e-8 on std going in, none coming out; quantiles divide by q99 - q01, eps only where 0."""
    from vlablocks.policy.normalize import FeatureNormalizer

    x = torch.tensor([[0.5, -2.0, 3.0]])
    mean_std = FeatureNormalizer(4, "mean_std", convention="lerobot")
    mean_std.set_stats(mean=torch.tensor([0.1, 0.2, 0.3]), std=torch.tensor([2.0, 0.0, 0.5]))
    y = mean_std.normalize(x)
    torch.testing.assert_close(y[0, :3], (x[0] - torch.tensor([0.1, 0.2, 0.3])) / (torch.tensor([2.0, 0.0, 0.5]) + 1e-8))
    assert y[0, 3] == 0  # the padding dim
    torch.testing.assert_close(mean_std.unnormalize(y), y[:, :3] * torch.tensor([2.0, 0.0, 0.5]) + torch.tensor([0.1, 0.2, 0.3]))
    quantile = FeatureNormalizer(3, "quantile", convention="lerobot")
    quantile.set_stats(q01=torch.tensor([-1.0, 2.0, 0.0]), q99=torch.tensor([3.0, 2.0, 1.0]))
    y = quantile.normalize(x)
    torch.testing.assert_close(y, torch.tensor([[2 * 1.5 / 4 - 1, 2 * -4.0 / 1e-8 - 1, 2 * 3.0 - 1]]))
    torch.testing.assert_close(quantile.unnormalize(y), torch.tensor([[0.5, -2.0, 3.0]]))
    assert "convention='lerobot'" in repr(quantile)
    with pytest.raises(ValueError, match="convention must be 'vlablocks' or 'lerobot'; got 'openpi'"):
        FeatureNormalizer(3, convention="openpi")


@pytest.mark.parametrize("align, top, left", [("center", 6, 0), ("top_left", 13, 0)])
def test_resize_with_pad_places_the_image(align, top, left):
    """A 19 x 32 frame in a 32 x 32 canvas: rows [top, top + 19) hold it, the rest is black."""
    image = torch.rand(1, 3, 38, 64) * 0.5 + 0.25
    out = resize_with_pad(image, 32, align)
    assert out.shape == (1, 3, 32, 32)
    rows = out.amax(dim=(1, 3))[0] > 0
    assert rows.nonzero().flatten().tolist() == list(range(top, top + 19))
    torch.testing.assert_close(out[:, :, top:top + 19, left:], torch.nn.functional.interpolate(
        image, size=(19, 32), mode="bilinear", align_corners=False))
    assert resize_with_pad(out, 32, align) is out


def test_policy_resize_refuses_geometry():
    from vlablocks.recipes.builder import build

    with pytest.raises(ValueError, match="resize_images=.pad_center. with a geometry encoder"):
        build("tiny_llava3d_deepfusion", ["policy.resize_images=pad_center"])


def test_pi05_with_eager_attention_is_bitwise_lerobots(tmp_path):
    """LeRobot's pi0 / pi0.5 run eager attention: with the same kernel the converted pi0.5's
    per-element loss and actions are LeRobot's bit for bit (pi0 and SmolVLA, eager too, differ in
    the last bits: 1.4e-6 and 1.9e-6 on the loss; where they round differently was not traced)."""
    out = convert_lerobot(FIXTURES / "pi05", tmp_path / "pi05", tokenizer=TOKENIZER, overrides=TINY)
    vla = from_pretrained(out).eval()
    vla.backbone.set_attention_backend("eager")
    info, ref = reference("pi05")
    with torch.no_grad():
        loss = vla(raw_batch(info, ref), t=ref["time"], noise=ref["noise"], reduction="none").loss.squeeze(0)
    assert torch.equal(loss, ref["loss_per_element"])
    assert torch.equal(vla.predict_action(raw_batch(info, ref), noise=ref["sample_noise"]),
                       ref["predict_action_chunk_unnormalized"])
