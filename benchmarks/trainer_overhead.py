"""Overhead of our training loop over a bare megatron-core loop, measured in one run.

Both run the same tiny Llama-style model (preset ``tiny``: 2 layers, hidden 64, GQA) at
sequence length 256 on one CPU process, global batch 8 in 2 micro-batches, fp32,
Adam with gradient clipping:

* bare: GPTModel + megatron-core DDP + ``get_megatron_optimizer``; batches pre-made in
  memory; each step = zero grads, ``get_forward_backward_func()`` over the
  micro-batches, ``optimizer.step()``. Nothing else.
* ours: ``megatron_longsky.training.train(cfg)`` on an indexed dataset of the same
  shape (GPTDataset + our loader, per-token loss reduction, NaN check, LR schedule,
  metrics.jsonl, preemption check; no checkpoint saving, no TensorBoard).

Rounds alternate (bare, ours, bare, ours, ...) so machine load hits both alike; a
first warm-up round and the first step of each round are excluded. Prints steps/s of each, the overhead ratio and
our data-wait fraction.

    python benchmarks/trainer_overhead.py [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEQ, GLOBAL_BATCH, MICRO_BATCH = 256, 8, 4
MODEL = {"preset": "tiny", "seq_length": SEQ, "vocab_size": 384}


def _dataset(tmp: Path) -> str:
    from megatron_longsky.data.indexed import IndexedDatasetWriter
    from megatron_longsky.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(tmp / "bench", np.uint16)
    for _ in range(400):
        doc = np.append(rng.integers(0, 256, size=int(rng.integers(200, 2000))), tok.eod_id)
        writer.add_document(doc.astype(np.uint16), [len(doc)])
    writer.finalize({"tokenizer": tok.metadata()})
    writer.commit()
    return str(tmp / "bench")


def _config(tmp: Path, prefix: str, steps: int, round_: int):
    from megatron_longsky.training.config import train_config_from_dict

    return train_config_from_dict({
        "model": MODEL, "tokenizer": {"type": "byte"},
        "data": {"prefixes": [prefix], "split": "100,0,0", "cache_dir": str(tmp / "cache")},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "clip_grad": 1.0},
        "schedule": {"warmup_iters": 2},
        "checkpoint": {"save": str(tmp / f"ckpt{round_}"), "save_at_end": False},
        "logging": {"log_interval": 1000, "tensorboard": False},
        "output_dir": str(tmp / f"run{round_}"), "train_iters": steps,
        "micro_batch_size": MICRO_BATCH, "global_batch_size": GLOBAL_BATCH, "seed": round_,
    })


def bare_loop(cfg, steps: int) -> float:
    """Steps/s of the plain megatron-core loop (first step excluded)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longsky.model import build_model
    from megatron_longsky.runtime.distributed import initialize

    initialize(cfg.parallel, cfg.seed)
    model = build_model(cfg.model, cfg.parallel, 384)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, weight_decay=0.1), [ddp])
    model.config.finalize_model_grads_func = finalize_model_grads
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 257, (MICRO_BATCH, SEQ + 1), generator=gen) for _ in range(2 * steps)]
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)

    def forward_step(data, m):
        b = next(data)
        out = m(b[:, :-1], positions, None, labels=b[:, 1:])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    it = iter(batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=it, model=[ddp],
                                    num_microbatches=GLOBAL_BATCH // MICRO_BATCH, seq_length=SEQ,
                                    micro_batch_size=MICRO_BATCH, forward_only=False)
        opt.step()
        times.append(time.perf_counter() - start)
    parallel_state.destroy_model_parallel()
    return 1.0 / statistics.mean(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_PORT", str(__import__("megatron_longsky.testing.multiprocess",
                                                        fromlist=["free_port"]).free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method="env://")
    from megatron_longsky.training.loop import train

    bare, ours, waits = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = _dataset(tmp)
        for r in range(args.rounds + 1):  # round 0 warms caches and allocators; not counted
            cfg = _config(tmp, prefix, args.steps, r)
            bare_rate = bare_loop(cfg, args.steps)
            result = train(cfg)
            if r == 0:
                continue
            bare.append(bare_rate)
            ours.append(result.steps_per_s)
            waits.append(result.data_wait_fraction)
            print(f"round {r}: bare {bare[-1]:.2f} steps/s, ours {ours[-1]:.2f} steps/s", file=sys.stderr)
    b, o = statistics.median(bare), statistics.median(ours)
    ratio = statistics.median(x / y for x, y in zip(bare, ours))  # per round: robust to load drift
    print(f"tiny model, seq {SEQ}, global batch {GLOBAL_BATCH} ({GLOBAL_BATCH // MICRO_BATCH} micro-batches), "
          f"1 CPU process, {args.rounds} alternating rounds x {args.steps} steps (median):")
    print(f"  bare megatron-core loop : {b:8.2f} steps/s")
    print(f"  longsky train loop      : {o:8.2f} steps/s")
    print(f"  overhead (time ours / time bare - 1, median of rounds): {100 * (ratio - 1):+8.2f} %")
    print(f"  data wait (ours)        : {100 * statistics.median(waits):8.2f} % of step time")
    print(f"  50 steps at this size   : {50 / o:8.1f} s of training (ours)")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
