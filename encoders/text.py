"""Text: tokenizers (texts -> right-padded ids + mask) and the token embedding.

Two tokenizers share one call contract, ``tokenizer(texts) -> (ids [B, L] long, mask [B, L]
bool)``, right-padded to the longest text of the batch and truncated to ``max_length``
(truncation logs one warning per tokenizer, then stays silent):

- :class:`ByteTokenizer`: UTF-8 bytes, needs no files (the offline default);
- :class:`HFTokenizer`: any local transformers tokenizer (``local_files_only=True``).

:class:`TextEncoder` embeds the ids and applies the embedding scale exactly once (``sqrt(width)``
for Gemma / pi0 and SmolVLA, 1 for LLaMA).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: where a checkpoint keeps its tokenizer files, relative to the checkpoint directory.
TOKENIZER_DIR = "tokenizer"


@runtime_checkable
class Tokenizer(Protocol):
    """What :class:`TextEncoder` needs from a tokenizer."""

    vocab_size: int
    max_length: int

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int; got {max_length!r}")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"texts must be a list of str; got {type(texts).__name__} {texts!r:.80}")
    if len(texts) == 0:
        raise ValueError("texts must hold at least one text; got an empty list")
    return list(texts)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest one.

    Returns ``ids [B, L]`` long (``pad_id`` after each sequence) and ``mask [B, L]`` bool (True on
    real tokens), ``L = max(len)``.
    """
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask


