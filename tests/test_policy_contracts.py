"""Policy-side contracts pinned value by value (gaps that mutation testing found: docs/mutation.md):
resize-with-pad geometry, collation, the smoke check, augmentation's device,
the loss's step mask, the image range, the weights' metadata and the inference options' refusals."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from safetensors import safe_open

from vlablocks.policy.augment import random_shift
from vlablocks.policy import batch as keys
from vlablocks.policy.batch import BatchError, collate
from vlablocks.policy.checks import random_batch, smoke_check
from vlablocks.policy import vla as vla_module
from vlablocks.policy.config import PolicyConfig
from vlablocks.policy.images import resize_with_pad
from vlablocks.policy.precision import apply_precision, parameter_dtypes, reduced_precision_parameters
from vlablocks.policy.inference import InferenceOptions, optimize_for_inference
from vlablocks.recipes import build, load_recipe


@pytest.mark.parametrize("align", ["center", "top_left"])
def test_resize_with_pad_places_a_white_image_on_black_padding(align):
    # 4 x 2 white image into 8 x 8: the long side 4 -> 8, the short one int(2 / 0.5) = 4; 4 columns of padding
    # split 2 + 2 ("center") or all 4 on the left ("top_left")
    images = torch.ones(1, 3, 4, 2)
    out = resize_with_pad(images, 8, align)
    assert out.shape == (1, 3, 8, 8)
    columns = out[0, 0].sum(dim=0)  # how white each column is
    white = (columns > 0).nonzero().flatten().tolist()
    expected_left = 2 if align == "center" else 4
    assert white == list(range(expected_left, expected_left + 4))
    torch.testing.assert_close(out[0, :, :, expected_left:expected_left + 4], torch.ones(3, 8, 4))


def test_resize_with_pad_keeps_inputs_of_the_size_and_refuses_unknown_alignment():
    images = torch.rand(2, 3, 8, 8)
    assert resize_with_pad(images, 8) is images
    with pytest.raises(ValueError, match=r"align must be 'center' or 'top_left'; got 'bottom'"):
        resize_with_pad(torch.rand(1, 3, 4, 2), 8, "bottom")


def test_collate_stacks_tensors_keeps_strings_and_all_none_keys():
    samples = [{"x": torch.tensor([1.0, 2.0]), "task": "pick", "depth": None, "n": 3},
               {"x": torch.tensor([3.0, 4.0]), "task": "place", "depth": None, "n": 4}]
    batch = collate(samples)
    assert torch.equal(batch["x"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and torch.equal(batch["n"], torch.tensor([3, 4]))
    assert batch["task"] == ["pick", "place"] and batch["depth"] is None
    mixed = collate([{"depth": None}, {"depth": torch.zeros(2)}])["depth"]  # not None everywhere: kept as values
    assert mixed[0] is None and torch.equal(mixed[1], torch.zeros(2))
    with pytest.raises(ValueError, match="collate needs at least one sample"):
        collate([])
    with pytest.raises(ValueError, match=r"sample 1 has keys \['y'\]; sample 0 has \['x'\]"):
        collate([{"x": 1}, {"y": 1}])
    with pytest.raises(ValueError, match=r"cannot stack batch key 'x': samples have shapes \[\(1,\), \(2,\)\]"):
        collate([{"x": torch.zeros(1)}, {"x": torch.zeros(2)}])


def test_smoke_check_reports_the_policys_shapes_gradients_and_finite_timings():
    torch.manual_seed(0)
    vla = build(load_recipe("tiny_pi0"))
    report = smoke_check(vla, batch_size=3, seed=1)
    assert report.action_shape == (3, vla.config.horizon, vla.config.action_dim)
    assert report.prefix_length == vla.encode(random_batch(vla, 3, seed=1)).prefix.embeds.shape[1]
    assert all(0 < t < 60_000 for t in (report.forward_ms, report.backward_ms, report.predict_ms))
    assert math.isfinite(report.loss) and report.loss > 0 and -1 <= report.vel_cosine <= 1
    # the same seed gives the same loss; the parameters that got no gradient are named, and only those
    assert smoke_check(vla, batch_size=3, seed=1).loss == report.loss
    trainable = {n for n, p in vla.named_parameters() if p.requires_grad}
    assert set(report.parameters_without_grad) < trainable and all(p.grad is None for p in vla.parameters())
    with torch.no_grad():
        for param in vla.parameters():
            param.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the loss is not finite: nan"):
        smoke_check(vla)


def test_random_shift_stays_on_the_images_device():
    # the meta device stands in for an accelerator: a table built on the CPU would not combine with meta tensors
    images = torch.empty(2, 1, 3, 8, 8, device="meta")
    shifted, depth, intrinsics = random_shift(images, 2, depth=torch.empty(2, 1, 8, 8, device="meta"),
                                              intrinsics=torch.empty(2, 1, 3, 3, device="meta"),
                                              generator=torch.Generator().manual_seed(0))
    assert shifted.device.type == depth.device.type == intrinsics.device.type == "meta"
    assert shifted.shape == images.shape


def _tiny(name: str = "tiny_pi0"):
    torch.manual_seed(0)
    return build(load_recipe(name))


def test_the_loss_averages_only_the_unpadded_steps_and_data_dims():
    # padded steps still enter the network (the chunk's tokens attend to each other, as in LeRobot), but their
    # errors, and those of the padding dims beyond the data's width, are left out of the mean
    vla = _tiny()
    vla.normalizer["action"].set_stats(mean=torch.zeros(4), std=torch.ones(4))  # 4-D data in a 6-D action space
    batch = random_batch(vla, 2, seed=0)
    mask = torch.ones(2, vla.config.horizon, dtype=torch.bool)
    mask[0, -2:] = False  # the episode ended two steps before the chunk did
    batch[keys.ACTION_MASK] = mask
    t = torch.full((2,), 0.4)
    noise = torch.randn(2, vla.config.horizon, vla.config.action_dim, generator=torch.Generator().manual_seed(1))
    errors = vla(batch, t=t, noise=noise, reduction="none").loss[0]  # [B, H, A]
    width = batch[keys.ACTIONS].shape[-1]
    valid = mask[:, :, None] & (torch.arange(vla.config.action_dim) < width)
    loss = vla(batch, t=t, noise=noise).loss
    torch.testing.assert_close(loss, errors[valid].mean())
    assert not torch.allclose(loss, errors[:, :, :width].mean())  # the mask matters here


def test_images_may_reach_exactly_one_but_not_beyond():
    vla = _tiny()
    batch = random_batch(vla, 2, seed=0)
    batch[keys.IMAGES] = torch.ones_like(batch[keys.IMAGES])
    batch[keys.IMAGES][0, 0, 0, 0, 0] = 0.0
    vla(batch)
    batch[keys.IMAGES][1, 0, 0, 0, 0] = 1.001
    with pytest.raises(BatchError, match=r"batch\['images'\]: expected values in \[0, 1\]; got min 0, max 1.001"):
        vla(batch)


def test_saved_weights_name_their_producer(tmp_path):
    vla = _tiny()
    vla.save_pretrained(tmp_path / "policy")
    with safe_open(str(tmp_path / "policy" / "model.safetensors"), "pt") as weights:
        assert weights.metadata() == {"format": "pt", "producer": "vlablocks"}


def test_int8_is_refused_off_the_cpu_and_a_dit_policy_is_told_what_fuses(caplog):
    vla = _tiny().to("meta")
    with pytest.raises(ValueError, match=r"quantize='int8' is dynamic CPU quantisation; the policy is on meta"):
        optimize_for_inference(vla, InferenceOptions(quantize="int8"))
    with caplog.at_level(logging.INFO, logger="vlablocks.policy.inference"):
        optimize_for_inference(_tiny(), InferenceOptions(fuse=True))
        assert "not a deep-fusion one" not in caplog.text
        optimize_for_inference(_tiny("tiny_llava3d_dit_layerwise"), InferenceOptions(fuse=True))
        assert "the denoiser is not a deep-fusion one: only its gated MLPs and attention projections fuse" in caplog.text


def test_policy_and_precision_errors_name_the_field_and_values():
    with pytest.raises(ValueError, match=r"state_mode='none' with state_dim=5: give a state_dim exactly when the state "
                                         r"enters the model"):
        PolicyConfig(horizon=4, action_dim=6, state_dim=5, state_mode="none")
    with pytest.raises(ValueError, match=r"policy.precision must be one of \['float32', 'bfloat16'\]; got 'float16'"):
        apply_precision(_tiny(), "float16")


def test_declared_dtypes_are_float32_everywhere_for_a_float32_policy():
    vla = _tiny()
    assert set(parameter_dtypes(vla).values()) == {torch.float32}
    vla.config = dataclasses.replace(vla.config, precision="bfloat16")
    declared = parameter_dtypes(vla)
    assert {n for n, d in declared.items() if d == torch.bfloat16} == set(reduced_precision_parameters(vla))


def test_image_shift_moves_depth_and_intrinsics_with_the_images(monkeypatch):
    vla = _tiny("tiny_llava3d_deepfusion")
    vla.config = dataclasses.replace(vla.config, image_shift=2)
    batch = random_batch(vla, 2, seed=0)
    seen = []

    def spy(images, max_shift, depth=None, intrinsics=None, generator=None):
        seen.append((max_shift, depth, intrinsics))
        return random_shift(images, max_shift, depth, intrinsics, generator)

    monkeypatch.setattr(vla_module, "random_shift", spy)
    vla.train()(batch, generator=torch.Generator().manual_seed(0))
    [(max_shift, depth, intrinsics)] = seen
    assert max_shift == 2 and depth is batch[keys.DEPTH] and intrinsics is batch[keys.INTRINSICS]


def test_resize_with_pad_centres_by_default():
    images = torch.rand(1, 3, 4, 2)
    assert torch.equal(resize_with_pad(images, 8), resize_with_pad(images, 8, "center"))


def test_a_vision_policy_needs_images_and_geometry_of_the_same_batch():
    vla = _tiny("tiny_llava3d_deepfusion")
    batch = random_batch(vla, 2, seed=0)
    with pytest.raises(BatchError, match=r"images"):
        vla.predict_action({k: v for k, v in batch.items() if k != keys.IMAGES})
    with pytest.raises(BatchError, match=r"intrinsics"):
        vla.predict_action({**batch, keys.INTRINSICS: torch.cat([batch[keys.INTRINSICS]] * 2)})  # B = 4, not 2


def test_random_batch_geometry_is_a_plane_about_a_metre_away_seen_by_a_centred_pinhole():
    vla = _tiny("tiny_llava3d_deepfusion")
    batch = random_batch(vla, 2, seed=0)
    size = batch[keys.IMAGES].shape[-1]
    depth = batch[keys.DEPTH]
    assert 1.0 <= float(depth.min()) and float(depth.max()) <= 1.1 and float(depth.std()) > 0
    expected = torch.tensor([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
    assert torch.equal(batch[keys.INTRINSICS], expected.expand_as(batch[keys.INTRINSICS]))


@pytest.mark.parametrize("key", [keys.DEPTH, keys.INTRINSICS, keys.IMAGE_MASK])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_camera_keys_must_agree_with_the_images_on_batch_and_camera_count(key, axis):
    vla = _tiny("tiny_llava3d_deepfusion")
    batch = random_batch(vla, 2, seed=0)
    if key == keys.IMAGE_MASK:
        batch[key] = torch.ones(2, 1, dtype=torch.bool)
        vla.predict_action(batch)  # well-formed
    value = batch[key]
    batch[key] = torch.cat([value, value], dim=axis)  # one more sample (axis 0) or camera (axis 1) than the images
    with pytest.raises(BatchError, match=rf"batch\['{key}'\]"):
        vla.predict_action(batch)
