"""forward / predict_action refuse a batch that does not fit the policy with one error type,
BatchError, whose message names the key, the expected and the received value."""

from __future__ import annotations

import re

import pytest
import torch
from vlablocks.recipes.builder import build

from vlablocks.policy.batch import BatchError
from vlablocks.policy.checks import random_batch


@pytest.fixture(scope="module")
def geometric():
    """tiny_llava3d_deepfusion: 96 px images with depth geometry, state 4."""
    torch.manual_seed(0)
    return build("tiny_llava3d_deepfusion").eval()


@pytest.fixture(scope="module")
def pi0():
    torch.manual_seed(0)
    return build("tiny_pi0").eval()


def changed(vla, **changes):
    batch = random_batch(vla, 2)
    for key, value in changes.items():
        if value is DROP:
            del batch[key]
        else:
            batch[key] = value(batch[key]) if callable(value) else value
    return batch


DROP = object()


def expect(vla, batch, message, actions=True):
    """Both entry points give the same error (predict_action only where the key is not an action key)."""
    with pytest.raises(BatchError, match=message):
        vla(batch)
    if not actions:
        with pytest.raises(BatchError, match=message):
            vla.predict_action(batch)


def test_a_valid_batch_passes_and_unread_keys_are_ignored(geometric, pi0):
    for vla in (geometric, pi0):
        batch = {**random_batch(vla, 2), "episode_index": [3, 4], "extra": torch.full((5,), float("nan"))}
        assert torch.isfinite(vla(batch).loss)
        assert vla.predict_action(batch).shape == (2, vla.config.horizon, vla.config.action_dim)
    batch = random_batch(pi0, 2)
    del batch["actions"]
    assert pi0.predict_action(batch).shape[0] == 2  # actions are not needed to act


def test_missing_keys(geometric, pi0):
    expect(geometric, changed(geometric, images=DROP), r"batch\['images'\] is missing: this policy reads images \[B, N, 3, 96, 96\]", actions=False)
    expect(geometric, changed(geometric, state=DROP), r"batch\['state'\] is missing: this policy reads state \[B, S\] with S <= 4", actions=False)
    expect(pi0, changed(pi0, actions=DROP), r"batch\['actions'\] is missing: this policy reads actions \[B, 4, A\] with A <= 6")
    expect(geometric, changed(geometric, depth=DROP), r"batch\['depth'\] is missing: this policy has a geometry encoder", actions=False)
    expect(geometric, changed(geometric, intrinsics=DROP), r"batch\['intrinsics'\] is missing: this policy reads intrinsics \[B, N, 3, 3\]",
           actions=False)
    expect(pi0, changed(pi0, task=DROP), r"batch\['task'\]: expected a list of B instruction strings; got NoneType None", actions=False)


def test_types_and_shapes(geometric, pi0):
    expect(pi0, changed(pi0, state=[[0.0] * 5] * 2), r"batch\['state'\]: expected a tensor state \[B, S\] with S <= 5; got list", actions=False)
    expect(pi0, changed(pi0, images=lambda x: x[:, 0]),
           r"batch\['images'\]: expected images \[B, N, 3, 32, 32\]; got shape \[2, 3, 32, 32\]", actions=False)
    expect(pi0, changed(pi0, images=lambda x: x[..., :16]),
           r"batch\['images'\]: expected images \[B, N, 3, 32, 32\] with size 32 in dim 4; got shape \[2, 1, 3, 32, 16\]", actions=False)
    expect(pi0, changed(pi0, state=torch.zeros(2, 9)),
           r"batch\['state'\]: expected at most 5 dims \(policy\.state_dim\); got shape \[2, 9\]", actions=False)
    expect(pi0, changed(pi0, actions=torch.zeros(2, 4, 7)),
           r"batch\['actions'\]: expected at most 6 dims \(policy\.action_dim\); got shape \[2, 4, 7\]")
    expect(pi0, changed(pi0, actions=torch.zeros(2, 5, 6)),
           r"batch\['actions'\]: expected actions \[B, 4, A\] with A <= 6 with size 4 in dim 1; got shape \[2, 5, 6\]")
    expect(geometric, changed(geometric, intrinsics=lambda k: k[:, :, :2]),
           r"batch\['intrinsics'\]: expected intrinsics \[B, N, 3, 3\] with size 3 in dim 2; got shape \[2, 1, 2, 3\]", actions=False)


