"""vlablocks.encoders: raw inputs -> tokens (vision, geometry, text, time, suffix)."""

from vlablocks.encoders.geometry import (
    FrequencyPositionEncoding,
    GeometryEncoder,
    LLaVA3DPositionEncoding,
    nerf_encoding,
    voxel_mean_pool,
)
from vlablocks.encoders.points import patch_points, points_from_rays, unproject_depth
from vlablocks.encoders.suffix import (
    AdaRMSTimeFusion,
    ConcatMlpTimeFusion,
    SuffixEncoder,
    SuffixTokens,
    TimeTokenFusion,
)
from vlablocks.encoders.text import ByteTokenizer, HFTokenizer, TextEncoder
from vlablocks.encoders.time import TimestepEmbedder, sinusoidal_embedding
from vlablocks.encoders.projectors import LinearProjector, Mlp2xGeluProjector, PixelShuffleProjector
from vlablocks.encoders.siglip import SiglipVision
from vlablocks.encoders.timm_vision import TimmVision
from vlablocks.encoders.vision import PatchViT

__all__ = [
    "AdaRMSTimeFusion",
    "ByteTokenizer",
    "ConcatMlpTimeFusion",
    "FrequencyPositionEncoding",
    "GeometryEncoder",
    "HFTokenizer",
    "LLaVA3DPositionEncoding",
    "LinearProjector",
    "Mlp2xGeluProjector",
    "PatchViT",
    "PixelShuffleProjector",
    "SiglipVision",
    "SuffixEncoder",
    "SuffixTokens",
    "TextEncoder",
    "TimeTokenFusion",
    "TimestepEmbedder",
    "TimmVision",
    "nerf_encoding",
    "patch_points",
    "points_from_rays",
    "sinusoidal_embedding",
    "unproject_depth",
    "voxel_mean_pool",
]
