"""Tokenizers (byte-level and local transformers) and TextEncoder's embedding scale."""

import logging
import math

import pytest
import torch
from transformers import GemmaConfig, GemmaModel, LlamaConfig, LlamaModel

from helpers import save_tiny_tokenizer
from vlablocks.encoders.text import ByteTokenizer, HFTokenizer, TextEncoder, Tokenizer, pad_right


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


# ---------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_round_trip_with_non_ascii():
    tok = ByteTokenizer(max_length=64, add_eos=True)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 259
    texts = ["open the drawer", "héllo wörld 🤖", "机器人", ""]
    ids, mask = tok(texts)
    lengths = [len(t.encode("utf-8")) + 2 for t in texts]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (4, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[~mask] == tok.PAD_ID).all()
    assert ids[:, 0].tolist() == [tok.BOS_ID] * 4
    assert ids[3, :2].tolist() == [tok.BOS_ID, tok.EOS_ID]
    assert ids[0, 1].item() == ord("o") + 3
    assert [tok.decode(row) for row in ids] == texts
    assert int(ids.max()) < tok.vocab_size


def test_byte_tokenizer_truncates_at_a_character_boundary_and_warns_once(caplog):
    tok = ByteTokenizer(max_length=6)  # BOS + 5 bytes
    with caplog.at_level(logging.WARNING, logger="vlablocks.encoders.text"):
        ids, mask = tok(["ab€cd", "abc€"])  # € is 3 bytes: 'ab€' is 5 bytes, 'abc€' would be 6
        tok(["a much longer text than six"])
    assert ids.shape == (2, 6)
    assert [tok.decode(row) for row in ids] == ["ab€", "abc"]
    assert mask.sum(1).tolist() == [6, 4]
    assert len([r for r in caplog.records if "truncated" in r.message]) == 1


def test_byte_tokenizer_errors():
    with pytest.raises(ValueError, match="max_length must be a positive int; got 0"):
        ByteTokenizer(0)
    with pytest.raises(ValueError, match="max_length must leave room for BOS/EOS"):
        ByteTokenizer(1, add_bos=True, add_eos=True)
    tok = ByteTokenizer(8)
    with pytest.raises(ValueError, match="texts must be a list of str; got str"):
        tok("a single string")
    with pytest.raises(ValueError, match="at least one text"):
        tok([])


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


# ---------------------------------------------------------------- HFTokenizer


def test_hf_tokenizer_round_trip_right_padding(hf_dir, caplog):
    tok = HFTokenizer(hf_dir, max_length=8)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == len(tok.tokenizer) and tok.pad_id == 0
    ids, mask = tok(["open the drawer", "pick up the red block"])
    assert ids.shape == mask.shape == (2, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 6]
    assert ids[:, 0].tolist() == [2, 2]  # [BOS] from the post-processor
    assert ids[0, 4:].tolist() == [0, 0]
    assert [tok.decode(row[m]) for row, m in zip(ids, mask)] == ["open the drawer", "pick up the red block"]
    with caplog.at_level(logging.WARNING, logger="vlablocks.encoders.text"):
        short = HFTokenizer(hf_dir, max_length=3)
        ids, mask = short(["pick up the red block"])
        short(["push the button down"])
    assert ids.shape == (1, 3) and short.decode(ids[0]) == "pick up"
    assert len([r for r in caplog.records if "truncated" in r.message]) == 1


# ---------------------------------------------------------------- TextEncoder


def test_embedding_scale_is_applied_exactly_once():
    tok = ByteTokenizer(16)
    torch.manual_seed(0)
    plain = TextEncoder(tok, 8)
    scaled = TextEncoder(tok, 8, embed_scale=2.0)
    scaled.load_embedding(plain.embedding.weight)
    texts = ["open", "push it"]
    embeds, pad = plain(texts)
    ids, mask = tok(texts)
    assert embeds.shape == (2, 8, 8) and torch.equal(pad, mask) and plain.width == 8
    torch.testing.assert_close(embeds, plain.embedding.weight[ids])  # None means 1.0
    torch.testing.assert_close(scaled(texts)[0], 2.0 * embeds, rtol=0, atol=0)
    torch.testing.assert_close(scaled.embed(ids), 2.0 * embeds, rtol=0, atol=0)


