"""vlablocks.encoders: raw inputs -> tokens (time and suffix so far)."""

from vlablocks.encoders.suffix import (
    AdaRMSTimeFusion,
    ConcatMlpTimeFusion,
    SuffixEncoder,
    SuffixTokens,
    TimeTokenFusion,
)
from vlablocks.encoders.time import TimestepEmbedder, sinusoidal_embedding

__all__ = [
    "AdaRMSTimeFusion",
    "ConcatMlpTimeFusion",
    "SuffixEncoder",
    "SuffixTokens",
    "TimeTokenFusion",
    "TimestepEmbedder",
    "sinusoidal_embedding",
]
