"""Model weights in and out of megatron-core ``dist_checkpointing``.

Saved tensors are global (each shard records its offset in the full tensor), so a
checkpoint written at one TP/PP layout loads at any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_longsky.checkpoint.layout import MODEL


def unwrap(model):
    """The bare GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _as_list(model_chunks):
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def model_sharded_state_dict(model_chunks) -> dict:
    chunks = [unwrap(m) for m in _as_list(model_chunks)]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    return chunks[0].sharded_state_dict()


def save_model_weights(model_chunks, ckpt_dir: str | Path, sharded_strategy=None) -> Path:
    """Collective: every rank calls it. Writes ``<ckpt_dir>/model/`` (``sharded_strategy``:
    a dist_checkpointing save strategy, e.g. the fully parallel one training uses)."""
    from megatron.core import dist_checkpointing

    target = Path(ckpt_dir) / MODEL
    if torch.distributed.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(target), sharded_strategy=sharded_strategy)
    return target


def load_model_weights(model_chunks, ckpt_dir: str | Path, strict: bool = True, sharded_strategy=None) -> None:
    """Collective: load ``<ckpt_dir>/model/`` into the model, resharding to this layout."""
    from megatron.core import dist_checkpointing

    source = Path(ckpt_dir) / MODEL
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found: not a checkpoint with model weights")
    chunks = [unwrap(m) for m in _as_list(model_chunks)]
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(source), sharded_strategy=sharded_strategy)
    chunks[0].load_state_dict(state, strict=strict)
