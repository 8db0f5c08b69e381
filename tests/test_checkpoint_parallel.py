"""Training checkpoints at scale: megatron-core's fully parallel save/load wrappers spread
the writes over the data-parallel (x CP) ranks, the distributed optimizer is saved in the
'dp_reshardable' form (no gathering) and resumes at another DP size, and a TP change needs
(and gets, when asked for) the 'fully_reshardable' form. 4 gloo processes, then 2."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from megatron_longsky.testing.multiprocess import run_distributed

from _training_fixtures import tiny_config_dict, write_token_dataset

_DISTOPT = {"use_distributed_optimizer": True}


def _cfg(tmp, prefix, **kw):
    from megatron_longsky.training.config import train_config_from_dict

    return train_config_from_dict(tiny_config_dict(tmp, prefix, optimizer=_DISTOPT, **kw))


def _bytes_written_per_rank(directory: Path) -> dict[int, int]:
    """torch_dist writes ``__<global rank>_<n>.distcp`` files: bytes each rank wrote."""
    written = Counter()
    for f in directory.glob("__*_*.distcp"):
        written[int(re.match(r"__(\d+)_", f.name).group(1))] += f.stat().st_size
    return dict(written)


def _main_replica_bytes(sharded_state_dict) -> int:
    """Bytes this rank would write: the tensors it holds the main replica of."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return sum(v.data.numel() * v.data.element_size() for v in nested_values(sharded_state_dict)
               if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id))


def _root_at(tmp: str, source_root: str, iteration: int, name: str) -> str:
    """A checkpoint root whose ``latest`` is ``source_root``'s iteration (rank 0 copies)."""
    import torch

    from megatron_longsky.checkpoint.layout import iteration_dir, write_latest

    root = Path(tmp) / name
    if torch.distributed.get_rank() == 0:
        shutil.copytree(iteration_dir(source_root, iteration), iteration_dir(root, iteration))
        write_latest(root, iteration)
    torch.distributed.barrier()
    return str(root)


def _four_ranks(tmp, prefix):
    import torch

    from megatron_longsky.checkpoint.model_io import model_sharded_state_dict
    from megatron_longsky.training.checkpointing import CheckpointLayoutError, fully_parallel_save_strategy
    from megatron_longsky.training.loop import setup_training, teardown, train

    torch.distributed.init_process_group("gloo", init_method="env://")
    out = {}
    # DP=4, distributed optimizer, 'auto' (dp_reshardable): checkpoints at 2 and 4.
    ref = train(_cfg(tmp, prefix, train_iters=4, output_dir=f"{tmp}/dp4",
                     checkpoint={"save": f"{tmp}/ckpt_dp4", "save_interval": 2, "keep_last": 0}))
    out["reference"] = dict(zip(ref.iterations, ref.losses))
    # The save plan of the weights, without and with the fully parallel wrapper.
    setup, _, _ = setup_training(_cfg(tmp, prefix, output_dir=f"{tmp}/plan", checkpoint={"load": f"{tmp}/ckpt_dp4"}))
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    sd, _ = save_preprocess(model_sharded_state_dict(setup.model), validate_access_integrity=False)
    out["plan_plain"] = _main_replica_bytes(sd)
    fully_parallel_save_strategy().apply_saving_parallelization(sd)
    out["plan_parallel"] = _main_replica_bytes(sd)
    teardown(setup)
    # TP=2 (DP=2) cannot take the dp_reshardable form: a clear error before anything loads.
    try:
        train(_cfg(tmp, prefix, train_iters=4, parallel={"tensor_model_parallel_size": 2},
                   output_dir=f"{tmp}/tp2_refused",
                   checkpoint={"load": _root_at(tmp, f"{tmp}/ckpt_dp4", 2, "ckpt_dp4_at2"),
                               "save": f"{tmp}/tp2_refused/ckpt"}))
        out["tp_change_error"] = None
    except CheckpointLayoutError as exc:
        out["tp_change_error"] = str(exc)
    # Asked for, the fully reshardable form resumes at TP=2 (the same 4-iteration schedule:
    # a resume takes its LR schedule from the checkpoint).
    train(_cfg(tmp, prefix, train_iters=4, output_dir=f"{tmp}/full",
               checkpoint={"save": f"{tmp}/ckpt_full", "save_interval": 2, "keep_last": 0,
                           "optimizer_format": "fully_reshardable"}))
    tp2 = train(_cfg(tmp, prefix, train_iters=4, parallel={"tensor_model_parallel_size": 2},
                     output_dir=f"{tmp}/tp2", checkpoint={"load": _root_at(tmp, f"{tmp}/ckpt_full", 2, "ckpt_full_at2"),
                                                          "save": f"{tmp}/tp2/ckpt"}))
    out["resumed_tp2"] = dict(zip(tp2.iterations, tp2.losses))
    return out


