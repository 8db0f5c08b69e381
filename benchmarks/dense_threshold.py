"""One SDPA call or blockwise attention, for an unpacked sequence at CP=1: side by side.

LongSkyCoreAttention runs a sequence of at most ``DENSE_MAX_TOKENS`` tokens (CP=1, no packed
documents) as one ``scaled_dot_product_attention`` call with an explicit [S, S] mask, and
longer ones blockwise (``DEFAULT_BLOCK_SIZE`` rows per block). This prints forward + backward
time of both at each length (the quickstart's model: 4 heads, 2 query groups, head dim 32),
the ratio blockwise / dense, the largest difference between their outputs, and the bytes of
the one [B, H, S, S] score matrix the dense call materialises (the blockwise path holds
[B, H, block, block] at a time).

    .venv/bin/python benchmarks/dense_threshold.py [--lengths 256,512,1024,2048] [--batches 1,4]
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_longsky.attention.blockwise import blockwise_attention, dense_attention
from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE, DENSE_MAX_TOKENS

HEADS, GROUPS, HEAD_DIM = 4, 2, 32


def _seconds(fn, q, k, v, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="256,384,512,768,1024,2048")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    scale = HEAD_DIM ** -0.5
    print(f"threads {torch.get_num_threads()}; DEFAULT_BLOCK_SIZE {DEFAULT_BLOCK_SIZE}; "
          f"DENSE_MAX_TOKENS {DENSE_MAX_TOKENS}")
    print("| tokens | batch | dense ms | blockwise ms | blockwise / dense | max diff | dense scores MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            q = torch.randn(batch, HEADS, length, HEAD_DIM, requires_grad=True)
            k = torch.randn(batch, HEADS // GROUPS, length, HEAD_DIM, requires_grad=True)
            v = torch.randn(batch, HEADS // GROUPS, length, HEAD_DIM, requires_grad=True)
            pos = torch.arange(length)

            def dense(q, k, v):
                return dense_attention(q, k, v, pos, pos, scale=scale, causal=True)

            def blocks(q, k, v):
                return blockwise_attention(q, k, v, pos, pos, scale=scale, causal=True,
                                           block_q=DEFAULT_BLOCK_SIZE, block_k=DEFAULT_BLOCK_SIZE)

            with torch.no_grad():
                diff = (dense(q, k, v) - blocks(q, k, v)).abs().max().item()
            # Alternate the two so that load on a shared machine hits both alike.
            d = b = float("inf")
            for _ in range(2):
                d = min(d, _seconds(dense, q, k, v, args.repeats))
                b = min(b, _seconds(blocks, q, k, v, args.repeats))
            mib = batch * HEADS * length * length * 4 / 2**20
            print(f"| {length} | {batch} | {d * 1e3:.1f} | {b * 1e3:.1f} | {b / d:.2f} | {diff:.1e} | {mib:.0f} |")


if __name__ == "__main__":
    main()
