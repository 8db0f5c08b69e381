"""Exact attention over K/V blocks with an online softmax (flash-attention style, in PyTorch).

Masks are never given as tensors: every query and key carries a *position* and
optionally a *segment* (document) id, and key ``j`` is visible to query ``i`` iff

    (not causal or k_pos[j] <= q_pos[i])  and  (no segments or q_seg[i] == k_seg[j])

so only one ``block_q x block_k`` piece of the mask and scores exists at a time.
Blocks that the mask hides entirely are skipped; blocks it leaves fully visible need no
mask. The backward pass recomputes each block's probabilities from the saved row
log-sum-exp instead of keeping them, so memory stays O(s) per head, not O(s^2).

Positions need not be sorted: the context-parallel zig-zag layout and all-gathered
keys (ranks' chunks concatenated) are handled by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    pos_min: int
    pos_max: int
    seg_min: int
    seg_max: int


def _runs(pos: Tensor, seg: Optional[Tensor]) -> list[tuple[int, int]]:
    """Maximal runs of one segment whose positions step by 0 or 1 (GQA-folded queries
    repeat each position), as ``(start, end)``: the zig-zag chunks of context
    parallelism and the documents of a packed row."""
    n = pos.numel()
    if n == 0:
        return []
    step = pos[1:] - pos[:-1]
    breaks = (step < 0) | (step > 1)
    if seg is not None:
        breaks |= seg[1:] != seg[:-1]
    cuts = [0] + (breaks.nonzero().squeeze(1) + 1).tolist() + [n]
    return list(zip(cuts[:-1], cuts[1:]))


def _pieces(run_length: int, size: int) -> int:
    return -(-run_length // size)  # equal blocks, none over size


def longest_block(run_length: int, size: int) -> int:
    """The longest block a run of ``run_length`` rows is cut into (the memory planner's
    figure for one block's working set)."""
    return -(-run_length // _pieces(run_length, size))


def _block_bounds(pos: Tensor, seg: Optional[Tensor], size: int,
                  shared_limit: Optional[int] = None) -> list[tuple[int, int]]:
    """Blocks of at most ``size`` rows that follow the runs: a run of at least size/4 rows
    gets blocks of its own (which the causal and segment rules can then skip, or take
    without a mask); shorter runs share blocks of at most size/4 rows with their
    neighbours (masked), which bounds the number of blocks for rows of many short
    documents. Shared blocks of up to ``size`` rows made a packed row under context
    parallelism (every document cut into 2*CP short chunks) compute most of its
    all-document score matrix: 2-6x slower (benchmarks/RESULTS.md, "Blockwise attention").
    ``shared_limit``: the most rows of a shared block (default size/4; the benchmark's "before"
    passes ``size``)."""
    bounds: list[tuple[int, int]] = []
    open_start = open_end = None
    short = max(1, size // 4)
    shared = short if shared_limit is None else shared_limit
    for start, end in _runs(pos, seg):
        if end - start < short:
            if open_start is not None and end - open_start <= shared:
                open_end = end
                continue
            if open_start is not None:
                bounds.append((open_start, open_end))
            open_start, open_end = start, end
            continue
        if open_start is not None:
            bounds.append((open_start, open_end))
            open_start = None
        pieces = _pieces(end - start, size)
        edges = [start + (end - start) * i // pieces for i in range(pieces + 1)]
        bounds.extend(zip(edges[:-1], edges[1:]))
    if open_start is not None:
        bounds.append((open_start, open_end))
    return bounds


def _blocks(pos: Tensor, seg: Optional[Tensor], size: int) -> list[_Block]:
    bounds = _block_bounds(pos, seg, size)
    offsets = torch.tensor([0] + [end for _, end in bounds], dtype=torch.long)

    def reduce(values: Tensor, how: str) -> list[int]:
        # float64 holds every position and segment id exactly
        return torch.segment_reduce(values.detach().cpu().double(), how, offsets=offsets).long().tolist()

    pmin, pmax = reduce(pos, "min"), reduce(pos, "max")
    smin, smax = ([0] * len(bounds),) * 2 if seg is None else (reduce(seg, "min"), reduce(seg, "max"))
    return [_Block(start, end, pmin[i], pmax[i], smin[i], smax[i]) for i, (start, end) in enumerate(bounds)]


def _relation(qb: _Block, kb: _Block, causal: bool) -> str:
    """'skip' (all hidden), 'full' (all visible) or 'mask' (needs the element mask)."""
    if causal and kb.pos_min > qb.pos_max:
        return "skip"
    if kb.seg_min > qb.seg_max or kb.seg_max < qb.seg_min:
        return "skip"
    same_segment = qb.seg_min == qb.seg_max == kb.seg_min == kb.seg_max
    if same_segment and (not causal or kb.pos_max <= qb.pos_min):
        return "full"
    return "mask"


def visible(q_pos: Tensor, k_pos: Tensor, q_seg: Optional[Tensor], k_seg: Optional[Tensor], causal: bool) -> Tensor:
    """Boolean [len(q), len(k)] mask, True where the key is visible (one block's worth)."""
    allowed = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= k_pos[None, :] <= q_pos[:, None]
    if q_seg is not None:
        allowed &= q_seg[:, None] == k_seg[None, :]
    return allowed


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: at least float32 (bf16/fp16 inputs)."""
    return torch.promote_types(dtype, torch.float32)


class _BlockwiseAttention(torch.autograd.Function):
    """q [B, H, M, d], k/v [B, H, N, d] (same H: GQA groups are folded into M by the caller)."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_seg, k_seg, scale, causal, block_q, block_k):
        q_blocks = _blocks(q_pos, q_seg, block_q)
        k_blocks = _blocks(k_pos, k_seg, block_k)
        acc_dtype = _accumulation_dtype(q.dtype)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], math.inf, dtype=acc_dtype, device=q.device)
        for qb in q_blocks:
            qs = q[:, :, qb.start:qb.end]
            row_max = torch.full(qs.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(qs.shape, dtype=acc_dtype, device=q.device)
            for kb in k_blocks:
                rel = _relation(qb, kb, causal)
                if rel == "skip":
                    continue
                scores = torch.matmul(qs, k[:, :, kb.start:kb.end].transpose(-1, -2)).to(acc_dtype) * scale
                if rel == "mask":
                    allowed = visible(q_pos[qb.start:qb.end], k_pos[kb.start:kb.end],
                                      None if q_seg is None else q_seg[qb.start:qb.end],
                                      None if k_seg is None else k_seg[kb.start:kb.end], causal)
                    scores = scores.masked_fill(~allowed, -math.inf)
                new_max = torch.maximum(row_max, scores.amax(-1))
                safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                probs = torch.exp(scores - safe_max[..., None])
                correction = torch.exp(row_max - safe_max)
                row_sum = row_sum * correction + probs.sum(-1)
                acc = acc * correction[..., None] + torch.matmul(probs.to(v.dtype), v[:, :, kb.start:kb.end]).to(acc_dtype)
                row_max = new_max
            seen = row_sum > 0
            out[:, :, qb.start:qb.end] = (acc / torch.where(seen, row_sum, torch.ones_like(row_sum))[..., None]).to(q.dtype)
            lse[:, :, qb.start:qb.end] = torch.where(seen, row_max + torch.log(row_sum), torch.full_like(row_sum, math.inf))
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg)
        ctx.scale, ctx.causal, ctx.block_q, ctx.block_k = scale, causal, block_q, block_k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, q_pos, k_pos, q_seg, k_seg = ctx.saved_tensors
        scale, causal = ctx.scale, ctx.causal
        q_blocks = _blocks(q_pos, q_seg, ctx.block_q)
        k_blocks = _blocks(k_pos, k_seg, ctx.block_k)
        acc_dtype = _accumulation_dtype(q.dtype)
        grad_out = grad_out.to(acc_dtype)
        delta = (grad_out * out.to(acc_dtype)).sum(-1)  # [B, H, M]
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for qb in q_blocks:
            qs = q[:, :, qb.start:qb.end].to(acc_dtype)
            go = grad_out[:, :, qb.start:qb.end]
            row_lse = lse[:, :, qb.start:qb.end, None]
            row_delta = delta[:, :, qb.start:qb.end, None]
            for kb in k_blocks:
                rel = _relation(qb, kb, causal)
                if rel == "skip":
                    continue
                ks, vs = k[:, :, kb.start:kb.end].to(acc_dtype), v[:, :, kb.start:kb.end].to(acc_dtype)
                scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
                if rel == "mask":
                    allowed = visible(q_pos[qb.start:qb.end], k_pos[kb.start:kb.end],
                                      None if q_seg is None else q_seg[qb.start:qb.end],
                                      None if k_seg is None else k_seg[kb.start:kb.end], causal)
                    scores = scores.masked_fill(~allowed, -math.inf)
                probs = torch.exp(scores - row_lse)
                dv[:, :, kb.start:kb.end] += torch.matmul(probs.transpose(-1, -2), go)
                dprobs = torch.matmul(go, vs.transpose(-1, -2))
                dscores = probs * (dprobs - row_delta) * scale
                dq[:, :, qb.start:qb.end] += torch.matmul(dscores, ks)
                dk[:, :, kb.start:kb.end] += torch.matmul(dscores.transpose(-1, -2), qs)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def _fold_groups(q: Tensor, q_pos: Tensor, q_seg: Optional[Tensor], groups: int):
    """[B, Hq, S, d] -> [B, Hkv, S*g, d] with rows ordered by position, then group."""
    b, hq, s, d = q.shape
    q = q.view(b, hq // groups, groups, s, d).transpose(2, 3).reshape(b, hq // groups, s * groups, d)
    q_pos = q_pos.repeat_interleave(groups)
    q_seg = None if q_seg is None else q_seg.repeat_interleave(groups)
    return q, q_pos, q_seg


def _unfold_groups(out: Tensor, heads: int, groups: int) -> Tensor:
    b, hkv, sg, d = out.shape
    s = sg // groups
    return out.view(b, hkv, s, groups, d).transpose(2, 3).reshape(b, heads, s, d)


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
    q_seg: Optional[Tensor] = None, k_seg: Optional[Tensor] = None, *,
    scale: float, causal: bool = True, block_q: int = 1024, block_k: int = 1024,
) -> Tensor:
    """Attention of q [B, Hq, Sq, d] over k, v [B, Hkv, Sk, d] (Hq a multiple of Hkv, GQA).

    ``q_pos``/``k_pos`` (int64 [Sq]/[Sk]) and ``q_seg``/``k_seg`` (int [Sq]/[Sk] or None)
    are shared by every batch row. Returns [B, Hq, Sq, d]. Queries that see no key get 0.
    """
    _check_shapes(q, k, v, q_pos, k_pos, q_seg, k_seg)
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    if groups > 1:
        q, q_pos, q_seg = _fold_groups(q, q_pos, q_seg, groups)
    # Blocks count rows of the folded query, so scale the query block with the groups.
    out = _BlockwiseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), q_pos, k_pos,
                                    q_seg, k_seg, float(scale), bool(causal), block_q * groups, block_k)
    return _unfold_groups(out, heads, groups) if groups > 1 else out


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
    q_seg: Optional[Tensor] = None, k_seg: Optional[Tensor] = None, *, scale: float, causal: bool = True,
) -> Tensor:
    """The same computation through ``scaled_dot_product_attention`` with one explicit
    [Sq, Sk] mask: used when the whole problem is a single block, and as the reference."""
    _check_shapes(q, k, v, q_pos, k_pos, q_seg, k_seg)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    allowed = visible(q_pos, k_pos, q_seg, k_seg, causal)
    seen = allowed.any(-1)
    if not bool(seen.all()):  # SDPA gives NaN for rows with no visible key: we give 0
        allowed = allowed | ~seen[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        return out * seen[:, None].to(out.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _check_shapes(q, k, v, q_pos, k_pos, q_seg, k_seg) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B,Hq,Sq,d] and k, v [B,Hkv,Sk,d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")
    if q_pos.numel() != q.shape[2] or k_pos.numel() != k.shape[2]:
        raise ValueError(f"positions ({q_pos.numel()}, {k_pos.numel()}) do not match sequence lengths "
                         f"({q.shape[2]}, {k.shape[2]})")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("give segment ids for both queries and keys, or for neither")
    if q_seg is not None and (q_seg.numel() != q.shape[2] or k_seg.numel() != k.shape[2]):
        raise ValueError("segment ids do not match sequence lengths")