def test_batch_and_camera_counts_must_agree(geometric, pi0):
    expect(pi0, changed(pi0, state=torch.zeros(3, 5)),
           r"batch\['state'\]: expected state \[B, S\] with S <= 5 with B = 2 \(as in the other keys\); got shape \[3, 5\]", actions=False)
    expect(pi0, changed(pi0, task=["one task"]),
           r"batch\['task'\]: expected B = 2 strings \(as in the other keys\); got 1", actions=False)
    expect(geometric, changed(geometric, depth=lambda d: d.expand(2, 2, 96, 96)),
           r"batch\['depth'\]: expected depth \[B, N, H, W\] with N = 1 \(as in the other keys\); got shape \[2, 2, 96, 96\]",
           actions=False)
    expect(pi0, changed(pi0, task="pick up the red block"),
           r"batch\['task'\]: expected a list of B instruction strings; got str 'pick up the red block'", actions=False)
    expect(pi0, changed(pi0, task=["a", 3]), r"batch\['task'\]: expected a list of B instruction strings; got a list with \['int', 'str'\]",
           actions=False)
    empty = {k: v[:0] for k, v in random_batch(pi0, 2).items()}
    expect(pi0, empty, r"the batch is empty \(B = 0\)", actions=False)


def test_dtypes(pi0):
    expect(pi0, changed(pi0, state=lambda s: s.double()),
           r"batch\['state'\]: expected a float32 / bfloat16 / float16 tensor; got torch\.float64", actions=False)
    expect(pi0, changed(pi0, images=lambda x: (x * 255).to(torch.uint8)),
           r"batch\['images'\]: expected a float32 / bfloat16 / float16 tensor; got torch\.uint8 \(scale uint8 images to \[0, 1\]\)",
           actions=False)
    expect(pi0, changed(pi0, action_mask=torch.ones(2, 4)), r"batch\['action_mask'\]: expected a bool tensor; got torch\.float32")
    expect(pi0, changed(pi0, image_mask=torch.ones(2, 1, dtype=torch.long)),
           r"batch\['image_mask'\]: expected a bool tensor; got torch\.int64", actions=False)


def test_devices(pi0):
    expect(pi0, changed(pi0, state=lambda s: s.to("meta")),
           re.escape("batch['state']: expected a tensor on cpu (the policy's device); got meta (vlablocks.policy.batch.to_device moves a batch)"),
           actions=False)


def test_values(geometric, pi0):
    def poke(value):
        def apply(x):
            x = x.clone()
            x.view(-1)[3] = value
            return x
        return apply

    expect(pi0, changed(pi0, state=poke(float("nan"))), r"batch\['state'\]: expected finite values; got 1 NaN / inf of 10", actions=False)
    expect(pi0, changed(pi0, actions=poke(float("inf"))), r"batch\['actions'\]: expected finite values; got 1 NaN / inf of 48")
    expect(pi0, changed(pi0, images=lambda x: x * 255),
           r"batch\['images'\]: expected values in \[0, 1\]; got min 0\.\d+, max 25\d", actions=False)
    expect(pi0, changed(pi0, images=poke(-0.5)), r"batch\['images'\]: expected values in \[0, 1\]; got min -0\.5, max", actions=False)
    expect(geometric, changed(geometric, intrinsics=poke(float("nan"))),
           r"batch\['intrinsics'\]: expected finite values; got 1 NaN / inf of 18", actions=False)


def test_not_a_mapping(pi0):
    with pytest.raises(BatchError, match=r"the batch must be a mapping of batch keys; got list"):
        pi0.predict_action([torch.zeros(1)])


def test_invalid_geometry_pixels_are_not_errors(geometric):
    """NaN / inf / non-positive depth marks pixels without geometry (the geometry encoder masks them)."""
    batch = random_batch(geometric, 2)
    depth = batch["depth"].clone()
    depth[0, 0, :10] = float("nan")
    depth[1, 0, :5] = 0.0
    depth[1, 0, 5:8] = -1.0
    actions = geometric.predict_action({**batch, "depth": depth})
    assert torch.isfinite(actions).all()
