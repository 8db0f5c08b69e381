"""Parameter names and tensor-parallel sharding of megatron-core's GPTModel (our layer spec).

Shared by the layout-invariant initialisation (:mod:`megatron_longsky.model.init`) and
the HF converter (:mod:`megatron_longsky.convert.mapping`), which sits above the model
package. Names are relative to one decoder layer (``decoder.layers.{i}.``) or global.

- ``linear_fc1`` is ``[gate; up]``; each TP rank holds ``[gate_r; up_r]``, which is NOT
  a contiguous slice of the full tensor: see :func:`tp_shard`.
- column-parallel weights (qkv, fc1, embeddings, output layer) split on dim 0,
  row-parallel ones (proj, fc2) on dim 1, norms are replicated.
"""

from __future__ import annotations

import torch

MEGATRON_LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
# Transformer Engine fuses the norms into the following linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
MEGATRON_GLOBAL = {
    "embed": "embedding.word_embeddings.weight",
    "norm": "decoder.final_layernorm.weight",
    "head": "output_layer.weight",
}


def canonical_layer_name(name: str) -> str:
    """Local-spec name for a layer-relative parameter name (TE names mapped)."""
    return _TE_ALIASES.get(name, name)


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def tp_shard(name: str, full: torch.Tensor, partition_dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a full megatron tensor (``partition_dim`` -1: replicated)."""
    if tp_size == 1 or partition_dim < 0:
        return full
    if is_gated_fc1(name):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], 0)
    if full.shape[partition_dim] % tp_size:
        raise ValueError(f"{name}: dim {partition_dim} of {tuple(full.shape)} does not split over TP={tp_size}")
    return torch.chunk(full, tp_size, dim=partition_dim)[tp_rank]
