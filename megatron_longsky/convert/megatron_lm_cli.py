"""``longsky convert from-megatron-lm`` / ``to-megatron-lm`` (see :mod:`megatron_longsky.convert.megatron_lm`)."""

from __future__ import annotations

from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM checkpointing.py get_checkpoint_tracker_filename
FLAGS_FILE = "megatron_lm_flags.txt"

DIRECTIONS = ("from-megatron-lm", "to-megatron-lm")


def add_parsers(sub) -> None:
    """Register the two subcommands on ``longsky convert``'s subparsers."""
    imp = sub.add_parser("from-megatron-lm", help="Megatron-LM torch_dist checkpoint -> our checkpoint (weights)")
    imp.add_argument("--checkpoint", required=True,
                     help=f"Megatron-LM save directory (with {TRACKER}) or one iter_N directory")
    imp.add_argument("--output", required=True, help="checkpoint root to create (must not exist)")
    imp.add_argument("--tokenizer-model", default=None,
                     help="tokenizer to record instead of the args' tokenizer_model (e.g. a local copy)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="load a common.pt holding types outside megatron-core's safe list (trusted sources only)")
    imp.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    exp = sub.add_parser("to-megatron-lm", help="our checkpoint (any layout) -> Megatron-LM torch_dist (weights)")
    exp.add_argument("--checkpoint", required=True, help="checkpoint root (with 'latest') or iteration directory")
    exp.add_argument("--output", required=True, help="Megatron-LM --load directory to create (must not exist)")
    exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="storage dtype of the weights (default: as stored in the checkpoint)")
    exp.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args) -> Path:
    """Run the subcommand parsed by :func:`add_parsers`."""
    from megatron_longsky.convert.megatron_lm import export_megatron_lm, import_megatron_lm, pair_flags

    if args.direction == "from-megatron-lm":
        return import_megatron_lm(args.checkpoint, args.output, tokenizer_model=args.tokenizer_model,
                                  allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    out, flags = export_megatron_lm(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Megatron-LM flags (also in {out / FLAGS_FILE}; use them as $(cat {out / FLAGS_FILE})):")
    for line in pair_flags(flags):
        print(f"  {line}")
    return out
