"""Preprocessing throughput against the tokenizer's own raw batch-encoding throughput.

Builds a >= 50 MB jsonl corpus (the builtin corpus repeated, each copy shuffled),
then in one run measures, for each tokenizer and the same worker count:
  (a) raw: ``encode_batch`` of the same tokenizer on the same texts already in memory
      (HF tokenizers: Rust-threaded with ``workers`` threads);
  (b) ``longsky preprocess`` end to end: reading, JSON, checks, tokenizing, writing.
  (c) ``longsky preprocess`` as a command (a fresh process: interpreter start, imports,
      tokenizer load and the run), which is what a user waits for;
and prints tokens/s of each and the ratios (b)/(a) and (c)/(a) (the target is >= 0.8).

``--startup`` measures instead the wall time of the data commands on a tiny input (so
almost all of it is start-up: interpreter, imports, tokenizer), median of ``--repeats``
runs, for this checkout and, with ``--baseline DIR``, another checkout side by side:

    python benchmarks/preprocess.py --workers 2 --min-mb 50
    python benchmarks/preprocess.py --startup --baseline /path/to/older/checkout --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, min_bytes: int, seed: int = 0) -> dict:
    from megatron_longsky.data.builtin_corpus import build_builtin_corpus

    base = path.with_suffix(".base.jsonl")
    build_builtin_corpus(base, max_bytes=16_000_000, seed=seed, split="all")
    lines = base.read_text(encoding="utf-8").split("\n")[:-1]  # not splitlines: texts may hold U+2028
    base.unlink()
    rng = random.Random(seed)
    written = docs = copies = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < min_bytes:
            rng.shuffle(lines)
            for line in lines:
                f.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
            docs += len(lines)
            copies += 1
    return {"bytes": written, "documents": docs, "copies": copies}


def raw_throughput(tokenizer, texts: list[str], batch: int = 512) -> tuple[int, float]:
    """In-process encode_batch (HF: Rust threads, RAYON_NUM_THREADS = workers)."""
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        tokens += sum(len(a) for a in tokenizer.encode_batch_arrays(texts[i:i + batch]))
    return tokens, time.perf_counter() - start


_SHARD: list[str] = []
_TOKENIZER = None


def _load_shard(tokenizer_cfg, corpus: str, shard: int, shards: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megatron_longsky.tokenizer import build_tokenizer

    global _TOKENIZER
    _TOKENIZER = build_tokenizer(tokenizer_cfg)
    with open(corpus, encoding="utf-8") as f:
        _SHARD.extend(json.loads(line)["text"] for i, line in enumerate(f) if i % shards == shard)


def _encode_shard(batch: int = 512) -> int:
    return sum(len(a) for i in range(0, len(_SHARD), batch) for a in _TOKENIZER.encode_batch_arrays(_SHARD[i:i + batch]))


def raw_throughput_processes(tokenizer_cfg, corpus: Path, workers: int) -> tuple[int, float]:
    """``workers`` processes, each encoding its share of the texts already in its memory
    (start-up and loading not timed): the ceiling for process-parallel preprocessing."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Pool(1, initializer=_load_shard, initargs=(tokenizer_cfg, str(corpus), i, workers))
             for i in range(workers)]
    try:
        for p in procs:
            p.apply(len, ([],))  # wait until each has loaded its share
        start = time.perf_counter()
        pending = [p.apply_async(_encode_shard) for p in procs]
        tokens = sum(r.get() for r in pending)
        return tokens, time.perf_counter() - start
    finally:
        for p in procs:
            p.terminate()


def preprocess_throughput(corpus: Path, out_prefix: Path, tokenizer_cfg, workers: int) -> tuple[int, float]:
    from megatron_longsky.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(inputs=[str(corpus)], output_prefix=str(out_prefix), tokenizer=tokenizer_cfg,
                           workers=workers, progress=False, overwrite=True)
    start = time.perf_counter()
    stats = preprocess(cfg)
    return stats.total_tokens, time.perf_counter() - start


def preprocess_command(corpus: Path, out_prefix: Path, tokenizer_cfg, workers: int, tree: Path = REPO) -> float:
    """Wall time of ``longsky preprocess`` (of the checkout ``tree``) run as its own process,
    start-up included. ``out_prefix`` must be new (older checkouts have no --overwrite)."""
    tok = ["--tokenizer-type", tokenizer_cfg.type] + (["--tokenizer-model", tokenizer_cfg.model]
                                                        if tokenizer_cfg.model else [])
    cmd = [sys.executable, "-m", "megatron_longsky.cli", "preprocess", "--input", str(corpus), "--output-prefix",
           str(out_prefix), "--workers", str(workers), "--no-progress", *tok]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    return time.perf_counter() - start


