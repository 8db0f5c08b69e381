"""Chat-mode generation cost: KV-cache decoding vs recomputing the prompt per token.

The HF backend decodes with a KV cache; the Megatron backend (and any backend built on
``LogitsBackend``) recomputes the whole prefix for every new token. This measures both
on the same tiny Llama, prompt and answer length, in one run, and checks that they
generate the same tokens. Base-mode (teacher-forced) scoring needs one forward pass
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longsky.eval.backends import HFBackend, LogitsBackend

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128),
                         max_position_embeddings=args.prompt + args.new_tokens)
    backend = HFBackend(LlamaForCausalLM(config))
    prompt = torch.randint(0, 32000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    backend.generate_greedy(prompt[:64], 2)  # warm-up
    start = time.perf_counter()
    cached = backend.generate_greedy(prompt, args.new_tokens)
    t_cache = time.perf_counter() - start
    start = time.perf_counter()
    recomputed = LogitsBackend.generate_greedy(backend, prompt, args.new_tokens)
    t_recompute = time.perf_counter() - start

    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers; prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s)")
    print(f"{'method':<28}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'KV cache (HFBackend)':<28}{t_cache:>10.3f}{args.new_tokens / t_cache:>10.1f}")
    print(f"{'recompute (LogitsBackend)':<28}{t_recompute:>10.3f}{args.new_tokens / t_recompute:>10.1f}")
    print(f"recompute / KV cache: {t_recompute / t_cache:.1f}x; same tokens: {cached == recomputed}")
    return 0 if cached == recomputed else 1


if __name__ == "__main__":
    raise SystemExit(main())
