"""The heart of the harness: one global batch gives the same loss and gradient norm at
any TP/PP/DP split, with or without the distributed optimizer, and with any number of
micro-batches, as in one process. Every layout starts from one checkpoint written by a
single process (which also exercises loading at another layout)."""

from __future__ import annotations

import pytest

from megatron_longsky.testing.multiprocess import run_distributed

from _training_fixtures import tiny_config_dict, write_sft_dataset, write_token_dataset

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

ITERS = 2
SFT_SEQ = 256


def _init_process_group():
    import torch

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="env://")


def _mask_some_rows(batch, device):
    """Model inputs with the loss mask zeroed on rows whose first token is even (a rule on the
    data only), so that with one row per micro-batch some ranks and micro-batches hold no
    loss tokens at all."""
    from megatron_longsky.training.batch import prepare_batch

    inputs = prepare_batch(batch, device)
    keep = (inputs.tokens[:, 0] % 2 == 1).float()
    inputs.loss_mask = inputs.loss_mask * keep.unsqueeze(1)
    if inputs.loss_mask.sum() == 0:
        _ZERO_TOKEN_MICROBATCHES.append(1)
    return inputs


_ZERO_TOKEN_MICROBATCHES: list = []


def _run(cfg_dict, masked: bool = False):
    from megatron_longsky.training import step
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    original = step.prepare_batch
    if masked:
        step.prepare_batch = _mask_some_rows
    try:
        result = train(train_config_from_dict(cfg_dict))
    finally:
        step.prepare_batch = original
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def _reference(tmp, prefix, sft_prefix, sft_rows):
    """One process: save the initial weights, then train with 1 and with 4 micro-batches."""
    from megatron_longsky.training.checkpointing import save_checkpoint
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import setup_training, teardown

    _init_process_group()
    base = tiny_config_dict(tmp, prefix, train_iters=ITERS, checkpoint={"save": f"{tmp}/init"})
    setup, state, _ = setup_training(train_config_from_dict(base))
    save_checkpoint(f"{tmp}/init", state, setup.model, setup.optimizer, setup.scheduler, setup.config_dict)
    teardown(setup)
    out = {}
    for name, mbs, masked in [("mbs4", 4, False), ("mbs1", 1, False), ("masked", 4, True)]:
        cfg = tiny_config_dict(tmp, prefix, train_iters=ITERS, micro_batch_size=mbs,
                               checkpoint={"init_from": f"{tmp}/init", "save": f"{tmp}/ref_{name}",
                                           "save_at_end": False},
                               output_dir=f"{tmp}/ref_{name}")
        out[name] = _run(cfg, masked)
    # SFT: every sample in one global batch, one per row vs packed several per row. With
    # attention confined to each sample the two give the same loss and gradient.
    for name, packed, rows in [("sft_unpacked", False, sft_rows[0]), ("sft_packed", True, sft_rows[1])]:
        cfg = tiny_config_dict(tmp, sft_prefix, train_iters=1, micro_batch_size=1, global_batch_size=rows,
                               model={"seq_length": SFT_SEQ},
                               data={"kind": "sft", "prefixes": [sft_prefix], "packed": packed},
                               checkpoint={"init_from": f"{tmp}/init", "save": f"{tmp}/{name}", "save_at_end": False},
                               output_dir=f"{tmp}/{name}")
        out[name] = _run(cfg)
    return out


LAYOUTS = {
    # name: (parallel, micro_batch_size, optimizer overrides, masked rows)
    "tp2": ({"tensor_model_parallel_size": 2}, 2, {}, False),
    "pp2_1f1b": ({"pipeline_model_parallel_size": 2}, 1, {}, False),
    "dp2": ({}, 1, {}, False),
    "dp2_distopt": ({}, 2, {"use_distributed_optimizer": True}, False),
    "tp2_distopt_4micro": ({"tensor_model_parallel_size": 2}, 1, {"use_distributed_optimizer": True}, False),
    "cp2": ({"context_parallel_size": 2}, 2, {}, False),
    "dp2_masked_rows": ({}, 1, {}, True),
}


def _layouts(tmp, prefix):
    _init_process_group()
    out = {}
    for name, (parallel, mbs, optimizer, masked) in LAYOUTS.items():
        cfg = tiny_config_dict(tmp, prefix, train_iters=ITERS, micro_batch_size=mbs, parallel=parallel,
                               optimizer=optimizer,
                               checkpoint={"init_from": f"{tmp}/init", "save": f"{tmp}/{name}", "save_at_end": False},
                               output_dir=f"{tmp}/{name}")
        out[name] = _run(cfg, masked)
    out["zero_token_microbatches"] = len(_ZERO_TOKEN_MICROBATCHES)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equiv")
    prefix = write_token_dataset(tmp / "ds")
    sft_prefix = write_sft_dataset(tmp)
    from megatron_longsky.sft.dataset import PackedSFTDataset

    from megatron_longsky.training.config import DataConfig

    pad = DataConfig().pad_to_multiple  # as the trainer pads each sample
    rows = (len(PackedSFTDataset(sft_prefix, SFT_SEQ, unpacked=True, pad_to_multiple=pad)),
            len(PackedSFTDataset(sft_prefix, SFT_SEQ, pad_to_multiple=pad)))
    assert rows[1] < rows[0]  # several samples share a packed row
    reference = run_distributed(_reference, 1, str(tmp), prefix, sft_prefix, rows)[0]
    layouts = run_distributed(_layouts, 2, str(tmp), prefix)
    return reference, layouts


def _close(a, b, rel):
    assert len(a) == len(b) == ITERS
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rel), (a, b)


def test_micro_batch_count_does_not_change_loss_or_grad_norm(runs):
    reference, _ = runs
    _close(reference["mbs1"]["losses"], reference["mbs4"]["losses"], 1e-5)
    _close(reference["mbs1"]["grad_norms"], reference["mbs4"]["grad_norms"], 1e-5)


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if not v[3]])
def test_layout_matches_single_process(runs, layout):
    reference, layouts = runs
    for rank_result in layouts:  # every rank reports the same global values
        _close(rank_result[layout]["losses"], reference["mbs4"]["losses"], 1e-5)
        _close(rank_result[layout]["grad_norms"], reference["mbs4"]["grad_norms"], 1e-4)


def test_training_changes_the_loss(runs):
    reference, _ = runs
    losses = reference["mbs4"]["losses"]
    assert losses[0] != losses[1] and all(x == x for x in losses)


def test_ranks_without_loss_tokens_give_no_nan_and_the_same_loss(runs):
    reference, layouts = runs
    assert sum(r["zero_token_microbatches"] for r in layouts) > 0, "the rule never produced an empty micro-batch"
    masked = reference["masked"]
    assert masked["losses"] != reference["mbs4"]["losses"]  # the masking did change the loss
    for rank_result in layouts:
        _close(rank_result["dp2_masked_rows"]["losses"], masked["losses"], 1e-5)
        _close(rank_result["dp2_masked_rows"]["grad_norms"], masked["grad_norms"], 1e-4)


def test_packed_sft_rows_equal_one_sample_per_row(runs):
    reference, _ = runs
    unpacked, packed = reference["sft_unpacked"], reference["sft_packed"]
    assert len(packed["losses"]) == 1 and packed["losses"][0] == packed["losses"][0]
    assert packed["losses"][0] == pytest.approx(unpacked["losses"][0], rel=1e-5)
    assert packed["grad_norms"][0] == pytest.approx(unpacked["grad_norms"][0], rel=1e-4)
