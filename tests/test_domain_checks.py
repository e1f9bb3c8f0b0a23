"""Inputs that used to train or act silently on NaN are refused with a message that names them
(issue 19): recipe numbers out of their domain, non-finite statistics, non-finite actions."""

from __future__ import annotations

import math

import pytest
import torch

from vlablocks.blocks.attention import HeadSpace
from vlablocks.blocks.experts import ExpertSpec
from vlablocks.blocks.norms import AdaRMSNorm, RMSNorm
from vlablocks.heads.time_samplers import BetaTimeSampler
from vlablocks.policy.batch import BatchError
from vlablocks.policy.checks import random_batch
from vlablocks.policy.normalize import FeatureNormalizer
from vlablocks.policy.vla import NonFiniteActionError
from vlablocks.recipes import build
from vlablocks.recipes.loader import RecipeError
from vlablocks.train.groups import set_normalization

SPACE = HeadSpace(num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("theta", [0.0, -1.0, math.nan, math.inf])
def test_rope_theta_must_be_finite_and_positive(theta):
    with pytest.raises(ValueError, match=r"HeadSpace.rope_theta must be a finite number > 0; got"):
        HeadSpace(num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=theta)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf])
def test_norm_eps_must_be_finite_and_positive(eps):
    for make in (lambda: RMSNorm(4, eps=eps), lambda: AdaRMSNorm(4, 3, eps=eps),
                 lambda: ExpertSpec("vlm", 16, 32, SPACE, norm_eps=eps)):
        with pytest.raises(ValueError, match=r"the norm epsilon must be a finite number > 0"):
            make()


@pytest.mark.parametrize(("field", "value"), [("width", 0), ("mlp_dim", 0), ("mlp_dim", -3), ("width", 2.5)])
def test_expert_sizes_must_be_positive_ints(field, value):
    kwargs = {"width": 16, "mlp_dim": 32, field: value}
    with pytest.raises(ValueError, match=rf"ExpertSpec 'vlm': {field} must be an int >= 1; got {value}"):
        ExpertSpec("vlm", head_space=SPACE, **kwargs)


@pytest.mark.parametrize("kwargs", [{"alpha": math.nan}, {"beta": math.nan}, {"alpha": 0.0}, {"beta": math.inf},
                                    {"scale": math.nan}, {"offset": math.nan}])
def test_beta_time_sampler_parameters_reject_nan(kwargs):
    with pytest.raises(ValueError, match=r"BetaTimeSampler needs"):
        BetaTimeSampler(**kwargs)


@pytest.mark.parametrize(("override", "message"), [
    ("backbone.experts.0.norm_eps=-1", r"backbone\.experts\.0: .*the norm epsilon must be a finite number > 0; got -1"),
    ("backbone.experts.0.head_space.rope_theta=.nan", r"backbone\.experts\.0\.head_space: .*rope_theta must be a finite"),
    ("backbone.experts.1.mlp_dim=0", r"backbone\.experts\.1: .*mlp_dim must be an int >= 1; got 0"),
    ("head.time_sampler.alpha=.nan", r"head\.time_sampler: .*needs alpha > 0 and beta > 0, got alpha=nan"),
])
def test_recipe_numbers_out_of_domain_are_recipe_errors_at_their_key(override, message):
    with pytest.raises(RecipeError, match=message):
        build("tiny_pi0", overrides=[override], load_weights=False, device="meta")


@pytest.mark.parametrize(("stats", "message"), [
    ({"mean": [0.0, math.nan], "std": [1.0, 1.0]}, r"statistic 'mean' must be finite; dims \[1\]"),
    ({"mean": [0.0, 0.0], "std": [1.0, math.inf]}, r"statistic 'std' must be finite; dims \[1\]"),
    ({"mean": [0.0, 0.0], "std": [1.0, -0.5]}, r"statistic 'std' must be >= 0"),
    ({"mean": [0.0, 0.0], "std": [1.0, 1.0], "q01": [1.0, 0.0], "q99": [0.0, 1.0]}, r"'q01' must be <= 'q99'"),
])
def test_statistics_are_validated_when_set(stats, message):
    norm = FeatureNormalizer(3)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        norm.set_stats(**{k: torch.tensor(v) for k, v in stats.items()})
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())  # nothing half-set


