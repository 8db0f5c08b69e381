"""``longsky plan``: will a training config fit, and how fast would it run?

    longsky plan --config examples/configs/x.yaml --nodes 8 --gpus-per-node 8 [--gpu-memory-gb 80]
    longsky plan --dry-run --config examples/configs/recipes/skywork13b_200k/cpt.yaml --nodes 16
    longsky plan --dry-run --recipe examples/configs/recipes/skywork13b_200k [--nodes N] [key=value ...]

Reads the same YAML as ``longsky train`` (``key=value`` overrides work too), takes the
cluster shape from the flags, and prints per-GPU memory (parameters, gradients, optimizer
states with and without the distributed optimizer, activations per layer and in total,
the backward working set), checkpoint memory, whether the worst pipeline stage fits, and
the step time and MFU implied by the FLOP model at the stated peak and efficiency, with the
performance switches the GPU path will choose. See docs/plan.md.

``--dry-run`` builds and validates the megatron-core configs of one stage (``--config``) or
of every stage of a recipe directory, chained (``--recipe``; each stage's node count from
``--nodes`` or its ``# nodes: N`` header), as :mod:`megatron_longsky.plan.dry_run` describes,
and exits with status 1 and the reason when a stage would fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from megatron_longsky.config import ConfigError
from megatron_longsky.plan.flops import (
    DEVICE_PEAK_TFLOPS, attention_peak, device_peak_tflops, estimate_step_time, gemm_precision, step_flops,
)
from megatron_longsky.plan.inputs import perf_choices, plan_input  # noqa: F401 - re-exported
from megatron_longsky.plan.memory import GiB, PlanInput, checkpoint_memory, estimate_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longsky plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training YAML (as for longsky train)")
    parser.add_argument("--recipe", help="with --dry-run: a recipe directory (cpt/sft/long_sft/needle YAMLs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build and validate the stage's megatron-core configs for an H100 with TE (see above)")
    parser.add_argument("--simulate", choices=["gpu-te", "gpu"], default="gpu-te",
                        help="with --dry-run: the GPU machine simulated: with Transformer Engine (default) or "
                             "without (megatron-core local layers)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (required, except for --recipe)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="device memory, GiB (default 80)")
    parser.add_argument("--reserved-gb", type=float, default=4.0,
                        help="set aside for the CUDA context, NCCL buffers and allocator fragmentation (default 4)")
    parser.add_argument("--device", choices=sorted(DEVICE_PEAK_TFLOPS), default="h100",
                        help="GPU whose datasheet peak is used (default h100; FP8 peak when model.fp8 is set)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s per device (overrides --device)")
    parser.add_argument("--efficiency", type=float, default=0.4,
                        help="assumed fraction of the peak sustained over a step (default 0.4)")
    parser.add_argument("--attention", choices=["te", "longsky"], default="te",
                        help="te: Transformer Engine fused attention (GPU clusters); longsky: our CPU/no-TE attention")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="padded vocabulary (default: model.vocab_size, else the tokenizer's)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--require-fit", action="store_true", help="exit with status 1 if it does not fit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def _vocab_size(cfg, explicit: int | None) -> int:
    if explicit:
        return explicit
    tp = cfg.parallel.tensor_model_parallel_size
    if cfg.model.vocab_size:
        return cfg.model.padded_vocab_size(tensor_parallel=tp)
    from megatron_longsky.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(cfg.tokenizer)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure: ask for the size instead
        raise ConfigError(f"model.vocab_size is not set and the tokenizer could not be loaded ({exc}); "
                          "pass --vocab-size N") from exc
    return cfg.model.padded_vocab_size(tokenizer.vocab_size, tp)


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB/KiB for the small numbers of tiny CPU models."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size or unit == "KiB":
            return f"{n / size:8.2f} {unit}"
    raise AssertionError("unreachable")


def _flop(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size or unit == "MFLOP":
            return f"{n / size:.1f} {unit}"
    raise AssertionError("unreachable")


def render(p: PlanInput, mem, flops, timing, memory_gb: float, reserved_gb: float, peak: float,
           efficiency: float, ckpt=None, perf=None) -> str:
    m = p.model
    fits = mem.peak + reserved_gb * GiB <= memory_gb * GiB
    lines = [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(KV {m.kv_groups}), FFN {m.ffn_hidden_size}, vocab {p.vocab_size}, {m.resolved_dtype(on_gpu=True)}, "
        f"seq {m.seq_length}",
        f"layout: TP={p.tensor_parallel} PP={p.pipeline_parallel} CP={p.context_parallel} "
        f"DP={p.data_parallel} SP={'on' if p.sp_divisor > 1 else 'off'} micro-batch {p.micro_batch_size} x "
        f"{p.num_microbatches} micro-batches, recompute={m.recompute_granularity or 'none'}, attention={p.attention}",
        "",
        f"per-GPU memory (worst pipeline stage: {mem.worst_stage})",
        f"  parameters                      {_gib(mem.params)}",
        f"  gradients (fp32 main grads)     {_gib(mem.grads)}",
        f"  optimizer states                {_gib(mem.optimizer)}"
        f"   (distributed optimizer {'on' if p.use_distributed_optimizer else 'off'})",
        f"    without distributed optimizer {_gib(mem.optimizer_without_distributed)}",
        f"    with distributed optimizer    {_gib(mem.optimizer_with_distributed)}",
        *([f"  FP8 weight copies (TE cache)    {_gib(mem.fp8_weights)}"] if mem.fp8_weights else []),
        f"  activations per layer           {_gib(mem.activations_per_layer)}"
        f"   (no recompute: {_gib(mem.activations_per_layer_no_recompute).strip()})",
        f"  activations                     {_gib(mem.activations)}"
        f"   ({mem.layers_per_stage} layers x {mem.microbatches_in_flight} micro-batch(es) in flight + output layer)",
        f"  backward working set            {_gib(mem.transient)}",
        f"  total                           {_gib(mem.peak)}",
        f"  + reserved                      {_gib(reserved_gb * GiB)}",
        f"  => {'FITS' if fits else 'DOES NOT FIT'} in {memory_gb:g} GiB "
        f"({(mem.peak + reserved_gb * GiB) / (memory_gb * GiB):.0%})",
        "",
        f"step ({flops.tokens} tokens): {_flop(flops.model_flops)} model, "
        f"{_flop(flops.hardware_flops)} with recomputation",
        f"  assuming {efficiency:.0%} of {peak:g} TFLOP/s per GPU (core attention in "
        f"{'FP8' if m.fp8 and m.fp8_attention != 'off' else 'BF16'}): {timing.step_seconds:.3g} s/step, "
        f"{timing.tokens_per_second_per_device:.0f} tokens/s/GPU, MFU {timing.mfu:.1%}, HFU {timing.hfu:.1%}",
    ]
    if ckpt is not None:
        lines += [
            "",
            f"checkpoint (optimizer form {ckpt.optimizer_format}, fully parallel over DP x CP = "
            f"{p.data_parallel * p.context_parallel} ranks)",
            f"  size on disk                    {_gib(ckpt.total_size)}",
            f"  written per rank                {_gib(ckpt.written_per_rank)}",
            f"  extra GPU memory at save        {_gib(ckpt.save_gpu_transient)}",
            f"  host memory at save, per rank   {_gib(ckpt.save_host_per_rank)}   (per node "
            f"{_gib(ckpt.save_host_per_node).strip()})",
            f"  read per resume (all ranks)     {_gib(ckpt.read_per_resume)}",
        ]
    if perf is not None:
        lines += ["", "GPU performance switches: " + perf.summary()]
    return "\n".join(lines)


def check_plan_args(args: argparse.Namespace) -> None:
    """Flags that make no sense are usage errors (exit 2), before any work."""
    if args.recipe and not args.dry_run:
        raise ConfigError("--recipe goes with --dry-run")
    if bool(args.recipe) == bool(args.config):
        raise ConfigError("give one of --config or --recipe")
    if args.nodes is None and not args.recipe:
        raise ConfigError("--nodes is required")
    if (args.nodes is not None and args.nodes < 1) or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    for flag, value in (("--gpu-memory-gb", args.gpu_memory_gb), ("--peak-tflops", args.peak_tflops)):
        if value is not None and not (value > 0 and math.isfinite(value)):  # also refuses NaN and inf
            raise ConfigError(f"{flag} must be > 0 and finite, got {value:g}")
    if not args.reserved_gb >= 0 or not args.reserved_gb < args.gpu_memory_gb:
        raise ConfigError(f"--reserved-gb must be >= 0 and below --gpu-memory-gb, got {args.reserved_gb:g}")
    if not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {args.efficiency:g}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ConfigError(f"--vocab-size must be >= 1, got {args.vocab_size}")


def check_recipe_dir(recipe: str, stages: tuple[str, ...]) -> None:
    """A recipe directory that is missing, lacks a stage or holds invalid YAML is the user's
    mistake (exit 2), found before any stage is built."""
    from megatron_longsky.config import load_yaml

    directory = Path(recipe)
    if not directory.is_dir():
        raise ConfigError(f"--recipe {directory}: {'not a directory' if directory.exists() else 'no such directory'}")
    missing = [f"{stage}.yaml" for stage in stages if not (directory / f"{stage}.yaml").is_file()]
    if missing:
        raise ConfigError(f"--recipe {directory}: no {', '.join(missing)} (a recipe directory holds "
                          f"{', '.join(f'{s}.yaml' for s in stages)} and optionally needle.yaml)")
    for path in sorted(directory.glob("*.yaml")):
        load_yaml(path)  # invalid YAML or text: a ConfigError naming the file and line


def dry_run_main(args) -> int:
    from megatron_longsky.plan.dry_run import (
        TRAIN_STAGES, DryRunError, dry_run_recipe, dry_run_train_stage, simulated_environment,
    )
    from megatron_longsky.training.config import load_train_config

    try:
        env = simulated_environment(args.simulate, args.device)
        if args.recipe:
            check_recipe_dir(args.recipe, TRAIN_STAGES)
            results = dry_run_recipe(args.recipe, args.overrides, args.nodes, args.gpus_per_node, env=env)
        else:
            cfg = load_train_config(args.config, args.overrides)
            vocab = _vocab_size(cfg, args.vocab_size)
            results = [dry_run_train_stage(Path(args.config).stem, cfg, args.nodes * args.gpus_per_node, vocab,
                                           env=env)]
    except DryRunError as exc:  # megatron-core refused a stage: the check failed (like --require-fit)
        print(f"longsky plan --dry-run: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError) as exc:
        print(f"longsky plan --dry-run: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"stage": r.name, **{k: str(v) for k, v in r.facts.items()}} for r in results], indent=2))
    else:
        for r in results:
            print(r.render())
        print(f"dry-run ({args.simulate}, {args.device}): every stage's TransformerConfig, DDP and optimizer "
              "configs validated by megatron-core, the model built on the meta device from that TransformerConfig"
              + (", Transformer Engine's attention-backend rules checked" if args.simulate == "gpu-te" else ""))
    return 0


def _config_kind_hint(message: str) -> str:
    """For a YAML of another kind (a needle or eval config): what ``--config`` expects."""
    if "unknown key(s)" in message and "valid keys for TrainConfig" in message:
        return (" -- longsky plan --config takes a training config (as longsky train does); a recipe's "
                "needle.yaml is checked with `longsky plan --dry-run --recipe DIR`")
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longsky.training.config import load_train_config

    try:
        check_plan_args(args)
    except ConfigError as exc:
        print(f"longsky plan: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run_main(args)
    try:
        cfg = load_train_config(args.config, args.overrides)
        vocab = _vocab_size(cfg, args.vocab_size)
        tp = cfg.parallel.tensor_model_parallel_size
        if vocab % tp:
            raise ConfigError(f"--vocab-size {vocab} is not divisible by tensor_model_parallel_size {tp}: "
                              "megatron-core splits the embedding rows evenly over TP (give the padded size)")
        world = args.nodes * args.gpus_per_node
        p = plan_input(cfg, world, vocab, args.attention)
    except (ConfigError, ValueError) as exc:
        print(f"longsky plan: {' '.join(str(exc).split())}{_config_kind_hint(str(exc))}", file=sys.stderr)
        return 2
    try:
        peak = args.peak_tflops or device_peak_tflops(args.device, gemm_precision(cfg.model))
    except ValueError as exc:
        print(f"longsky plan: {exc} (--peak-tflops)", file=sys.stderr)
        return 2
    mem = estimate_memory(p)
    flops = step_flops(cfg.model, vocab, cfg.global_batch_size,
                       pipeline_parallel=cfg.parallel.pipeline_model_parallel_size)
    timing = estimate_step_time(flops, world, peak, args.efficiency, attention_peak(cfg.model, peak))
    perf = perf_choices(cfg, args.attention)
    ckpt = checkpoint_memory(p, world, args.gpus_per_node, cfg.checkpoint.optimizer_format,
                             cfg.checkpoint.async_save, perf.bucket_size)
    fits = mem.peak + args.reserved_gb * GiB <= args.gpu_memory_gb * GiB
    if args.json:
        print(json.dumps({"memory": mem.to_dict(), "flops": flops.to_dict(), "time": timing.to_dict(),
                          "checkpoint": ckpt.to_dict(),
                          "performance_switches": {k: v for k, v in dataclasses.asdict(perf).items() if k != "reasons"},
                          "fits": fits, "gpus": world, "data_parallel": p.data_parallel}, indent=2))
    else:
        print(render(p, mem, flops, timing, args.gpu_memory_gb, args.reserved_gb, peak, args.efficiency,
                     ckpt, perf))
    return 1 if args.require_fit and not fits else 0
