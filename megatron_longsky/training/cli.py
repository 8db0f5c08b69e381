"""``longsky train --config job.yaml key=value ...``: launched by torchrun, srun or directly.

Exit status: 0 when training finished or was preempted (SIGTERM/SIGUSR1: a checkpoint
was saved after the current step; rerun the same command to resume), 2 on a config,
path or data error (one line from rank 0, found before the model is built; ``--debug``
adds the traceback), 3 when training stopped after too many consecutive non-finite
losses, 1 for anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longsky train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="job YAML (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config fields, e.g. train_iters=50 model.rope.base=500000")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_longsky.training.config import load_train_config, train_config_to_dict
    from megatron_longsky.utils.logging import setup_logging

    cfg = load_train_config(args.config, args.overrides)  # a ConfigError is one line and exit 2 (cli.py)
    setup_logging(cfg.logging.level)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False))
        return 0
    from megatron_longsky.training.loop import NonFiniteLossError, train

    try:
        result = train(cfg)
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return 3
    log.info("%s at iteration %d: %.1f tokens/s, %.3f steps/s, checkpoint %s, metrics %s",
             result.exit_reason, result.final_iteration, result.tokens_per_s, result.steps_per_s,
             result.checkpoint_dir, result.metrics_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
