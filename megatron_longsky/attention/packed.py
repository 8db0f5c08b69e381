"""Packed rows: several documents in one row, attention confined to each document.

A packed batch describes its documents with ``cu_seqlens`` (int32, ``[0, e1, e2, ...,
total]``) over the *flattened* tokens (THD layout: the batch rows laid end to end, b=1).
Under context parallelism every document is cut into ``2 * CP`` chunks and rank ``r``
keeps chunks ``r`` and ``2 * CP - 1 - r`` of **every** document (Transformer Engine's
THD layout), so each document must have a length divisible by ``2 * CP`` (the SFT
dataset pads each sample to that multiple with ``pad_to_multiple``).

For attention, every local token gets its *flat position* in the unsharded row and its
*segment* (document index); key j is visible to query i iff same segment and
``pos[j] <= pos[i]``. megatron-core's RoPE for THD restarts positions at each
document from the same ``cu_seqlens`` (via :class:`PackedSeqParams`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_longsky.attention.context_parallel import SequenceLengthError


def validate_cu_seqlens(cu_seqlens: Tensor, total: int, cp_size: int = 1, where: str = "cu_seqlens") -> None:
    """Check boundaries start at 0, increase, end at ``total`` and split into 2*CP chunks."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    if len(cu) < 2 or cu[0] != 0:
        raise SequenceLengthError(f"{where}={cu[:8]}...: must start at 0 and hold at least one document")
    if cu[-1] != total:
        raise SequenceLengthError(f"{where} ends at {cu[-1]} but the packed row holds {total} tokens")
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b <= a:
            raise SequenceLengthError(f"{where}: document {i} has length {b - a} (boundaries must increase)")
        if cp_size > 1 and (b - a) % (2 * cp_size):
            raise SequenceLengthError(
                f"{where}: document {i} has length {b - a}, not divisible by 2 x context_parallel_size = "
                f"{2 * cp_size}; pad each document to a multiple of {2 * cp_size} "
                f"(data.pad_to_multiple, a multiple of {2 * cp_size})")


def local_token_index(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Flat indices (int64) of the tokens CP rank ``cp_rank`` keeps, in its local order:
    for each document, its chunk ``r`` then its chunk ``2*CP-1-r``."""
    cu = cu_seqlens.to(torch.int64)
    if cp_size == 1:
        return torch.arange(int(cu[-1]), device=cu.device)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    chunk = lengths // (2 * cp_size)
    local_lengths = 2 * chunk
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), local_lengths)
    local_starts = torch.cumsum(local_lengths, 0) - local_lengths
    offset = torch.arange(int(local_lengths.sum()), device=cu.device) - local_starts[seg]
    chunk_of_token = chunk[seg]
    in_second = offset >= chunk_of_token
    chunk_id = torch.where(in_second, 2 * cp_size - 1 - cp_rank, cp_rank)
    return starts[seg] + chunk_id * chunk_of_token + offset - in_second.long() * chunk_of_token


def segment_ids(cu_seqlens: Tensor, index: Tensor) -> Tensor:
    """Document index of each flat token position in ``index``."""
    return torch.searchsorted(cu_seqlens.to(torch.int64)[1:], index, right=True)


def positions_and_segments(cu_seqlens: Tensor, cp_size: int, cp_rank: int) -> tuple[Tensor, Tensor]:
    """(flat positions, document ids) of this rank's local tokens."""
    index = local_token_index(cu_seqlens, cp_size, cp_rank)
    return index, segment_ids(cu_seqlens, index)


def gathered_positions_and_segments(cu_seqlens: Tensor, cp_size: int) -> tuple[Tensor, Tensor]:
    """The same for the keys all-gathered over the CP group (rank 0's tokens first)."""
    parts = [positions_and_segments(cu_seqlens, cp_size, r) for r in range(cp_size)]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def document_positions(cu_seqlens: Tensor) -> Tensor:
    """0, 1, ... restarting at every document, over the flat row (the THD ``position_ids``)."""
    cu = cu_seqlens.to(torch.int64)
    index = torch.arange(int(cu[-1]), device=cu.device)
    return index - cu[segment_ids(cu, index)]


def build_packed_seq_params(cu_seqlens: Tensor, max_seqlen: Optional[int] = None, cp_group=None):
    """megatron-core ``PackedSeqParams`` (THD) for a packed row whose documents are already
    padded (the padding belongs to each document, after its real tokens)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu, max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen),
        cp_group=cp_group,
    )
