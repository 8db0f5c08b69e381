"""``longsky convert import|export`` (also ``tools/convert_checkpoint.py``)."""

from __future__ import annotations

import argparse
import sys

from megatron_longsky.config import ConfigError
from megatron_longsky.utils.logging import LOG_LEVELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longsky convert", description="Convert checkpoints between Hugging Face (Llama family) and megatron_longsky."
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF model directory -> our checkpoint (dist_checkpointing)")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors weights")
    imp.add_argument("--output", required=True, help="checkpoint root to create (must not exist)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is meant for")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is meant for")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="storage dtype of the weights (float32 holds bf16 sources exactly)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="accept pytorch_model*.bin pickles (only for sources you trust)")
    imp.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    exp = sub.add_parser("export", help="our checkpoint (any layout) -> HF LlamaForCausalLM directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root (with 'latest') or iteration directory")
    exp.add_argument("--output", required=True, help="HF directory to create (must not exist)")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="tokenizer files to ship (default: the checkpoint's own HF tokenizer, if any)")
    exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="dtype of the exported weights (default: the model's params_dtype)")
    exp.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    from megatron_longsky.convert import megatron_lm_cli

    megatron_lm_cli.add_parsers(sub)  # from-megatron-lm / to-megatron-lm
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_longsky.convert.hf_config import ConversionError
    from megatron_longsky.checkpoint.layout import CheckpointError
    from megatron_longsky.data.workers import stop_on_signals
    from megatron_longsky.utils.logging import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        with stop_on_signals():  # SIGTERM / Ctrl-C: exit 130/143 with the temporary tree removed
            out = _convert(args)
    except (ConversionError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"longsky convert {args.direction}: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _convert(args: argparse.Namespace):
    if args.direction in ("from-megatron-lm", "to-megatron-lm"):
        from megatron_longsky.convert import megatron_lm_cli

        return megatron_lm_cli.run(args)
    if args.direction == "import":
        from megatron_longsky.convert.importer import import_checkpoint

        return import_checkpoint(args.hf_dir, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                 allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    from megatron_longsky.convert.exporter import export_checkpoint

    return export_checkpoint(args.checkpoint, args.output, tokenizer_dir=args.tokenizer_dir,
                             dtype=args.dtype, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
