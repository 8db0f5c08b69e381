"""Chat-mode generation cost: KV-cache decoding vs recomputing the prompt per token.

The HF backend decodes with a KV cache (transformers); the Megatron backend decodes
with megatron-core's static KV cache at PP=1 / CP=1 and recomputes the whole prefix
for every new token otherwise (``LogitsBackend``). For each backend this measures both
ways on the same tiny Llama shape, prompt and answer length, in one run, and checks
that they generate the same tokens. Base-mode (teacher-forced) scoring needs one forward pass
either way, so this cost only concerns ``--mode chat``.

    python benchmarks/eval_generation.py --prompt 2048 --new-tokens 16
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", choices=["hf", "megatron", "both"], default="both")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers; prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s)")
    print(f"{'method':<40}{'seconds':>10}{'tokens/s':>10}")
    same = True
    if args.backend in ("hf", "both"):
        same &= _compare("HF", _hf_backend(args), args)
    if args.backend in ("megatron", "both"):
        same &= _compare("Megatron", _megatron_backend(args), args)
    return 0 if same else 1


def _hf_backend(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longsky.eval.backends import HFBackend

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128),
                         max_position_embeddings=args.prompt + args.new_tokens)
    return HFBackend(LlamaForCausalLM(config))


def _megatron_backend(args):
    from megatron_longsky.eval.megatron_backend import MegatronBackend
    from megatron_longsky.model import build_model, model_config_from_dict
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=0)
    cfg = model_config_from_dict({"num_layers": args.layers, "hidden_size": args.hidden,
                                  "num_attention_heads": args.hidden // 64,
                                  "num_query_groups": max(1, args.hidden // 128),
                                  "ffn_hidden_size": args.hidden * 3, "vocab_size": 32000,
                                  "seq_length": args.prompt + args.new_tokens})
    return MegatronBackend(build_model(cfg, ParallelConfig(), 32000), 32000)


def _compare(name: str, backend, args) -> bool:
    from megatron_longsky.eval.backends import LogitsBackend

    prompt = torch.randint(0, 32000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    backend.generate_greedy(prompt[:64], 2)  # warm-up
    start = time.perf_counter()
    cached = backend.generate_greedy(prompt, args.new_tokens)
    t_cache = time.perf_counter() - start
    start = time.perf_counter()
    recomputed = LogitsBackend.generate_greedy(backend, prompt, args.new_tokens)
    t_recompute = time.perf_counter() - start

    print(f"{name + ' KV cache':<40}{t_cache:>10.3f}{args.new_tokens / t_cache:>10.1f}")
    print(f"{name + ' recompute per token':<40}{t_recompute:>10.3f}{args.new_tokens / t_recompute:>10.1f}")
    print(f"{name}: recompute / KV cache: {t_recompute / t_cache:.1f}x; same tokens: {cached == recomputed}")
    return cached == recomputed


if __name__ == "__main__":
    raise SystemExit(main())