class _TruncationWarning:
    """Logs the first truncation of a tokenizer instance at WARNING level, later ones not at all."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, owner: str, max_length: int) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(
                "%s truncated a text to max_length=%d tokens (warned once per tokenizer)", owner, max_length
            )


class ByteTokenizer:
    """UTF-8 byte tokenizer that needs no files.

    Ids: ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, byte ``b`` -> ``b + 3``;
    ``vocab_size = 259``. Each text becomes ``[BOS] bytes [EOS]`` (``add_bos`` / ``add_eos``).
    Texts longer than ``max_length`` ids lose their last bytes, cut at a character boundary so
    the kept bytes stay valid UTF-8 (BOS and EOS are kept); the first truncation logs a warning.

    Args:
        max_length: most ids per text, special tokens included.
        add_bos: prepend ``BOS_ID``.
        add_eos: append ``EOS_ID``.
    """

    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    BYTE_OFFSET = 3
    vocab_size = 256 + BYTE_OFFSET

    def __init__(self, max_length: int, add_bos: bool = True, add_eos: bool = False) -> None:
        _check_max_length(max_length)
        self.prefix = [self.BOS_ID] if add_bos else []
        self.suffix = [self.EOS_ID] if add_eos else []
        budget = max_length - len(self.prefix) - len(self.suffix)
        if budget < 0:
            raise ValueError(f"max_length must leave room for BOS/EOS ({-budget} more needed); got {max_length}")
        self.max_length = max_length
        self.pad_id = self.PAD_ID
        self._budget = budget
        self._warn = _TruncationWarning()

    def encode(self, text: str) -> list[int]:
        """One text -> ids ``[BOS] bytes [EOS]``, at most ``max_length`` long."""
        data = text.encode("utf-8")
        if len(data) > self._budget:
            cut = self._budget
            while cut > 0 and (data[cut] & 0xC0) == 0x80:  # never split a multi-byte character
                cut -= 1
            data = data[:cut]
            self._warn(type(self).__name__, self.max_length)
        return self.prefix + [byte + self.BYTE_OFFSET for byte in data] + self.suffix

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B strings) -> ``ids [B, L]`` long, ``mask [B, L]`` bool, right-padded."""
        return pad_right([self.encode(text) for text in _check_texts(texts)], self.pad_id)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """``ids [L]`` -> text; special and pad ids are skipped, invalid UTF-8 is replaced."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i - self.BYTE_OFFSET for i in values if i >= self.BYTE_OFFSET).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local transformers tokenizer under the toolkit's call contract.

    ``AutoTokenizer.from_pretrained(path, local_files_only=True)``; special tokens are added as
    the tokenizer defines them (e.g. LLaMA's BOS). Too-long texts are truncated by transformers
    (special tokens kept), with one warning per instance. Pad positions are excluded by the mask,
    so the pad id only needs to be a valid embedding row: the tokenizer's pad token, else its
    EOS, else 0.

    Args:
        path: local tokenizer directory.
        max_length: most ids per text, special tokens included.

    Attributes:
        tokenizer: the transformers tokenizer.
        vocab_size: ``len(tokenizer)`` (added tokens included).
    """

    def __init__(self, path: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        _check_max_length(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        self.vocab_size = len(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (self.tokenizer.eos_token_id or 0)
        self._warn = _TruncationWarning()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B strings) -> ``ids [B, L]`` long, ``mask [B, L]`` bool, right-padded."""
        texts = _check_texts(texts)
        sequences = self.tokenizer(texts)["input_ids"]
        if max(len(seq) for seq in sequences) > self.max_length:
            self._warn(type(self).__name__, self.max_length)
            sequences = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return pad_right(sequences, self.pad_id)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """``ids [L]`` -> text, special tokens skipped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(values, skip_special_tokens=True)

    def export_recipe(self, node: Mapping[str, Any], directory: Path) -> dict[str, Any]:
        """Save the tokenizer files into ``directory/tokenizer``; the node then points there."""
        self.tokenizer.save_pretrained(str(Path(directory) / TOKENIZER_DIR))
        return {**node, "path": TOKENIZER_DIR}


class TextEncoder(nn.Module):
    """Texts -> token embeddings times ``embed_scale`` (applied here and nowhere else).

    ``embed_scale``: ``None`` means 1.0 (LLaMA); Gemma / pi0 and SmolVLA use ``sqrt(width)``.
    The scale is a non-persistent buffer that follows the module's dtype, so in bf16 it is
    rounded to bf16 before the product, exactly as transformers' Gemma embedding does.

    Args:
        tokenizer: a :class:`Tokenizer` (kept as a plain attribute, not a submodule).
        width: embedding width.
        embed_scale: factor on the embeddings.
        vocab_size: embedding rows (``None``: ``tokenizer.vocab_size``; checkpoints often pad the
            vocabulary, e.g. to a multiple of 64).

    Attributes:
        tokenizer: the tokenizer.
        width: embedding width.

    Shapes: ``texts`` (B strings) -> ``embeds [B, L, width]``, ``pad [B, L]`` bool (True on real
    tokens), both on the embedding's device.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        width: int,
        embed_scale: float | None = None,
        vocab_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        vocab_size = vocab_size or tokenizer.vocab_size
        if vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size ({vocab_size}) must cover the tokenizer's vocab_size ({tokenizer.vocab_size})"
            )
        self.tokenizer = tokenizer
        self.width = width
        self.embedding = nn.Embedding(vocab_size, width, device=device, dtype=dtype)
        scale = 1.0 if embed_scale is None else float(embed_scale)
        self._scale_repr = scale
        self.register_buffer(
            "embed_scale", torch.tensor(scale, device=device, dtype=dtype or torch.float32), persistent=False
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, L]`` -> ``embeds [B, L, width]``: ``embedding(ids) * embed_scale``."""
        return self.embedding(ids) * self.embed_scale.to(self.embedding.weight.dtype)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pad = self.tokenizer(texts)
        device = self.embedding.weight.device
        return self.embed(ids.to(device)), pad.to(device)

    @torch.no_grad()
    def load_embedding(self, weight: torch.Tensor) -> None:
        """Copy an unscaled ``[vocab_size, width]`` embedding matrix (e.g. ``embed_tokens.weight``)."""
        if tuple(weight.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"weight must have shape {tuple(self.embedding.weight.shape)} ([vocab_size, width]); got "
                f"{tuple(weight.shape)} (pass vocab_size= to match a padded checkpoint vocabulary)"
            )
        self.embedding.weight.copy_(weight)

    def export_recipe(self, node: Mapping[str, Any], directory: Path) -> dict[str, Any]:
        """The ``text`` node to save with a checkpoint (a file-backed tokenizer saves its files)."""
        export = getattr(self.tokenizer, "export_recipe", None)
        if export is None or not isinstance(node.get("tokenizer"), Mapping):
            return dict(node)
        return {**node, "tokenizer": export(node["tokenizer"], directory)}

    def extra_repr(self) -> str:
        return f"tokenizer={type(self.tokenizer).__name__}, embed_scale={self._scale_repr:g}"
