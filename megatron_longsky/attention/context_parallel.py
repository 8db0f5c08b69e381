"""Context parallelism helpers: the load-balanced zig-zag split and the K/V all-gather.

Each sequence is cut into ``2 * CP`` equal chunks; CP rank ``r`` keeps chunks ``r`` and
``2 * CP - 1 - r`` (the layout of megatron-core's ``get_batch_on_this_cp_rank`` and
Transformer Engine), so every rank gets the same amount of causal-attention work.
Attention on a rank needs every key and value: :func:`all_gather_sequence` gathers
them (autograd: all-gather forward, reduce-scatter of the gradient backward) and
:func:`zigzag_positions` gives the global position of every local and gathered token,
from which the exact causal mask follows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


class SequenceLengthError(ValueError):
    """A sequence that cannot be split across the context-parallel ranks."""


def validate_sequence_length(seq_length: int, cp_size: int, fp8: Optional[str] = None,
                             where: str = "seq_length") -> None:
    """Raise :class:`SequenceLengthError` unless ``seq_length`` splits into 2*CP chunks.

    With FP8 (GPU, Transformer Engine) each rank's shard must also divide by 16.
    """
    if cp_size < 1:
        raise SequenceLengthError(f"context_parallel_size must be >= 1, got {cp_size}")
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise SequenceLengthError(
            f"{where}={seq_length} is not divisible by 2 x context_parallel_size = {2 * cp_size}: "
            f"context parallelism cuts every sequence into 2*CP equal chunks (pad it to a multiple "
            f"of {2 * cp_size})")
    if fp8 and (seq_length // cp_size) % 16:
        raise SequenceLengthError(
            f"{where}={seq_length} with context_parallel_size={cp_size} gives shards of "
            f"{seq_length // cp_size} tokens; FP8 needs each shard divisible by 16 "
            f"(use a multiple of {16 * cp_size})")


def zigzag_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global positions (int64) of the tokens CP rank ``cp_rank`` holds, in its local order."""
    validate_sequence_length(seq_length, cp_size)
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    chunk = seq_length // (2 * cp_size)
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def gathered_positions(local_length: int, cp_size: int, device=None) -> Tensor:
    """Global positions of :func:`all_gather_sequence`'s output (rank 0's tokens, then rank 1's...)."""
    total = local_length * cp_size
    return torch.cat([zigzag_positions(total, cp_size, r, device) for r in range(cp_size)])


