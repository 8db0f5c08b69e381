"""Who writes a training checkpoint: bytes per rank, 4 gloo processes (DP=4, distributed
optimizer), before (plain ``dist_checkpointing.save``, optimizer 'fully_reshardable') and
after (fully parallel wrappers over DP x CP, 'dp_reshardable').

    PYTHONPATH=. python benchmarks/checkpoint_writes.py [--hidden 256]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from megatron_longsky.testing.multiprocess import run_distributed  # noqa: E402


def _bytes_per_rank(directory: Path) -> dict[int, int]:
    written = Counter()
    for f in directory.glob("__*_*.distcp"):
        written[int(re.match(r"__(\d+)_", f.name).group(1))] += f.stat().st_size
    return dict(sorted(written.items()))


def _run(tmp: str, prefix: str, hidden: int):
    import torch
    from megatron.core import dist_checkpointing

    from _training_fixtures import tiny_config_dict
    from megatron_longsky.checkpoint.model_io import model_sharded_state_dict
    from megatron_longsky.training import checkpointing
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import setup_training, teardown

    torch.distributed.init_process_group("gloo", init_method="env://")
    model = {"hidden_size": hidden, "ffn_hidden_size": 4 * hidden, "num_attention_heads": 4, "num_query_groups": 2}
    cfg = train_config_from_dict(tiny_config_dict(tmp, prefix, model={**tiny_config_dict(tmp, prefix)["model"], **model},
                                                  optimizer={"use_distributed_optimizer": True}))
    setup, state, _ = setup_training(cfg)
    checkpointing._ensure_adam_state(setup.optimizer)  # Adam's state as after a step (sizes are what count)
    before = Path(tmp) / "before"
    if torch.distributed.get_rank() == 0:
        (before / "model").mkdir(parents=True)
        (before / "optimizer").mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(setup.model), str(before / "model"))
    dist_checkpointing.save(checkpointing._optimizer_sharded_state_dict(setup.optimizer, setup.model, False,
                                                                        "fully_reshardable"),
                            str(before / "optimizer"))
    after = checkpointing.save_checkpoint(Path(tmp) / "after", state, setup.model, setup.optimizer, setup.scheduler,
                                          {"model": {}})
    teardown(setup)
    return {name: {part: _bytes_per_rank(root / part) for part in ("model", "optimizer")}
            for name, root in (("before", before), ("after", after))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    from _training_fixtures import write_token_dataset

    with tempfile.TemporaryDirectory() as tmp:
        prefix = write_token_dataset(Path(tmp) / "ds")
        result = run_distributed(_run, 4, tmp, prefix, args.hidden)[0]
    for name, parts in result.items():
        for part, per_rank in parts.items():
            total = sum(per_rank.values())
            shares = ", ".join(f"rank {r}: {b / total:.0%}" for r, b in per_rank.items())
            print(f"{name:6s} {part:9s} {total / 1024:9.1f} KiB written; {shares}")


if __name__ == "__main__":
    main()
