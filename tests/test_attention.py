"""Blockwise online-softmax attention equals dense attention (values and gradients), and
LongSkyCoreAttention is a drop-in core attention for megatron-core shapes."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longsky.attention.blockwise import blockwise_attention, dense_attention
from megatron_longsky.attention.context_parallel import (
    SequenceLengthError,
    split_for_cp,
    unsplit_from_cp,
    validate_sequence_length,
    zigzag_positions,
)


def _qkv(b, hq, hk, sq, sk, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(b, hq, sq, d), make(b, hk, sk, d), make(b, hk, sk, d)


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream)


@settings(max_examples=25, deadline=None)
@given(
    seq=st.integers(1, 40),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    block_q=st.integers(1, 16),
    block_k=st.integers(1, 16),
    causal=st.booleans(),
    segments=st.integers(0, 4),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blockwise_equals_dense_with_gradients(seq, heads, block_q, block_k, causal, segments, shuffle, seed):
    hq, hk = heads
    q, k, v = _qkv(2, hq, hk, seq, seq, 8, seed)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(seq, generator=g) if shuffle else torch.arange(seq)
    seg = torch.randint(0, segments, (seq,), generator=g) if segments else None
    kw = dict(scale=1 / math.sqrt(8), causal=causal)
    out = blockwise_attention(q, k, v, pos, pos, seg, seg, block_q=block_q, block_k=block_k, **kw)
    ref = dense_attention(q, k, v, pos, pos, seg, seg, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_blockwise_matches_plain_causal_softmax_attention():
    q, k, v = _qkv(1, 2, 2, 9, 9, 4)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    ref = scores.softmax(-1) @ v
    out = blockwise_attention(q, k, v, torch.arange(9), torch.arange(9), scale=0.5, block_q=2, block_k=3)
    torch.testing.assert_close(out, ref)


def test_queries_without_visible_keys_get_zero_and_finite_gradients():
    q, k, v = _qkv(1, 2, 2, 6, 4, 4)
    q_seg, k_seg = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1])  # segment 2 has no keys
    pos_q, pos_k = torch.arange(6), torch.arange(4)
    out = blockwise_attention(q, k, v, pos_q, pos_k, q_seg, k_seg, scale=0.5, causal=False, block_q=2, block_k=2)
    ref = dense_attention(q, k, v, pos_q, pos_k, q_seg, k_seg, scale=0.5, causal=False)
    assert torch.equal(out[:, :, 4:], torch.zeros_like(out[:, :, 4:]))
    torch.testing.assert_close(out, ref)
    grads = _grads(out, (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    for a, b in zip(grads, _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)


def test_float32_and_bfloat16_inputs_keep_their_dtype():
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = _qkv(1, 2, 1, 20, 20, 8, dtype=dtype)
        pos = torch.arange(20)
        out = blockwise_attention(q, k, v, pos, pos, scale=0.3, block_q=4, block_k=8)
        ref = dense_attention(q.double(), k.double(), v.double(), pos, pos, scale=0.3)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)


def test_blockwise_backward_keeps_no_square_score_matrix():
    """What autograd saves for backward is O(s) per head, not O(s^2) as in dense attention."""
    s, block = 1024, 128
    q, k, v = _qkv(1, 2, 2, s, s, 16, dtype=torch.float32)
    pos = torch.arange(s)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    blockwise = saved_bytes(lambda: blockwise_attention(q, k, v, pos, pos, scale=0.25, block_q=block, block_k=block))
    inputs = 3 * q.numel() * 4 + q.numel() * 4  # q, k, v and the output
    square = 2 * s * s * 4  # one float32 score matrix per head
    assert blockwise < inputs + square // 8
    dense_scores = saved_bytes(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert dense_scores >= square


def test_gqa_shares_key_value_heads_in_order():
    """Query head h uses key/value head h // (Hq/Hkv), as megatron's repeat_interleave does."""
    q, k, v = _qkv(1, 4, 2, 5, 5, 4)
    pos = torch.arange(5)
    out = blockwise_attention(q, k, v, pos, pos, scale=0.5, block_q=2, block_k=2)
    for h in range(4):
        single = blockwise_attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], pos, pos,
                                     scale=0.5, block_q=2, block_k=2)
        torch.testing.assert_close(out[:, h:h + 1], single)


