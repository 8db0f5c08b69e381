"""Sequence parallelism runs on CPU (gloo) and changes nothing: TP=2 with
``parallel.sequence_parallel`` gives the losses and gradient norms of TP=2 without it, step
for step, and again after a resume from a checkpoint saved mid-run.

Before the local spec had its own norm (model/norm.py), megatron-core's WrappedTorchNorm
asserted ``sequence parallel not supported by torch LayerNorm`` at model construction; and
without the norm weights marked ``sequence_parallel`` their gradients (each TP rank sees
half of the sequence) would not be summed over TP and the gradient norm would differ.
"""

from __future__ import annotations

import pytest

from megatron_longsky.testing.multiprocess import run_distributed

from _training_fixtures import tiny_config_dict, write_token_dataset

pytestmark = pytest.mark.slow  # two 2-process trainings and a resume (~1 minute here)

ITERS = 4
REL = 1e-3


def _train_both(tmp: str, prefix: str):
    import torch

    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="env://")

    def cfg(name, sp, iters, **checkpoint):
        return train_config_from_dict(tiny_config_dict(
            tmp, prefix, train_iters=iters, micro_batch_size=2,
            parallel={"tensor_model_parallel_size": 2, "sequence_parallel": sp},
            schedule={"decay_iters": ITERS}, output_dir=f"{tmp}/{name}",
            checkpoint={"save": f"{tmp}/{name}/ckpt", **checkpoint}))

    plain = train(cfg("plain", False, ITERS, save_at_end=False))
    first = train(cfg("sp", True, ITERS // 2))  # saves at the end: iteration 2
    resumed = train(cfg("sp", True, ITERS))  # resumes from it
    return {"plain": (plain.losses, plain.grad_norms), "sp_first": (first.losses, first.grad_norms),
            "sp_resumed": (resumed.losses, resumed.grad_norms)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    prefix = write_token_dataset(tmp / "ds")
    return run_distributed(_train_both, 2, str(tmp), prefix)


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= REL * abs(y), (a, b)


def test_sequence_parallel_equals_plain_tensor_parallel_per_step_and_after_resume(runs):
    for rank in runs:  # both TP ranks report the same numbers
        plain_losses, plain_norms = rank["plain"]
        assert len(plain_losses) == ITERS
        sp_losses = rank["sp_first"][0] + rank["sp_resumed"][0]
        sp_norms = rank["sp_first"][1] + rank["sp_resumed"][1]
        assert len(rank["sp_resumed"][0]) == ITERS // 2  # the second run resumed, it did not restart
        _close(sp_losses, plain_losses)
        _close(sp_norms, plain_norms)
    assert runs[0]["plain"][0][0] != runs[0]["plain"][0][-1]  # it trained
