"""Blockwise attention on packed rows: the block rule before and now, side by side.

One CP rank's attention (forward + backward) over a packed row of documents, as the
long-SFT stage runs it: local queries (each document's zig-zag chunks) against the
all-gathered keys. "before": 512-row blocks, short runs (< size/4) sharing blocks of up
to 512 rows; "now": the defaults (``DEFAULT_BLOCK_SIZE``, short runs sharing blocks of at
most size/4 rows). Same inputs, same outputs (the max difference is printed); the ratio
is before / now per document-length range and CP size.

    .venv/bin/python benchmarks/blockwise_blocks.py [--tokens 2048] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch

from megatron_longsky.attention import blockwise
from megatron_longsky.attention import packed
from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE

HEADS, GROUPS, HEAD_DIM = 4, 2, 32  # the quickstart's model


@contextlib.contextmanager
def _rule(previous: bool):
    current = blockwise._block_bounds
    if previous:  # short runs shared blocks of up to the whole block size
        blockwise._block_bounds = lambda pos, seg, size: current(pos, seg, size, shared_limit=size)
    try:
        yield
    finally:
        blockwise._block_bounds = current


def _cu_seqlens(low: int, high: int, tokens: int, multiple: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    lengths, total = [], 0
    while total < tokens - 2 * high:
        lengths.append(max(multiple, rng.randint(low, high) // multiple * multiple))
        total += lengths[-1]
    lengths.append(tokens - total)
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _time(cu, cp, block, repeats):
    torch.manual_seed(0)
    total = int(cu[-1])
    q_pos, q_seg = packed.positions_and_segments(cu, cp, 0)
    k_pos, k_seg = packed.gathered_positions_and_segments(cu, cp)
    q = torch.randn(1, HEADS, total // cp, HEAD_DIM, requires_grad=True)
    k = torch.randn(1, GROUPS, total, HEAD_DIM, requires_grad=True)
    v = torch.randn(1, GROUPS, total, HEAD_DIM, requires_grad=True)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = blockwise.blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, scale=HEAD_DIM ** -0.5,
                                            causal=True, block_q=block, block_k=block)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best, out.detach()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the packed row (4 x 512)")
    parser.add_argument("--repeats", type=int, default=4, help="best of this many forward+backward passes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"packed row of {args.tokens} tokens, {HEADS} heads / {GROUPS} KV groups x {HEAD_DIM}; "
          f"rank 0's forward+backward, best of {args.repeats}; now: blocks of {DEFAULT_BLOCK_SIZE}")
    print("| document tokens | CP | before s | now s | before / now | max abs difference |")
    print("|---|---|---|---|---|---|")
    for low, high in ((8, 40), (60, 200), (150, 350), (400, 1000)):
        for cp in (1, 2):
            cu = _cu_seqlens(low, high, args.tokens, 2 * cp, seed=0)
            with _rule(previous=True):
                before, out_before = _time(cu, cp, 512, args.repeats)
            now, out_now = _time(cu, cp, DEFAULT_BLOCK_SIZE, args.repeats)
            diff = (out_before - out_now).abs().max().item()
            print(f"| {low}-{high} | {cp} | {before:.3f} | {now:.3f} | {before / now:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
