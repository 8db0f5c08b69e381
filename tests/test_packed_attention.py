"""Packed rows: cu_seqlens checks, the per-document CP layout, no leakage between documents,
and the data path (``shard_for_context_parallel`` / ``prepare_batch``)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longsky.attention.blockwise import blockwise_attention, dense_attention
from megatron_longsky.attention.context_parallel import SequenceLengthError
from megatron_longsky.attention.packed import (
    build_packed_seq_params,
    document_positions,
    gathered_positions_and_segments,
    local_token_index,
    positions_and_segments,
    validate_cu_seqlens,
)
from megatron_longsky.attention.sharding import shard_for_context_parallel

CU = torch.tensor([0, 16, 24, 32, 56, 64], dtype=torch.int32)  # two collated rows of 32


def _reference_index(cu, cp, rank):
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        chunk = (b - a) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            out += list(range(a + c * chunk, a + (c + 1) * chunk))
    return out


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_each_rank_keeps_chunks_r_and_mirror_of_every_document(cp):
    parts = [local_token_index(CU, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert part.tolist() == _reference_index(CU, cp, r)
    assert sorted(torch.cat(parts).tolist()) == list(range(64))
    pos, seg = gathered_positions_and_segments(CU, cp)
    assert torch.equal(pos, torch.cat(parts))
    assert seg.tolist() == [int(torch.searchsorted(CU[1:].long(), p, right=True)) for p in pos]


def test_cu_seqlens_validation_names_the_document():
    validate_cu_seqlens(CU, 64, cp_size=4)
    with pytest.raises(SequenceLengthError, match="document 1 has length 8, not divisible by 2 x context_parallel_size = 16"):
        validate_cu_seqlens(CU, 64, cp_size=8)
    with pytest.raises(SequenceLengthError, match="ends at 64 but the packed row holds 60"):
        validate_cu_seqlens(CU, 60)
    with pytest.raises(SequenceLengthError, match="must start at 0"):
        validate_cu_seqlens(torch.tensor([2, 8]), 8)
    with pytest.raises(SequenceLengthError, match="document 1 has length 0"):
        validate_cu_seqlens(torch.tensor([0, 4, 4, 8]), 8)


def test_document_positions_restart_per_document():
    assert document_positions(torch.tensor([0, 3, 5])).tolist() == [0, 1, 2, 0, 1]


def _packed_qkv(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, total, 8, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(4), make(2), make(2)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_simulated_cp_ranks_reproduce_packed_attention(cp):
    """Each rank's queries over the gathered keys (the all-gather's layout) equal the
    corresponding rows of whole-row packed attention."""
    q, k, v = _packed_qkv(64)
    pos, seg = positions_and_segments(CU, 1, 0)
    reference = dense_attention(q, k, v, pos, pos, seg, seg, scale=0.3)
    gathered = torch.cat([local_token_index(CU, cp, r) for r in range(cp)])
    k_pos, k_seg = gathered_positions_and_segments(CU, cp)
    for rank in range(cp):
        index = local_token_index(CU, cp, rank)
        q_pos, q_seg = positions_and_segments(CU, cp, rank)
        out = blockwise_attention(q[:, :, index], k[:, :, gathered], v[:, :, gathered], q_pos, k_pos, q_seg, k_seg,
                                  scale=0.3, block_q=3, block_k=5)
        torch.testing.assert_close(out, reference[:, :, index])


def test_packed_documents_do_not_see_each_other():
    q, k, v = _packed_qkv(64)
    pos, seg = positions_and_segments(CU, 1, 0)
    out = blockwise_attention(q, k, v, pos, pos, seg, seg, scale=0.3, block_q=7, block_k=7)
    bounds = CU.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        local = torch.arange(b - a)
        alone = blockwise_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], local, local, scale=0.3)
        torch.testing.assert_close(out[:, :, a:b], alone)
    # The last document's output has no gradient path to any other document's keys/values.
    dk, dv = torch.autograd.grad(out[:, :, 56:].sum(), (k, v))
    assert float(dk[:, :, :56].abs().max()) == 0.0 and float(dv[:, :, :56].abs().max()) == 0.0
    assert float(dv[:, :, 56:].abs().min()) > 0.0


def test_full_causal_row_reaches_a_distant_earlier_chunk():
    """CIP rows are unpacked: the last token depends on the first token's key (64 tokens back)."""
    q, k, v = _packed_qkv(64)
    pos = torch.arange(64)
    out = blockwise_attention(q, k, v, pos, pos, scale=0.3, block_q=8, block_k=8)
    (dv,) = torch.autograd.grad(out[:, :, -1].sum(), (v,))
    assert float(dv[:, :, 0].abs().min()) > 0.0


