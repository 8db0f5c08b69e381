"""Tensor-by-tensor correspondence between Hugging Face Llama and megatron-core GPTModel.

Names are relative to one decoder layer (``model.layers.{i}.`` in HF,
``decoder.layers.{i}.`` in megatron-core). Megatron tensors here are FULL tensors in
the layout megatron-core's ``dist_checkpointing`` stores (the TP=1 layout):

- ``linear_qkv``: rows grouped per KV head, ``[q x heads_per_group, k, v]`` for each
  group in turn. Each TP rank's shard is a contiguous dim-0 split of the full tensor:
  whole groups when TP divides the KV groups; when TP is a multiple of them (MQA/GQA with
  a large TP) megatron-core all-gathers the projection and each rank keeps its group.
- ``linear_fc1``: ``[gate; up]``. Each TP rank holds ``[gate_r; up_r]``, which is
  NOT a contiguous slice of the full tensor: see :func:`tp_shard`.
- column-parallel weights (qkv, fc1, embeddings, output layer) split on dim 0,
  row-parallel ones (proj, fc2) on dim 1, norms are replicated.

No RoPE permutation is needed: both sides use the rotate-half convention.
"""

from __future__ import annotations

import torch

from megatron_longsky.model.config import ModelConfig
# Megatron-side names and TP sharding live with the model (the init uses them too).
from megatron_longsky.model.parameters import (  # noqa: F401 - re-exported for the converter
    MEGATRON_GLOBAL, MEGATRON_LAYER_KEYS, canonical_layer_name, is_gated_fc1, tp_shard,
)

# HF name -> megatron name, for tensors that map one to one.
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
HF_LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
HF_GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


def hf_layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (cfg.kv_groups * d, h),
        "self_attn.v_proj.weight": (cfg.kv_groups * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h),
        "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, cfg.ffn_hidden_size),
    }


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    groups, d, h = cfg.kv_groups, cfg.head_dim, q.shape[-1]
    per_group = cfg.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, h)
    k = k.reshape(groups, d, h)
    v = v.reshape(groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d, h = cfg.kv_groups, cfg.head_dim, qkv.shape[-1]
    per_group = cfg.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def check_hf_layer(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    from megatron_longsky.convert.hf_config import ConversionError

    for key, shape in hf_layer_shapes(cfg).items():
        if key not in tensors:
            raise ConversionError(f"{where}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != shape:
            raise ConversionError(
                f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the config implies {shape}"
            )


def layer_to_megatron(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer: HF tensors -> full megatron tensors."""
    out = {meg: hf[name] for name, meg in _DIRECT.items()}
    out["self_attention.linear_qkv.weight"] = fuse_qkv(
        hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"], cfg
    )
    out["mlp.linear_fc1.weight"] = torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0)
    return out


def layer_to_hf(meg: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer: full megatron tensors -> HF tensors."""
    meg = {canonical_layer_name(k): v for k, v in meg.items()}
    out = {name: meg[m] for name, m in _DIRECT.items()}
    q, k, v = split_qkv(meg["self_attention.linear_qkv.weight"], cfg)
    out["self_attn.q_proj.weight"], out["self_attn.k_proj.weight"], out["self_attn.v_proj.weight"] = q, k, v
    gate, up = torch.chunk(meg["mlp.linear_fc1.weight"], 2, dim=0)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = gate, up
    return {k: t.contiguous() for k, t in out.items()}


def pad_vocab_rows(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Embedding / output rows padded with zeros to megatron's padded vocabulary."""
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows does not fit {padded_rows} padded rows")
    if weight.shape[0] == padded_rows:
        return weight
    pad = torch.zeros(padded_rows - weight.shape[0], *weight.shape[1:], dtype=weight.dtype)
    return torch.cat([weight, pad], dim=0)
