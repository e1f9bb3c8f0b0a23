"""vlablocks.heads: flow matching and the denoisers that predict velocity."""

from vlablocks.heads.deep_fusion import DeepFusionContext, DeepFusionDenoiser
from vlablocks.heads.denoiser import Denoiser, Prefix
from vlablocks.heads.flow_matching import SOLVERS, FlowMatchingHead, FlowMatchingOutput, integrate, masked_mse
from vlablocks.heads.rtc import guidance_weight, rtc_sample, soft_mask
from vlablocks.heads.time_samplers import BetaTimeSampler, UniformTimeSampler

__all__ = [
    "SOLVERS",
    "BetaTimeSampler",
    "DeepFusionContext",
    "DeepFusionDenoiser",
    "Denoiser",
    "FlowMatchingHead",
    "FlowMatchingOutput",
    "Prefix",
    "UniformTimeSampler",
    "guidance_weight",
    "integrate",
    "masked_mse",
    "rtc_sample",
    "soft_mask",
]
