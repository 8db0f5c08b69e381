"""The data-path half of context parallelism: keep this CP rank's tokens of a batch.

Unpacked batches ([b, s]) are cut along s into the 2*CP zig-zag chunks (megatron-core's
``get_batch_on_this_cp_rank`` layout). Packed batches (with ``cu_seqlens`` over the
flattened rows) become one THD row [1, b*s] of this rank's chunks of every document,
plus the ``PackedSeqParams`` megatron-core's attention and RoPE read. Loss masks are
sharded like the tokens, so the per-token loss normalised by the global token count
(``calculate_per_token_loss``) is the same at any CP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from megatron_longsky.attention import packed as packed_utils
from megatron_longsky.attention.context_parallel import split_for_cp, validate_sequence_length

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class ShardedBatch:
    tensors: dict[str, Tensor]  # SEQUENCE_KEYS, this rank's tokens
    packed_seq_params: Optional[Any] = None


def context_parallel_topology() -> tuple[int, int, Any]:
    """(CP size, CP rank, CP group) from megatron-core's parallel state; (1, 0, None) without it."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0, None
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), ps.get_context_parallel_group()


def shard_for_context_parallel(tensors: dict[str, Tensor], cu_seqlens: Optional[Tensor] = None,
                               max_seqlen: Optional[Tensor | int] = None, cp_size: Optional[int] = None,
                               cp_rank: Optional[int] = None, cp_group=None) -> ShardedBatch:
    """This CP rank's part of ``tensors`` ([b, s] each); packed when ``cu_seqlens`` is given.

    Without explicit ``cp_size``/``cp_rank`` the topology comes from megatron-core.
    """
    if cp_size is None or cp_rank is None:
        cp_size, cp_rank, cp_group = context_parallel_topology()
    if cu_seqlens is None:
        seq_length = next(iter(tensors.values())).shape[1]
        validate_sequence_length(seq_length, cp_size, where="batch sequence length")
        return ShardedBatch({k: split_for_cp(v, 1, cp_size, cp_rank) for k, v in tensors.items()})
    cu = cu_seqlens.to(torch.int64).reshape(-1).cpu()
    total = next(iter(tensors.values())).numel()
    packed_utils.validate_cu_seqlens(cu, total, cp_size, where="batch cu_seqlens")
    index = packed_utils.local_token_index(cu, cp_size, cp_rank)
    out = {}
    for key, value in tensors.items():
        out[key] = value.reshape(1, -1).index_select(1, index.to(value.device))
    if max_seqlen is not None:
        max_seqlen = int(max_seqlen)
    device = next(iter(tensors.values())).device
    params = packed_utils.build_packed_seq_params(cu.to(device), max_seqlen, cp_group=cp_group)
    return ShardedBatch(out, params)
