"""Command-line plumbing shared by ``longsky needle`` and ``longsky eval``: which model,
which tokenizer, which parallel layout."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_longsky.eval.backends import LMBackend
from megatron_longsky.tokenizer import TokenizerConfig, add_tokenizer_args, build_tokenizer
from megatron_longsky.tokenizer.base import Tokenizer

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="our checkpoint: a root with 'latest' or an iter_XXXXXXX directory")
    source.add_argument("--hf-model", help="a local Hugging Face model directory (transformers)")
    group = parser.add_argument_group("parallelism (--checkpoint; launch with torchrun/srun for >1 process)")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--cp", type=int, default=1, help="context-parallel size (long contexts)")
    group.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None,
                       help="run the GEMMs in FP8 (Transformer Engine, GPU); default: the checkpoint's dtype "
                            "(bf16 for the recipes) without FP8, whatever the training config used")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="--checkpoint: default bfloat16 on a GPU (float32 with Transformer Engine has no "
                            "attention backend at --cp > 1), the checkpoint's dtype on CPU; --hf-model: default float32")
    group = parser.add_argument_group("Hugging Face model (--hf-model)")
    group.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_tokenizer_args(parser)
    # No tokenizer flag means: the model's own tokenizer.
    parser.set_defaults(tokenizer_type=None)


def default_tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    """The tokenizer flags if given, else the tokenizer recorded with the model."""
    if args.tokenizer_type is not None:
        return TokenizerConfig(type=args.tokenizer_type, model=args.tokenizer_model)
    if args.tokenizer_model is not None:
        raise SystemExit("error: --tokenizer-model needs --tokenizer-type")
    if args.hf_model:
        if not (Path(args.hf_model) / "tokenizer.json").exists():
            raise SystemExit(f"error: {args.hf_model} has no tokenizer.json; pass --tokenizer-type/--tokenizer-model")
        return TokenizerConfig(type="hf", model=args.hf_model)
    from megatron_longsky.checkpoint import read_checkpoint_config, resolve_checkpoint

    ckpt_dir = resolve_checkpoint(args.checkpoint)
    entry = read_checkpoint_config(ckpt_dir).get("tokenizer")
    if not isinstance(entry, dict) or "type" not in entry:
        raise SystemExit(f"error: {ckpt_dir}/config.yaml records no tokenizer; pass --tokenizer-type/--tokenizer-model")
    return TokenizerConfig(type=entry["type"], model=entry.get("model"))


@dataclass
class LoadedModel:
    backend: LMBackend
    tokenizer: Tokenizer
    name: str
    is_writer: bool  # the rank that writes reports
    distributed: bool
    # What was loaded (resolved checkpoint iteration or HF directory): a sweep journal
    # written for another model is never resumed.
    source: str = ""
    # The chat template the checkpoint was trained with (recorded at SFT), if any.
    chat_template: Optional[dict] = None


def recorded_chat_template(args: argparse.Namespace) -> Optional[dict]:
    """The chat template ``--checkpoint`` recorded at SFT time (None: none, or ``--hf-model``)."""
    if not args.checkpoint:
        return None
    from megatron_longsky.checkpoint import read_checkpoint_config, resolve_checkpoint

    return read_checkpoint_config(resolve_checkpoint(args.checkpoint)).get("chat_template")


def load_model(args: argparse.Namespace, tokenizer: Optional[Tokenizer] = None) -> LoadedModel:
    """The model of ``args`` with its tokenizer (``tokenizer``: one already built from them)."""
    tokenizer = tokenizer or build_tokenizer(default_tokenizer_config(args))
    if args.hf_model:
        from megatron_longsky.eval.backends import HFBackend

        backend = HFBackend.from_pretrained(args.hf_model, dtype=args.dtype or "float32", device=args.device)
        return LoadedModel(backend, tokenizer, Path(args.hf_model).name, True, False,
                           source=str(Path(args.hf_model).resolve()))
    from megatron_longsky.eval.megatron_backend import MegatronBackend
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize

    from megatron_longsky.checkpoint.layout import resolve_checkpoint

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              context_parallel_size=args.cp)
    resolve_checkpoint(args.checkpoint)  # a wrong path is found before any process group exists
    runtime = initialize(parallel)
    try:
        backend = MegatronBackend.from_checkpoint(args.checkpoint, parallel, vocab_size=tokenizer.vocab_size,
                                                  fp8=getattr(args, "fp8", None), dtype=getattr(args, "dtype", None))
    except BaseException:
        from megatron_longsky.runtime.distributed import shutdown

        shutdown()
        raise
    from megatron_longsky.checkpoint import read_checkpoint_config

    ckpt_dir = resolve_checkpoint(args.checkpoint)
    # Path and write time: a checkpoint saved again at the same path is another model.
    source = f"{ckpt_dir.resolve()}@{(ckpt_dir / 'model').stat().st_mtime_ns}"
    return LoadedModel(backend, tokenizer, Path(args.checkpoint).resolve().name, runtime.rank == 0, True,
                       source=source,
                       chat_template=read_checkpoint_config(ckpt_dir).get("chat_template"))


def finish(model: LoadedModel) -> None:
    if model.distributed:
        from megatron_longsky.runtime.distributed import shutdown

        shutdown()


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: {what} is empty")
    return values


def parse_depths(text: str) -> tuple[Optional[list[float]], Optional[int]]:
    """``11`` -> 11 evenly spaced depths; ``0,25,50`` -> those percentages."""
    try:
        if "," not in text:
            return None, int(text)
        return [float(v) for v in text.split(",") if v.strip()], None
    except ValueError:
        raise SystemExit(f"error: --depths takes a count (11) or percentages (0,50,100), got {text!r}") from None