def test_llama_embedding_is_unscaled():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    llama = LlamaModel(config)
    encoder = TextEncoder(ByteTokenizer(32), 16)
    encoder.load_embedding(llama.embed_tokens.weight)
    embeds, _ = encoder(["pick up the red block"])
    ids, _ = encoder.tokenizer(["pick up the red block"])
    torch.testing.assert_close(embeds, llama.embed_tokens(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_scaled_embedding_matches_transformers(dtype):
    """GemmaModel.embed_tokens scales by sqrt(hidden) itself: TextEncoder(sqrt(width)) on the raw weight equals it."""
    torch.manual_seed(0)
    width = 32
    config = GemmaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    gemma = GemmaModel(config).to(dtype)
    encoder = TextEncoder(ByteTokenizer(32), width, embed_scale=math.sqrt(width), dtype=dtype)
    encoder.load_embedding(gemma.embed_tokens.weight)
    texts = ["open the drawer", "push"]
    ids, _ = encoder.tokenizer(texts)
    expected = gemma.embed_tokens(ids)
    torch.testing.assert_close(encoder(texts)[0], expected, rtol=0, atol=0)
    assert not torch.allclose(gemma.embed_tokens.weight[ids].float(), expected.float())  # Gemma does scale


def test_text_encoder_checks_and_meta_build(hf_dir):
    tok = HFTokenizer(hf_dir, max_length=8)
    encoder = TextEncoder(tok, 16, vocab_size=64)
    assert encoder.embedding.weight.shape == (64, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \(64, 16\) .* got \(10, 16\)"):
        encoder.load_embedding(torch.zeros(10, 16))
    with pytest.raises(ValueError, match=r"vocab_size \(3\) must cover the tokenizer's vocab_size"):
        TextEncoder(tok, 16, vocab_size=3)
    meta = TextEncoder(ByteTokenizer(16), 2048, embed_scale=math.sqrt(2048), device="meta")
    embeds, pad = meta(["open the drawer"])
    assert embeds.is_meta and embeds.shape == (1, 16, 2048) and pad.is_meta
    assert "embed_scale=45.2548" in repr(meta)


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5])
def test_byte_tokenizer_truncates_at_a_character_boundary(budget):
    # "é" is C3 A9 and "ñ" is C3 B1: continuation bytes of both parities; cutting inside one would leave half a char
    tokenizer = ByteTokenizer(max_length=budget + 1)  # BOS + budget bytes
    ids = tokenizer.encode("éñé")
    data = bytes(i - ByteTokenizer.BYTE_OFFSET for i in ids[1:])
    assert len(data) == budget - budget % 2 and "éñé".encode().startswith(data)
    data.decode("utf-8")  # whole characters only
    with pytest.raises(ValueError, match=r"max_length must leave room for BOS/EOS \(1 more needed\); got 1"):
        ByteTokenizer(max_length=1, add_bos=True, add_eos=True)


def test_text_encoder_repr_names_its_tokenizer_and_scale():
    assert TextEncoder(ByteTokenizer(16), 8, embed_scale=2.0).extra_repr() == "tokenizer=ByteTokenizer, embed_scale=2"


def _without_special_tokens(hf_dir, directory, *names):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    for name in names:
        setattr(tokenizer, name, None)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_hf_tokenizer_pads_with_its_pad_token_else_eos_else_zero(hf_dir, tmp_path, caplog):
    assert HFTokenizer(hf_dir, max_length=8).pad_id == 0  # "[PAD]" is id 0 in the tiny vocabulary
    no_pad = HFTokenizer(_without_special_tokens(hf_dir, tmp_path / "no_pad", "pad_token"), max_length=8)
    assert no_pad.tokenizer.pad_token_id is None and no_pad.tokenizer.eos_token_id == 3
    assert no_pad.pad_id == 3
    ids, mask = no_pad(["open the drawer", "pick up the red block"])
    assert ids[0, 4:].tolist() == [3, 3] and mask[0].tolist() == [True] * 4 + [False] * 2
    bare = HFTokenizer(_without_special_tokens(hf_dir, tmp_path / "bare", "pad_token", "eos_token"), max_length=8)
    assert bare.tokenizer.eos_token_id is None and bare.pad_id == 0
    with caplog.at_level(logging.WARNING, logger="vlablocks.encoders.text"):
        HFTokenizer(hf_dir, max_length=3)(["pick up the red block"])
    assert [r.getMessage() for r in caplog.records] == [
        "HFTokenizer truncated a text to max_length=3 tokens (warned once per tokenizer)"]
