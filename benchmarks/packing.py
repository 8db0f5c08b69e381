"""Packing speed and fill rate: our C++ best-fit-decreasing against TRL's, in one run.

Draws ``--samples`` sample lengths from a long-tailed distribution (log-normal, or a
Pareto tail), clips them to the row length as TRL's ``bfd`` strategy does (truncate),
and packs the same lengths with:

* ``megatron_longsky.data.packing.pack_best_fit_decreasing`` (C++, pybind11);
* TRL's ``trl.data_utils._pack_bfd`` (the function behind ``pack_dataset(strategy="bfd")``)
  on a pyarrow table with one list column holding those lengths. The lists' values
  are of arrow's null type, so no token memory is touched: only TRL's packing work
  (sort, segment-tree best fit, building the packed table's offsets) is timed.

Prints rows, fill rate (tokens / (rows x seq_length)) and seconds for both, and the
speed ratio. TRL is needed only here: ``pip install trl``.

    python benchmarks/packing.py                          # 1M samples, rows of 4096, both distributions
    python benchmarks/packing.py --samples 200000 --seq-lengths 8192
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def draw_lengths(n: int, distribution: str, seq_length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":  # median ~ seq_length / 16, heavy right tail
        raw = rng.lognormal(np.log(seq_length / 16), 1.2, n)
    elif distribution == "pareto":  # most samples short, a few at the row length
        raw = (rng.pareto(1.2, n) + 1) * seq_length / 40
    else:
        raise ValueError(distribution)
    return np.clip(raw.astype(np.int64), 1, seq_length)


def pack_ours(lengths: np.ndarray, seq_length: int) -> tuple[int, float]:
    from megatron_longsky.data.packing import pack_best_fit_decreasing

    pack_best_fit_decreasing(lengths[:10], seq_length)  # load the extension outside the timing
    start = time.perf_counter()
    plan = pack_best_fit_decreasing(lengths, seq_length)
    seconds = time.perf_counter() - start
    rows = plan.row_lengths(lengths)
    assert len(plan.sample_ids) == len(lengths) and rows.max() <= seq_length
    return plan.num_rows, seconds


def pack_trl(lengths: np.ndarray, seq_length: int) -> tuple[int, float]:
    try:
        import pyarrow as pa
        from trl.data_utils import _pack_bfd
    except ImportError as exc:
        raise SystemExit(f"this benchmark compares with TRL: `pip install trl` ({exc})") from None

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1])))
    table = pa.Table.from_arrays([column], names=["input_ids"])
    start = time.perf_counter()
    packed = _pack_bfd(table, seq_length)
    seconds = time.perf_counter() - start
    packed_lengths = np.asarray(packed.column("input_ids").combine_chunks().value_lengths())
    assert packed_lengths.sum() == lengths.sum() and packed_lengths.max() <= seq_length
    return packed.num_rows, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--distributions", nargs="+", default=["lognormal", "pareto"], choices=["lognormal", "pareto"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    header = (f"{'distribution':<10} {'seq_len':>7} {'samples':>9} | {'ours rows':>9} {'fill':>7} {'sec':>7} | "
              f"{'TRL rows':>9} {'fill':>7} {'sec':>7} | {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for distribution in args.distributions:
        for seq_length in args.seq_lengths:
            lengths = draw_lengths(args.samples, distribution, seq_length, args.seed)
            total = int(lengths.sum())
            ours_rows, ours_sec = pack_ours(lengths, seq_length)
            trl_rows, trl_sec = pack_trl(lengths, seq_length)
            ours_fill = total / (ours_rows * seq_length)
            trl_fill = total / (trl_rows * seq_length)
            print(f"{distribution:<10} {seq_length:>7} {args.samples:>9} | {ours_rows:>9} {ours_fill:>7.4f} "
                  f"{ours_sec:>7.3f} | {trl_rows:>9} {trl_fill:>7.4f} {trl_sec:>7.2f} | "
                  f"{trl_sec / ours_sec:>6.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
