"""CIP build throughput against a plain copy of the same number of tokens (the limit).

Writes a synthetic token dataset once (uint16 ids, log-normal document lengths), then
in one run: (1) copies ``--tokens`` tokens from that memory-mapped input into a new
.bin in blocks (what any builder must at least do), (2) builds CIP sequences with the
same number of output tokens through ``build_cip`` (planning, C++ index loop, gather
from the memory-mapped input, .idx, manifest). Prints both throughputs and the
ratio; also times the C++ index loop against the numpy reference on a small plan.

    python benchmarks/cip.py                       # 500M tokens at 128K, ~1.4 GB in /tmp
    python benchmarks/cip.py --tokens 50000000     # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_input(prefix: str, tokens: int, mean_doc: int, seed: int) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_longsky.data.metadata import write_meta

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths += np.maximum(1, rng.lognormal(np.log(mean_doc) - 0.5, 1.0, 10_000)).astype(np.int64).tolist()
    lengths = np.array(lengths, np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    block = 1 << 24
    for start in range(0, int(lengths.sum()), block):
        n = min(block, int(lengths.sum()) - start)
        builder.data_file.write(rng.integers(4, 32000, n, dtype=np.uint16).tobytes())
    for n in lengths.tolist():
        builder.sequence_lengths.append(n)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    write_meta(prefix, {"tokenizer": {"type": "synthetic", "fingerprint": "bench", "eod_id": 2,
                                      "vocab_size": 32000}})
    return len(lengths)


def plain_copy(src_bin: str, dst_bin: str, tokens: int, itemsize: int, block_tokens: int) -> float:
    """Copy ``tokens`` tokens (wrapping around the input) in blocks; seconds taken."""
    src = np.memmap(src_bin, dtype=np.uint8, mode="r")
    total, done = tokens * itemsize, 0
    buffer = np.empty(block_tokens * itemsize, np.uint8)
    started = time.perf_counter()
    with open(dst_bin, "wb") as f:
        while done < total:
            start = done % len(src)
            n = min(len(buffer), total - done, len(src) - start)
            buffer[:n] = src[start:start + n]
            f.write(memoryview(buffer[:n]))
            done += n
        f.flush()
        os.fsync(f.fileno())  # build_cip fsyncs its output too
    return time.perf_counter() - started


def index_loop_comparison(cfg, table, pool, num_seqs: int) -> tuple[float, float]:
    """Seconds of the index loop alone (same plan) for the C++ loop and the numpy reference."""
    from megatron_longsky._ext_cip_index import build_cip_index as cpp
    from megatron_longsky.data import cip
    from megatron_longsky.data.cip_reference import build_cip_index as reference

    rng = np.random.default_rng(0)
    order = cip._pass_order(pool, cfg.seed, 0, 2)
    args = (table.content_len, order, rng.integers(8, 33, num_seqs), rng.integers(2, 9, num_seqs),
            rng.bit_generator.random_raw(num_seqs).astype(np.uint64), cfg.sequence_tokens, 1, 2, 1, True, 0)
    times = []
    for fn in (cpp, reference):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def in_memory_comparison(cfg, table, src_bin: str, num_seqs: int) -> tuple[float, float]:
    """CPU side only, no disk: gather every planned sequence into a buffer vs copy as many
    contiguous tokens into the same buffer (seconds each, same batch size)."""
    from megatron_longsky._ext_cip_index import gather_tokens
    from megatron_longsky.data import cip

    pool = table.pool_ids["cip"]
    plan = cip.merge_plans(np.zeros(num_seqs, np.int64), {"cip": cip.plan_cip(cfg, table.content_len, pool, num_seqs)})
    seq_tokens = cfg.sequence_tokens
    batch = max(1, cip.GATHER_BATCH_TOKENS // seq_tokens)
    buffer = np.empty(batch * seq_tokens, np.uint16)
    sources = [np.memmap(src_bin, dtype=np.uint8, mode="r")]
    separator = np.array([2], np.uint16).tobytes()
    started = time.perf_counter()
    for first in range(0, num_seqs, batch):
        last = min(first + batch, num_seqs)
        gather_tokens(buffer.view(np.uint8), sources, 2, table.doc_src, table.doc_start, plan["seg_doc"],
                      plan["seg_off"], plan["seg_len"], plan["seq_seg_start"], first, last, seq_tokens,
                      separator, cfg.workers)
    gather_s = time.perf_counter() - started
    src = np.memmap(src_bin, dtype=np.uint16, mode="r")
    started = time.perf_counter()
    position = 0
    for first in range(0, num_seqs, batch):
        n, done = (min(first + batch, num_seqs) - first) * seq_tokens, 0
        while done < n:  # wrap around the input like the plain copy does
            start = position % len(src)
            m = min(n - done, len(src) - start)
            buffer[done:done + m] = src[start:start + m]
            done, position = done + m, position + m
    copy_s = time.perf_counter() - started
    return gather_s, copy_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=500_000_000, help="output tokens (>= 500M for the record)")
    p.add_argument("--input-tokens", type=int, default=100_000_000)
    p.add_argument("--seq-length", type=int, default=131072)
    p.add_argument("--mean-doc", type=int, default=1500)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each contender (median reported)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir in /tmp, removed)")
    args = p.parse_args(argv)

    from megatron_longsky.data import cip

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="cip-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        src = str(scratch / "input_text_document")
        started = time.perf_counter()
        docs = write_input(src, args.input_tokens, args.mean_doc, seed=0)
        print(f"input: {docs} documents, {args.input_tokens / 1e6:.0f}M tokens (uint16), written in "
              f"{time.perf_counter() - started:.1f} s")
        num_seqs = -(-args.tokens // args.seq_length)
        out_tokens = num_seqs * args.seq_length
        cfg = cip.CIPConfig(input_prefixes=[src], output_prefix=str(scratch / "cip"), seq_length=args.seq_length,
                            docs_per_seq=8, docs_per_seq_max=32, chunks_per_doc=2, chunks_per_doc_max=8,
                            chunking="random", separator="eod", num_sequences=num_seqs, seed=1, workers=args.workers)

        # warm the page cache, then alternate the contenders; report the median of each.
        # Both write to disk and fsync: the writes dominate, so the ratio measures the overhead.
        np.asarray(np.memmap(src + ".bin", dtype=np.uint8, mode="r")).sum(dtype=np.uint64)
        copy_times, cip_times = [], []

        def run_copy():
            os.sync()  # start each timed run with no dirty pages from the previous one
            copy_times.append(plain_copy(src + ".bin", str(scratch / "copy.bin"), out_tokens, 2,
                                         cip.GATHER_BATCH_TOKENS))
            os.unlink(scratch / "copy.bin")

        def run_cip():
            os.sync()
            started = time.perf_counter()
            manifest = cip.build_cip(cfg)
            cip_times.append(time.perf_counter() - started)
            assert manifest["statistics"]["tokens"] == out_tokens
            for suffix in (".bin", ".idx"):
                os.unlink(str(scratch / "cip") + suffix)
            return manifest

        manifest = None
        for r in range(args.rounds):  # alternate who goes first: the disk's state drifts
            if r % 2 == 0:
                run_copy()
                manifest = run_cip()
            else:
                manifest = run_cip()
                run_copy()
        copy_s, cip_s = float(np.median(copy_times)), float(np.median(cip_times))

        table = cip._build_table(cfg, {"cip": [src]}, 2)
        cpp_s, ref_s = index_loop_comparison(cfg, table, table.pool_ids["cip"], 200)

        gather_s, memcopy_s = in_memory_comparison(cfg, table, src + ".bin", num_seqs)
        stats = manifest["statistics"]["cip"]
        print(f"output: {num_seqs} sequences x {args.seq_length} = {out_tokens / 1e6:.1f}M tokens; "
              f"{stats['document_uses']} document uses, {stats['passes']} passes, {stats['cut_documents']} cut; "
              f"median chunk distance {stats['chunk_distance']['percentiles']['50']:.0f} tokens")
        print(f"{'':24}{'seconds':>10}{'Mtokens/s':>12}")
        print(f"{'plain copy':24}{copy_s:10.2f}{out_tokens / copy_s / 1e6:12.1f}   runs: "
              + ", ".join(f"{t:.2f}" for t in copy_times))
        print(f"{'build_cip (end to end)':24}{cip_s:10.2f}{out_tokens / cip_s / 1e6:12.1f}   runs: "
              + ", ".join(f"{t:.2f}" for t in cip_times))
        print(f"ratio build_cip / copy: {copy_s / cip_s:.2f} of medians, {min(copy_times) / min(cip_times):.2f} "
              f"of best runs (target >= 0.5)")
        print(f"in memory (no disk): CIP gather {gather_s:.2f} s vs contiguous copy {memcopy_s:.2f} s, "
              f"ratio {memcopy_s / gather_s:.2f}")
        print(f"index loop alone, 200 sequences: C++ {cpp_s:.3f} s, numpy reference {ref_s:.3f} s "
              f"({ref_s / cpp_s:.0f}x)")
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