def startup(args) -> int:
    """Median wall time of each data command on a tiny input, per checkout."""
    work = Path(tempfile.mkdtemp(prefix="longsky-startup-"))
    corpus = work / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}. " * 20}) + "\n" for i in range(200)))
    trees = {"this checkout": REPO}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}

    def commands(out: Path) -> dict[str, list[str]]:
        data = f"{out}/in_text_document"
        return {
            "preprocess": ["preprocess", "--input", str(corpus), "--output-prefix", f"{out}/in", "--no-progress"],
            "preprocess --workers 2": ["preprocess", "--input", str(corpus), "--output-prefix", f"{out}/w2",
                                       "--workers", "2", "--no-progress"],
            "merge-datasets": ["merge-datasets", "--input", data, "--output-prefix", f"{out}/merged"],
            "build-cip": ["build-cip", "--input-prefix", data, "--output-prefix", f"{out}/cip", "--seq-length",
                          "256", "--docs-per-seq", "2", "--chunks-per-doc", "2"],
        }

    times: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for rep in range(args.repeats):
        for name, tree in trees.items():  # alternate the checkouts: the machine is shared
            out = work / f"{name.replace(' ', '_')}_{rep}"
            out.mkdir()
            env = {**os.environ, "PYTHONPATH": str(tree)}
            for label, cmd in commands(out).items():
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "megatron_longsky.cli", *cmd], check=True, env=env,
                               cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].setdefault(label, []).append(time.perf_counter() - start)
    labels = list(commands(work).keys())
    print(f"{'command (tiny input)':<26}" + "".join(f"{name + ' s':>18}" for name in trees)
          + ("   ratio" if len(trees) == 2 else ""))
    for label in labels:
        medians = [statistics.median(times[name][label]) for name in trees]
        ratio = f"{medians[0] / medians[1]:>8.1f}x" if len(medians) == 2 else ""
        print(f"{label:<26}" + "".join(f"{m:>18.2f}" for m in medians) + ratio)
    print(f"median of {args.repeats} alternating runs; cpus={os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-mb", type=float, default=50.0)
    parser.add_argument("--tokenizers", nargs="+", action="extend", choices=["hf", "byte"],
                        help="default: hf byte")
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="keep the corpus and outputs here")
    parser.add_argument("--startup", action="store_true", help="measure the data commands' start-up instead")
    parser.add_argument("--baseline", default=None,
                        help="another checkout whose commands are timed side by side (start-up and command)")
    args = parser.parse_args(argv)
    if args.startup:
        return startup(args)
    args.tokenizers = args.tokenizers or ["hf", "byte"]
    # The raw baseline gets the same parallelism as preprocessing: `workers` Rust threads.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.workers > 1 else "false"

    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer, train_bpe_tokenizer

    # The data modules import neither torch nor megatron-core (see --startup for the start-up itself).
    start = time.perf_counter()
    import megatron_longsky.data.indexed  # noqa: F401
    import_s = time.perf_counter() - start

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="longsky-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    info = build_corpus(corpus, int(args.min_mb * 1e6))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    print(f"corpus: {info['bytes'] / 1e6:.1f} MB, {info['documents']:,} documents "
          f"(builtin corpus x{info['copies']}, each copy shuffled); workers={args.workers}; "
          f"cpus={os.cpu_count()}; import of the dataset writer {import_s:.2f} s")

    rows = []
    for kind in args.tokenizers:
        if kind == "hf":
            bpe_dir = train_bpe_tokenizer(texts[: info["documents"] // info["copies"]], args.bpe_vocab,
                                          work / "bpe")
            cfg = TokenizerConfig("hf", str(bpe_dir))
            label = f"hf byte-level BPE {args.bpe_vocab}"
        else:
            cfg = TokenizerConfig("byte")
            label = "byte"
        tokenizer = build_tokenizer(cfg)
        # The machine is shared: alternate the measurements; report the median, then the best.
        runs = {"threads": [], "processes": [], "preprocess": [], "command": [], "baseline": []}
        for rep in range(args.repeats):
            tokens, seconds = raw_throughput(tokenizer, texts)
            runs["threads"].append(seconds)
            if args.workers > 1:
                proc_tokens, seconds = raw_throughput_processes(cfg, corpus, args.workers)
                assert proc_tokens == tokens, (proc_tokens, tokens)
                runs["processes"].append(seconds)
            pre_tokens, seconds = preprocess_throughput(corpus, work / f"out_{kind}", cfg, args.workers)
            if pre_tokens != tokens:
                raise SystemExit(f"token counts differ: raw {tokens} vs preprocess {pre_tokens}")
            runs["preprocess"].append(seconds)
            runs["command"].append(preprocess_command(corpus, work / f"cmd_{kind}_{rep}", cfg, args.workers))
            if args.baseline:
                runs["baseline"].append(preprocess_command(corpus, work / f"base_{kind}_{rep}", cfg, args.workers,
                                                           Path(args.baseline).resolve()))
        rows.append((label, tokens, runs))

    for stat, pick in (("median", statistics.median), ("best", min)):
        print(f"{stat} of {args.repeats} alternating runs each:")
        print(f"{'tokenizer':<24} {'tokens':>11} {'raw thr tok/s':>14} {'raw proc tok/s':>15} "
              f"{'preprocess tok/s':>17} {'ratio':>6} {'command tok/s':>14} {'ratio':>6}")
        for label, tokens, runs in rows:
            t = {k: pick(v) if v else float("inf") for k, v in runs.items()}
            raw = min(t["threads"], t["processes"])
            proc = f"{tokens / t['processes']:,.0f}" if t["processes"] < float("inf") else "-"
            print(f"{label:<24} {tokens:>11,} {tokens / t['threads']:>14,.0f} {proc:>15} "
                  f"{tokens / t['preprocess']:>17,.0f} {raw / t['preprocess']:>6.2f} "
                  f"{tokens / t['command']:>14,.0f} {raw / t['command']:>6.2f}")
            if runs["baseline"]:
                print(f"{'':<24} baseline command: {tokens / t['baseline']:,.0f} tok/s, "
                      f"ratio {raw / t['baseline']:.2f} ({args.baseline})")
    print(f"raw thr = encode_batch in one process ({args.workers} Rust threads for hf), raw proc = "
          f"{args.workers} processes encoding in-memory shares; ratio = preprocess tokens/s / the faster "
          "raw tokens/s (medians first: the verdict); command = `longsky preprocess` as its own process, "
          "start-up included")
    print("target: ratio >= 0.8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
