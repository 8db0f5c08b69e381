"""Turn a loader micro-batch into GPTModel inputs.

Kept separate and small on purpose: context parallelism (slicing each sequence into
the 2*CP load-balanced chunks) and packed rows (``cu_seqlens`` -> PackedSeqParams)
extend this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_longsky.attention.packed import document_positions
from megatron_longsky.attention.sharding import shard_for_context_parallel


@dataclass
class ModelInputs:
    tokens: torch.Tensor  # int64 [b, s]
    position_ids: torch.Tensor  # int64 [b, s]
    labels: torch.Tensor  # int64 [b, s]
    loss_mask: torch.Tensor  # float32 [b, s]: 1 where the label counts in the loss
    attention_mask: Optional[torch.Tensor] = None  # None: causal, built inside attention
    packed_seq_params: Optional[Any] = None


def prepare_batch(batch: dict, device: torch.device | str = "cpu") -> ModelInputs:
    """Loader batch (tokens, labels, loss_mask[, position_ids][, cu_seqlens, max_seqlen]) -> this
    rank's model inputs on ``device``: CP-sharded, and THD + PackedSeqParams when packed."""
    missing = [k for k in ("tokens", "labels", "loss_mask") if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; it has {sorted(batch)}")
    tokens = batch["tokens"].to(device, non_blocking=True).long()
    labels = batch["labels"].to(device, non_blocking=True).long()
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    if tokens.shape != labels.shape or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, labels {tuple(labels.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same shape")
    position_ids = batch.get("position_ids")
    cu_seqlens = batch.get("cu_seqlens")
    if position_ids is not None:
        position_ids = position_ids.to(device, non_blocking=True).long()
    elif cu_seqlens is not None:  # packed rows: positions restart at every document
        position_ids = document_positions(cu_seqlens).to(device).view(tokens.shape)
    else:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    # Context parallelism keeps this rank's 2 zig-zag chunks (of every document when packed).
    sharded = shard_for_context_parallel(
        dict(tokens=tokens, position_ids=position_ids, labels=labels, loss_mask=loss_mask),
        cu_seqlens=cu_seqlens, max_seqlen=batch.get("max_seqlen"))
    return ModelInputs(**sharded.tensors, packed_seq_params=sharded.packed_seq_params)