def test_dataset_statistics_with_nan_name_the_feature():
    vla = build("tiny_pi0", load_weights=False)
    stats = {"action": {"mean": [0.0] * 5 + [math.nan], "std": [1.0] * 6},
             "observation.state": {"mean": [0.0] * 5, "std": [1.0] * 5}}
    with pytest.raises(ValueError, match=r"dataset statistics of 'action' \(meta/stats.json\) cannot normalise: "
                                         r"statistic 'mean' must be finite"):
        set_normalization(vla, stats)


def test_predict_action_refuses_to_return_non_finite_actions():
    torch.manual_seed(0)
    vla = build("tiny_llava3d_deepfusion", overrides=["head.num_steps=2"]).eval()
    batch = random_batch(vla, batch_size=2)
    assert torch.isfinite(vla.predict_action(batch)).all()
    with torch.no_grad():
        vla.denoiser.suffix_encoder.action_out_proj.weight[0, 0] = math.nan  # as a damaged, unverified checkpoint would
    with pytest.raises(NonFiniteActionError, match=r"predict_action produced \d+ non-finite of 128 action values"):
        vla.predict_action(batch)


@pytest.mark.parametrize("focal", [0.0, -96.0])
def test_intrinsics_without_positive_focal_lengths_are_refused(focal):
    vla = build("tiny_llava3d_deepfusion", overrides=["head.num_steps=2"]).eval()
    batch = random_batch(vla, batch_size=2)
    batch["intrinsics"][1, 0, 0, 0] = focal
    with pytest.raises(BatchError, match=rf"batch\['intrinsics'\]: expected pinhole K with focal lengths fx, fy > 0; "
                                         rf"got smallest {focal:g}"):
        vla.predict_action(batch)


@pytest.mark.parametrize("far", [1e30, 3e38, 2e4])
def test_depth_beyond_the_point_limit_is_invalid_like_inf(far):
    """A sensor's "no return" code (1e30) is documented as an invalid pixel: the actions are finite
    and equal to those for depth = inf, for every pixel or for one."""
    torch.manual_seed(0)
    vla = build("mt10_deepfusion", load_weights=False).eval()
    batch = random_batch(vla, batch_size=2)
    for pixels in (slice(None), (0, 0, 3, 3)):
        actions = {}
        for value in (far, math.inf):
            edited = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            edited["depth"][pixels] = value
            torch.manual_seed(1)
            actions[value] = vla.predict_action(edited)
        assert torch.isfinite(actions[far]).all()
        torch.testing.assert_close(actions[far], actions[math.inf], rtol=0, atol=0)


def test_a_degenerate_quantile_range_is_an_error_with_advice():
    """Delta actions are almost always 0: q01 = q99 = 0 but a rare 0.5 would normalise to 1e6."""
    vla = build("tiny_pi05", load_weights=False)
    stats = {"action": {"mean": [0.0] * 6, "std": [0.1] * 6, "q01": [-1.0] * 5 + [0.0], "q99": [1.0] * 5 + [0.0],
                        "min": [-1.0] * 5 + [-0.5], "max": [1.0] * 5 + [0.5]},
             "observation.state": {"mean": [0.0] * 5, "std": [1.0] * 5, "q01": [-1.0] * 5, "q99": [1.0] * 5}}
    with pytest.raises(ValueError, match=r"statistics of 'action' .* dims \[5\] have a degenerate quantile range "
                                         r"\(q01 \[0.0\], q99 \[0.0\], but min \[-0.5\], max \[0.5\]\): .*1e\+06; "
                                         r"normalise this feature with mean_std"):
        set_normalization(vla, stats)
    stats["action"]["min"][5], stats["action"]["max"][5] = 0.0, 0.0  # constant: -1 always, fine
    set_normalization(vla, stats)
    assert vla.normalizer["action"].q99[5] == 0.0