# ---------------------------------------------------------------- context-parallel layout
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_split_positions_and_unsplit(cp):
    s = 8 * cp
    x = torch.arange(s).view(1, s) * 10
    parts = [split_for_cp(x, 1, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert torch.equal(part[0] // 10, zigzag_positions(s, cp, r))
    chunk = s // (2 * cp)
    assert parts[0][0, :chunk].tolist() == [10 * i for i in range(chunk)]  # chunk 0
    assert parts[0][0, chunk:].tolist() == [10 * i for i in range(s - chunk, s)]  # chunk 2*CP-1
    assert torch.equal(unsplit_from_cp(parts, 1), x)


def test_sequence_length_validation_names_the_problem():
    validate_sequence_length(4096, 4)
    with pytest.raises(SequenceLengthError, match=r"seq_length=100 is not divisible by 2 x context_parallel_size = 8"):
        validate_sequence_length(100, 4)
    with pytest.raises(SequenceLengthError, match="FP8 needs each shard divisible by 16"):
        validate_sequence_length(72, 2, fp8="hybrid")
    validate_sequence_length(128, 2, fp8="hybrid")


# ---------------------------------------------------------------- the megatron-core module
class _SingleGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


def _core_attention(block_size, mask_type="causal", heads=4, groups=2, dense_max_tokens=512):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longsky.attention.core_attention import LongSkyCoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=8, attention_dropout=0.0, hidden_dropout=0.0)
    pgs = types.SimpleNamespace(tp=_SingleGroup(), cp=_SingleGroup())
    return LongSkyCoreAttention(config, 1, getattr(AttnMaskType, mask_type), "self", pg_collection=pgs,
                                block_size=block_size, dense_max_tokens=dense_max_tokens)


def _reference_sbhd(q, k, v, causal=True):
    """megatron layout [s, b, h, d] -> [s, b, h*d] by plain softmax attention."""
    groups = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[0]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf)
    out = scores.softmax(-1) @ vh
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("block_size,dense_max_tokens", [(4, 0), (1024, 512)])  # blockwise path, one SDPA call
def test_core_attention_module_matches_reference(block_size, dense_max_tokens):
    torch.manual_seed(0)
    module = _core_attention(block_size, dense_max_tokens=dense_max_tokens)
    q, k, v = torch.randn(12, 2, 4, 8), torch.randn(12, 2, 2, 8), torch.randn(12, 2, 2, 8)
    out = module(q, k, v, None)
    assert out.shape == (12, 2, 32)
    torch.testing.assert_close(out, _reference_sbhd(q, k, v), atol=1e-5, rtol=1e-5)


def test_core_attention_module_packed_thd_confines_documents():
    from megatron_longsky.attention.packed import build_packed_seq_params

    torch.manual_seed(0)
    module = _core_attention(4)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    params = build_packed_seq_params(torch.tensor([0, 6, 10], dtype=torch.int32))
    out = module(q, k, v, None, packed_seq_params=params)
    assert out.shape == (10, 32)
    for a, b in ((0, 6), (6, 10)):
        alone = _reference_sbhd(q[a:b, None], k[a:b, None], v[a:b, None])[:, 0]
        torch.testing.assert_close(out[a:b], alone, atol=1e-5, rtol=1e-5)


def test_core_attention_module_explicit_mask_and_errors():
    module = _core_attention(1024)
    q, k, v = torch.randn(6, 1, 4, 8), torch.randn(6, 1, 2, 8), torch.randn(6, 1, 2, 8)
    causal_mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).triu(1)  # megatron: True = hidden
    torch.testing.assert_close(module(q, k, v, causal_mask), module(q, k, v, None))
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    from megatron.core.transformer.enums import AttnMaskType
    with pytest.raises(ValueError, match="arbitrary"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.arbitrary)
    with pytest.raises(ValueError, match="attention_dropout"):
        from megatron.core.transformer.transformer_config import TransformerConfig

        from megatron_longsky.attention.core_attention import LongSkyCoreAttention
        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.1)
        LongSkyCoreAttention(cfg, 1, AttnMaskType.causal, "self",
                             pg_collection=types.SimpleNamespace(tp=_SingleGroup(), cp=_SingleGroup()))


