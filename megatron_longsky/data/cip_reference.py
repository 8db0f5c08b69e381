"""Plain Python/numpy reference of the CIP index-building loop in ``csrc/cip_index.cpp``.

Slow and obvious on purpose: the tests check that the C++ loop gives exactly the
same segments, so every rule (water-filling budgets, chunking policies, the
splitmix64 draws for random split points, separator placement, emission order)
is written out here once more in the simplest form.
"""

from __future__ import annotations

import numpy as np

EQUAL, FIXED, RANDOM = 0, 1, 2
_MASK = (1 << 64) - 1


class SplitMix64:
    """splitmix64, bit-identical to the C++ generator."""

    def __init__(self, seed: int):
        self.state = int(seed) & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)


def water_fill(sizes: list[int], total: int) -> list[int]:
    """Budgets summing to ``total`` (<= sum(sizes)): short documents whole, long ones share."""
    n = len(sizes)
    by_size = sorted(range(n), key=lambda i: (sizes[i], i))
    budget = [0] * n
    remaining = total
    j = 0
    while j < n:
        i = by_size[j]
        if sizes[i] * (n - j) > remaining:
            break
        budget[i] = sizes[i]
        remaining -= sizes[i]
        j += 1
    rest = sorted(by_size[j:])
    if rest:
        q, r = divmod(remaining, len(rest))
        for p, i in enumerate(rest):
            budget[i] = q + (1 if p < r else 0)
    return budget


def chunk_sizes(content: int, k: int, policy: int, chunk_size: int, rng: SplitMix64) -> list[int]:
    if policy == EQUAL:
        q, r = divmod(content, k)
        sizes = [q + (1 if c < r else 0) for c in range(k)]
    elif policy == FIXED:
        sizes = [min(chunk_size, content - start) for start in range(0, content, chunk_size)]
    else:
        cuts = sorted(rng.next() % (content + 1) for _ in range(k - 1))
        bounds = [0, *cuts, content]
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    sizes = [s for s in sizes if s > 0]
    return sizes or [0]


def build_cip_index(lengths, order, n_per_seq, k_per_seq, seq_seed, seq_tokens: int, sep: int,
                    policy: int, chunk_size: int, interleave: bool, cursor: int) -> dict:
    """Same arguments and result as ``_ext_cip_index.build_cip_index``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    seg_doc, seg_off, seg_len, seq_start, distances = [], [], [], [0], []
    cut_documents = cut_tokens = extra_documents = 0
    exhausted = False
    for s in range(len(n_per_seq)):
        n_target, k = int(n_per_seq[s]), int(k_per_seq[s])
        rng = SplitMix64(int(seq_seed[s]))
        docs, sizes = [], []
        while len(docs) < n_target or sum(sizes) < seq_tokens:
            if cursor >= len(order):
                exhausted = True
                break
            d = int(order[cursor])
            cursor += 1
            docs.append(d)
            sizes.append(int(lengths[d]) + sep)
        if exhausted:
            break
        extra_documents += len(docs) - n_target
        budget = water_fill(sizes, seq_tokens)
        chunks = []
        for i in range(len(docs)):
            if budget[i] < sizes[i]:
                cut_documents += 1
                cut_tokens += sizes[i] - budget[i]
            chunks.append(chunk_sizes(max(budget[i] - sep, 0), k, policy, chunk_size, rng))

        next_offset = [0] * len(docs)
        last_end = [-1] * len(docs)
        pos = 0
        if interleave:
            emission = [(i, r) for r in range(max(map(len, chunks))) for i in range(len(docs)) if r < len(chunks[i])]
        else:
            emission = [(i, c) for i in range(len(docs)) for c in range(len(chunks[i]))]
        for i, c in emission:
            size = chunks[i][c]
            if size > 0:
                if last_end[i] >= 0:
                    distances.append(pos - last_end[i])
                seg_doc.append(docs[i])
                seg_off.append(next_offset[i])
                seg_len.append(size)
                next_offset[i] += size
                pos += size
                last_end[i] = pos
            if sep and c == len(chunks[i]) - 1 and budget[i] > 0:
                seg_doc.append(-1)
                seg_off.append(0)
                seg_len.append(1)
                pos += 1
        assert pos == seq_tokens, (pos, seq_tokens)
        seq_start.append(len(seg_doc))

    as64 = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return {
        "seg_doc": as64(seg_doc), "seg_off": as64(seg_off), "seg_len": as64(seg_len),
        "seq_seg_start": as64(seq_start), "distances": as64(distances), "cursor": cursor,
        "cut_documents": cut_documents, "cut_tokens": cut_tokens,
        "extra_documents": extra_documents, "exhausted": exhausted,
    }