def split_for_cp(t: Tensor, dim: int, cp_size: int, cp_rank: int) -> Tensor:
    """This rank's two zig-zag chunks of ``t`` along ``dim``."""
    if cp_size == 1:
        return t
    validate_sequence_length(t.shape[dim], cp_size, where=f"tensor dim {dim} length")
    chunks = t.chunk(2 * cp_size, dim=dim)
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def unsplit_from_cp(parts: list[Tensor], dim: int) -> Tensor:
    """Inverse of :func:`split_for_cp`: the per-rank shards (in rank order) -> the full tensor."""
    cp_size = len(parts)
    if cp_size == 1:
        return parts[0]
    chunks: list[Optional[Tensor]] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        first, second = zigzag_chunk_ids(cp_size, rank)
        chunks[first], chunks[second] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _AllGatherSequence(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the gradient is reduce-scattered back."""

    @staticmethod
    def forward(ctx, x: Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if dist.get_backend(group) == dist.Backend.GLOO:
            # gloo has no reduce-scatter: all-reduce (a copy: autograd owns ``grad``), keep our slice.
            grad = grad.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(grad, group=group)
            return grad.chunk(world, dim=0)[rank].contiguous(), None
        grad = grad.contiguous()
        out = torch.empty_like(grad.chunk(world, dim=0)[0])
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def all_gather_sequence(x: Tensor, group) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 (rank order), differentiable."""
    if _group_size(group) == 1:
        return x
    return _AllGatherSequence.apply(x, group)


# ------------------------------------------------------------------ config-time checks
# What Transformer Engine's context-parallel attention accepts (TE 2.9-2.11,
# attention/dot_product_attention/context_parallel.py and its CP tests): THD (packed)
# input only with the p2p ring; a2a splits the query AND key/value heads of each TP rank
# over the CP (a2a) ranks; a2a+p2p needs two-level CP groups; FP8 attention neither with
# THD nor with the all-gather form. Our own attention (CPU, GPU without TE) takes all of
# these, but a config is checked for the cluster it is written for.

def packed_pad_multiple(cp_size: int, fp8: Optional[str] = None) -> int:
    """What each packed document is padded to: 2*CP chunks (CP load balancing), and with FP8
    each CP rank's part (length / CP) divisible by 16."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    if fp8:
        multiple = math.lcm(multiple, 16 * cp_size)
    return multiple


def validate_pad_multiple(multiple: int, cp_size: int, fp8: Optional[str] = None,
                          where: str = "packed document padding") -> None:
    """Every packed document is a multiple of ``multiple`` tokens: refuse one that breaks
    the CP chunking or, with FP8, the shard rule."""
    need = packed_pad_multiple(cp_size, fp8)
    if multiple % need:
        rules = [f"context_parallel_size={cp_size} cuts every document into {2 * cp_size} chunks"] if cp_size > 1 else []
        if fp8:
            rules.append("FP8 needs each CP rank's part of every document divisible by 16")
        raise SequenceLengthError(f"{where}={multiple} is not a multiple of {need}: {'; '.join(rules)}")


def validate_fp8_sequence_parallel(seq_length: int, micro_batch_size: int, cp: int, tp: int,
                                   sequence_parallel: bool, fp8: Optional[str]) -> None:
    """TE checks FP8 GEMM inputs as each rank holds them (transformer_engine/pytorch/utils.py,
    ``assert_dim_for_fp8_exec``, called on ``inputmat`` before the sequence-parallel all-gather in
    module/linear.py and module/layernorm_linear.py): with sequence parallelism that is
    micro_batch x seq_length / (CP x TP) rows, which must divide by 8."""
    if not fp8 or not sequence_parallel or tp < 2:
        return
    rows, shards = micro_batch_size * seq_length, cp * tp
    if rows % shards or (rows // shards) % 8:
        raise SequenceLengthError(
            f"model.seq_length={seq_length} x micro_batch_size={micro_batch_size} over context_parallel_size={cp} "
            f"x tensor_model_parallel_size={tp} (sequence parallelism) gives {rows / shards:g} rows per rank; FP8 "
            f"needs them divisible by 8 (Transformer Engine's assert_dim_for_fp8_exec): use a seq_length multiple "
            f"of {8 * shards // math.gcd(8 * shards, micro_batch_size)}")


def validate_context_parallel(model, parallel, packed: bool, micro_batch_size: int = 1) -> None:
    """Refuse, at config time, a model/parallel/data combination the attention cannot run.

    ``model``: ModelConfig; ``parallel``: ParallelConfig; ``packed``: rows hold several
    documents (THD). Raises ValueError naming the setting. A config asking for Transformer
    Engine explicitly is also checked against TE's attention-backend rules
    (:mod:`megatron_longsky.attention.te_rules`; with ``auto`` that happens at run time, once
    the machine is known).
    """
    from megatron_longsky.attention import te_rules

    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    validate_sequence_length(model.seq_length, cp, model.fp8, where="model.seq_length")
    validate_fp8_sequence_parallel(model.seq_length, micro_batch_size, cp, tp, parallel.sequence_parallel,
                                   model.fp8)
    if model.transformer_impl == "transformer_engine":
        te_rules.check_model(model, cp, packed)
    if model.fp8_attention != "off" and packed:
        raise ValueError(f"model.fp8_attention={model.fp8_attention} with packed rows (data.packed=true): "
                         "Transformer Engine's FP8 attention does not take THD (packed) input; use "
                         "fp8_attention=off for packed SFT")
    if cp == 1:
        return
    comm = parallel.cp_comm_type
    if packed and comm != "p2p":
        raise ValueError(f"parallel.cp_comm_type={comm} with packed rows (data.packed=true): Transformer "
                         "Engine's context parallelism takes THD (packed) input only with cp_comm_type=p2p")
    if comm == "all_gather" and model.fp8_attention != "off":
        raise ValueError(f"parallel.cp_comm_type=all_gather with model.fp8_attention={model.fp8_attention}: "
                         "Transformer Engine's all-gather context parallelism has no FP8 attention; use "
                         "cp_comm_type=p2p or a2a")
    if comm in ("a2a", "a2a+p2p"):
        a2a = cp if comm == "a2a" else parallel.hierarchical_context_parallel_sizes[0]
        heads = model.num_attention_heads // tp
        kv_heads = max(1, model.kv_groups // tp)
        if heads % a2a or kv_heads % a2a:
            raise ValueError(
                f"parallel.cp_comm_type={comm}: the all-to-all spreads each TP rank's attention heads over "
                f"{a2a} CP ranks, but a TP rank holds {heads} query heads and {kv_heads} key/value heads "
                f"(num_attention_heads={model.num_attention_heads}, num_query_groups={model.kv_groups}, "
                f"TP={tp}); use cp_comm_type=p2p or a CP (a2a) size dividing both")
