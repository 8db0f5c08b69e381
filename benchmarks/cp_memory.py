"""Memory per rank and step time of one long sequence at CP = 1, 2, 4 (gloo, CPU), in one run.

A tiny GPT (megatron-core, our LongSkyCoreAttention) trains one step on one sequence of
``--seq-length`` tokens (default 8192) at each context-parallel size. Per rank it measures:

* activation bytes: everything autograd saves for backward in the forward pass
  (unique storages, via ``saved_tensors_hooks``) - the memory CP is meant to divide;
* peak RSS growth during the first long step, after a short warm-up step (``ru_maxrss``
  minus the RSS before it): activations plus transient per-block buffers of the blockwise
  attention (those depend on ``--block-size``, not on CP);
* forward+backward wall time and CPU time of a second step (ranks share the machine's
  cores, so wall time at CP=4 on a 2-core box is oversubscribed: read CPU time too).

    python benchmarks/cp_memory.py --seq-length 8192 --cp 1 2 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _step(model, inputs):
    losses = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
                   packed_seq_params=inputs.packed_seq_params)
    loss = (losses * inputs.loss_mask).sum() / inputs.loss_mask.numel()
    loss.backward()
    model.zero_grad()


def _worker(cp: int, seq_length: int, block_size: int, vocab: int) -> dict:
    import torch

    from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE
    from megatron_longsky.model.build import build_model
    from megatron_longsky.model.config import ModelConfig
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize
    from megatron_longsky.training.batch import prepare_batch

    parallel = ParallelConfig(context_parallel_size=cp)
    initialize(parallel)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176,
                      seq_length=seq_length, vocab_size=vocab, transformer_impl="local")
    model = build_model(cfg, parallel, vocab_size=vocab)
    if block_size != DEFAULT_BLOCK_SIZE:
        for module in model.modules():
            if hasattr(module, "block_size") and type(module).__name__ == "LongSkyCoreAttention":
                module.block_size = block_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq_length), generator=g)
    inputs = prepare_batch(dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(1, seq_length)))

    # A short warm-up step first, so one-time allocations (thread pools, caches) are not counted.
    short = torch.randint(0, vocab, (1, 64 * cp), generator=g)
    _step(model, prepare_batch(dict(tokens=short, labels=short, loss_mask=torch.ones(1, 64 * cp))))

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    rss_before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels)
    (losses.sum() / losses.numel()).backward()
    model.zero_grad()
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    torch.distributed.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    _step(model, inputs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(cp=cp, local_tokens=int(inputs.tokens.numel()), activation_bytes=sum(storages.values()),
                peak_rss_growth=max(0, peak_growth), step_wall=wall, step_cpu=cpu)


def main(argv: list[str] | None = None) -> int:
    from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args(argv)

    from megatron_longsky.attention.context_parallel import validate_sequence_length
    from megatron_longsky.testing.multiprocess import run_distributed

    rows = []
    for cp in args.cp:
        validate_sequence_length(args.seq_length, cp)
        ranks = run_distributed(_worker, cp, cp, args.seq_length, args.block_size, args.vocab, timeout=3600)
        rows.append(dict(cp=cp, local_tokens=ranks[0]["local_tokens"],
                         activation=max(r["activation_bytes"] for r in ranks),
                         rss=max(r["peak_rss_growth"] for r in ranks),
                         wall=max(r["step_wall"] for r in ranks), cpu=max(r["step_cpu"] for r in ranks)))
        print(f"CP={cp} done", file=sys.stderr)

    base = rows[0]
    mib = 1 << 20
    print(f"seq_length={args.seq_length} tokens, tiny GPT (2 layers, hidden 64, 4 heads / 2 KV groups), "
          f"block_size={args.block_size}, max over ranks")
    print("| CP | tokens/rank | activations/rank MiB | ratio | peak RSS growth/rank MiB | ratio | "
          "step wall s | step CPU s/rank | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cp']} | {r['local_tokens']} | {r['activation'] / mib:.1f} | "
              f"{r['activation'] / base['activation']:.3f} | {r['rss'] / mib:.1f} | "
              f"{r['rss'] / max(base['rss'], 1):.3f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
              f"{r['cpu'] / base['cpu']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