def test_no_mask_type_is_bidirectional():
    module = _core_attention(4, mask_type="no_mask")
    q, k, v = torch.randn(9, 1, 4, 8), torch.randn(9, 1, 2, 8), torch.randn(9, 1, 2, 8)
    torch.testing.assert_close(module(q, k, v, None), _reference_sbhd(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


def test_cp_comm_type_is_reported_as_unused_by_our_attention(caplog):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longsky.attention.core_attention import LongSkyCoreAttention

    class _ThreeRanks(_SingleGroup):
        def size(self):
            return 3

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, context_parallel_size=3,
                            attention_dropout=0.0,
                            cp_comm_type="a2a")
    with caplog.at_level("INFO", logger="megatron_longsky.attention.core_attention"):
        LongSkyCoreAttention(cfg, 1, AttnMaskType.causal, "self",
                             pg_collection=types.SimpleNamespace(tp=_SingleGroup(), cp=_ThreeRanks()))
    assert "CP=3: LongSkyCoreAttention all-gathers K/V" in caplog.text
    assert "cp_comm_type=a2a applies to Transformer Engine only" in caplog.text


def test_fewer_queries_than_keys_are_the_latest_positions():
    """With a KV cache (sq < sk) the queries are the last sq positions: the newest token sees all keys."""
    module = _core_attention(1024)
    q, k, v = torch.randn(8, 1, 4, 8), torch.randn(8, 1, 2, 8), torch.randn(8, 1, 2, 8)
    full = module(q, k, v, None)
    torch.testing.assert_close(module(q[-3:], k, v, None), full[-3:])



def test_blocks_follow_cp_chunks_and_documents():
    """Blocks never straddle a zig-zag chunk or a long document, so the causal and
    document rules skip whole blocks; short documents share blocks."""
    from megatron_longsky.attention.blockwise import _block_bounds
    from megatron_longsky.attention.context_parallel import gathered_positions, zigzag_positions

    assert _block_bounds(zigzag_positions(1024, 2, 0), None, 512) == [(0, 256), (256, 512)]
    # gathered keys: rank 0's chunks 0 and 3, rank 1's chunks 1 and 2 (contiguous: one block)
    assert _block_bounds(gathered_positions(512, 2), None, 512) == [(0, 256), (256, 512), (512, 1024)]
    assert _block_bounds(torch.arange(1000), None, 512) == [(0, 500), (500, 1000)]
    assert _block_bounds(torch.arange(8).repeat_interleave(2), None, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    seg = torch.tensor([0] * 10 + [1] * 3 + [2] * 3 + [3] * 20)
    pos = torch.cat([torch.arange(10), torch.arange(3), torch.arange(3), torch.arange(20)])
    # short runs share blocks of at most size/4 rows
    assert _block_bounds(pos, seg, 16) == [(0, 10), (10, 13), (13, 16), (16, 26), (26, 36)]
    assert _block_bounds(pos, seg, 32) == [(0, 10), (10, 16), (16, 36)]
    many_short = torch.arange(4).repeat(256)  # 256 documents of 4 tokens
    assert len(_block_bounds(many_short, torch.arange(256).repeat_interleave(4), 64)) == 64


@pytest.mark.parametrize("length,path", [(12, "dense"), (13, "blockwise")])
def test_core_attention_one_sdpa_call_up_to_dense_max_tokens_not_block_size(monkeypatch, length, path):
    """An unpacked CP=1 sequence longer than a block but within dense_max_tokens is one SDPA
    call (with blocks of 256, 257-512-token sequences used to go blockwise: 1.3-2.0x slower)."""
    from megatron_longsky.attention import core_attention

    calls = []
    for name in ("dense_attention", "blockwise_attention"):
        real = getattr(core_attention, name)
        monkeypatch.setattr(core_attention, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    torch.manual_seed(0)
    module = _core_attention(4, dense_max_tokens=12)
    q, k, v = torch.randn(length, 2, 4, 8), torch.randn(length, 2, 2, 8), torch.randn(length, 2, 2, 8)
    out = module(q, k, v, None)
    assert calls == [f"{path}_attention"]
    torch.testing.assert_close(out, _reference_sbhd(q, k, v), atol=1e-5, rtol=1e-5)