def _two_ranks(tmp, prefix):
    import torch

    from megatron_longsky.training.loop import train

    torch.distributed.init_process_group("gloo", init_method="env://")
    result = train(_cfg(tmp, prefix, train_iters=4, output_dir=f"{tmp}/dp2",
                        checkpoint={"load": f"{tmp}/ckpt_dp4_at2", "save": f"{tmp}/dp2/ckpt"}))
    return dict(zip(result.iterations, result.losses))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_parallel")
    prefix = write_token_dataset(tmp / "ds")
    four = run_distributed(_four_ranks, 4, str(tmp), prefix)
    two = run_distributed(_two_ranks, 2, str(tmp), prefix)
    return tmp, four, two


@pytest.mark.slow
def test_writes_are_spread_over_the_data_parallel_ranks(runs):
    tmp, four, _ = runs
    # Save plan: without the wrapper DP rank 0 holds every main replica of the weights.
    plain = [r["plan_plain"] for r in four]
    parallel = [r["plan_parallel"] for r in four]
    assert plain[0] > 0 and plain[1:] == [0, 0, 0]
    assert sum(parallel) == plain[0] and all(b > 0 for b in parallel)
    assert max(parallel) < plain[0] / 2
    # Files: every rank wrote part of the weights and its own optimizer shard.
    ckpt = tmp / "ckpt_dp4" / "iter_0000002"
    for part in ("model", "optimizer"):
        written = _bytes_written_per_rank(ckpt / part)
        assert sorted(written) == [0, 1, 2, 3], (part, written)
        assert max(written.values()) < sum(written.values()) / 2, (part, written)


@pytest.mark.slow
def test_layout_is_recorded_and_dp_reshardable_by_default(runs):
    from megatron.core import dist_checkpointing

    tmp, _, _ = runs
    import json

    meta = dist_checkpointing.load_content_metadata(str(tmp / "ckpt_dp4" / "iter_0000002" / "optimizer"))
    assert meta["distrib_optim_sharding_type"] == "dp_reshardable"
    assert (meta["tensor_model_parallel_size"], meta["data_parallel_size"]) == (1, 4)
    state = json.loads((tmp / "ckpt_dp4" / "iter_0000002" / "trainer" / "state.json").read_text())
    assert state["layout"] == meta
    full = dist_checkpointing.load_content_metadata(str(tmp / "ckpt_full" / "iter_0000002" / "optimizer"))
    assert full["distrib_optim_sharding_type"] == "fully_reshardable"


@pytest.mark.slow
def test_resume_at_another_data_parallel_size_continues_identically(runs):
    _, four, two = runs
    ref = four[0]["reference"]
    for losses in two:
        assert list(losses) == [3, 4]
        assert [losses[i] for i in (3, 4)] == pytest.approx([ref[i] for i in (3, 4)], rel=1e-5)


@pytest.mark.slow
def test_tensor_parallel_change_needs_the_fully_reshardable_form(runs):
    _, four, _ = runs
    for r in four:
        assert "dp_reshardable" in r["tp_change_error"] and "tensor_model_parallel_size 1 -> 2" in r["tp_change_error"]
        assert "optimizer_format=fully_reshardable" in r["tp_change_error"]
        ref = r["reference"]
        assert [r["resumed_tp2"][i] for i in (3, 4)] == pytest.approx([ref[i] for i in (3, 4)], rel=1e-5)


def test_load_format_check_without_processes():
    from megatron_longsky.training.checkpointing import CheckpointLayoutError, load_optimizer_format

    saved = {"distrib_optim_sharding_type": "dp_reshardable", "tensor_model_parallel_size": 2,
             "pipeline_model_parallel_size": 1, "context_parallel_size": 4, "data_parallel_size": 4,
             "bucket_size": None}
    # DP and CP may change; TP, PP and the gradient buckets may not.
    assert load_optimizer_format(saved, {**saved, "data_parallel_size": 16, "context_parallel_size": 2}, "c") \
        == "dp_reshardable"
    for key, value in [("tensor_model_parallel_size", 4), ("pipeline_model_parallel_size", 2),
                       ("bucket_size", 40_000_000)]:
        with pytest.raises(CheckpointLayoutError, match=key):
            load_optimizer_format(saved, {**saved, key: value}, "c")
    full = {**saved, "distrib_optim_sharding_type": "fully_reshardable"}
    assert load_optimizer_format(full, {**full, "tensor_model_parallel_size": 8}, "c") == "fully_reshardable"
    assert load_optimizer_format(None, saved, "c") == "fully_reshardable"  # written before the record