def test_shard_packed_batch_gives_thd_row_and_packed_seq_params():
    tokens = torch.arange(64).view(2, 32)
    batch = dict(tokens=tokens, labels=tokens + 1, loss_mask=torch.ones(2, 32),
                 position_ids=document_positions(CU).view(2, 32))
    sharded = shard_for_context_parallel(batch, cu_seqlens=CU, max_seqlen=24, cp_size=2, cp_rank=1)
    index = _reference_index(CU, 2, 1)
    assert sharded.tensors["tokens"].tolist() == [index]
    assert sharded.tensors["labels"].tolist() == [[i + 1 for i in index]]
    params = sharded.packed_seq_params
    assert params.qkv_format == "thd" and params.max_seqlen_q == 24
    assert params.cu_seqlens_q.tolist() == CU.tolist() and params.cu_seqlens_kv_padded.tolist() == CU.tolist()
    with pytest.raises(SequenceLengthError, match="document 1 has length 8"):
        shard_for_context_parallel(batch, cu_seqlens=CU, cp_size=8, cp_rank=0)


def test_shard_unpacked_batch_and_length_error():
    tokens = torch.arange(16).view(1, 16)
    out = shard_for_context_parallel(dict(tokens=tokens), cp_size=2, cp_rank=0)
    assert out.packed_seq_params is None
    assert out.tensors["tokens"].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    with pytest.raises(SequenceLengthError, match="batch sequence length=12 is not divisible by 2 x context_parallel_size = 8"):
        shard_for_context_parallel(dict(tokens=torch.zeros(1, 12)), cp_size=4, cp_rank=0)


def test_prepare_batch_builds_thd_inputs_from_sft_rows():
    """The trainer's prepare_batch on SFT-collated packed rows (CP=1, no parallel state)."""
    from megatron_longsky.sft.dataset import collate_packed
    from megatron_longsky.training.batch import prepare_batch

    rows = []
    for cu in (torch.tensor([0, 16, 24, 32], dtype=torch.int32), torch.tensor([0, 24, 32], dtype=torch.int32)):
        rows.append(dict(tokens=torch.arange(32), labels=torch.arange(32), loss_mask=torch.ones(32),
                         position_ids=document_positions(cu), cu_seqlens=cu))
    inputs = prepare_batch(collate_packed(rows))
    assert inputs.tokens.shape == (1, 64)
    assert inputs.packed_seq_params.cu_seqlens_q.tolist() == CU.tolist()
    assert inputs.packed_seq_params.max_seqlen_q == 24
    assert torch.equal(inputs.position_ids[0], document_positions(CU))
    plain = prepare_batch(dict(tokens=torch.zeros(2, 8), labels=torch.zeros(2, 8), loss_mask=torch.ones(2, 8)))
    assert plain.packed_seq_params is None and plain.tokens.shape == (2, 8)


def test_build_packed_seq_params_defaults_max_seqlen():
    params = build_packed_seq_params(CU)
    assert params.max_seqlen_q == params.max_seqlen_kv == 24
    assert math.isclose(float(params.cu_seqlens_q[-1]), 64)
