"""Non-finite losses: the step is skipped (parameters unchanged), counted, training goes
on; after ``max_consecutive_nan_steps`` in a row it stops with a clear message. The
non-finite values are injected by the test (wrapping the loss), not by a production flag."""

from __future__ import annotations

import pytest

from megatron_longsky.testing.multiprocess import run_distributed

from _training_fixtures import tiny_config_dict, write_token_dataset

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow


def _scenario(tmp, prefix):
    import torch

    from megatron_longsky.checkpoint.model_io import unwrap
    from megatron_longsky.training import loop, step
    from megatron_longsky.training.config import train_config_from_dict

    torch.distributed.init_process_group("gloo", init_method="env://")
    out = {}
    calls = {"n": 0}
    poisoned: set[int] = set()
    snapshots = {}
    original_loss = step.masked_token_loss
    original_step = step.reduce_loss

    def poisoned_loss(loss_mask, output_tensor):
        calls["n"] += 1
        if calls["n"] in poisoned:
            output_tensor = output_tensor * float("nan")
        return original_loss(loss_mask, output_tensor)

    def snapshot_reduce(reports):
        # Called once per step, after backward and before the optimizer: remember the weights.
        setup_model = _CURRENT["model"]
        snapshots[calls["n"]] = [p.detach().clone() for p in unwrap(setup_model[0]).parameters()]
        return original_step(reports)

    _CURRENT = {}
    original_setup = loop.setup_training

    def setup_and_remember(cfg):
        setup, state, resumed = original_setup(cfg)
        _CURRENT["model"] = setup.model
        return setup, state, resumed

    step.masked_token_loss = poisoned_loss
    step.reduce_loss = snapshot_reduce
    loop.setup_training = setup_and_remember
    try:
        # One micro-batch per step (mbs == global batch): call n is step n.
        poisoned.update({2, 4})
        base = dict(micro_batch_size=4, global_batch_size=4, max_consecutive_nan_steps=2)
        result = loop.train(train_config_from_dict(tiny_config_dict(
            tmp, prefix, train_iters=5, output_dir=f"{tmp}/skip", checkpoint={"save_at_end": False}, **base)))
        out["losses"] = result.losses
        out["skipped"] = result.skipped_steps
        out["grad_norms"] = result.grad_norms
        # Weights before step 3 equal those before step 2: the poisoned step 2 changed nothing.
        out["unchanged_over_skip"] = all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
        out["changed_over_good_step"] = any(not torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))

        calls["n"] = 0
        poisoned.clear()
        poisoned.update({2, 3, 4, 5})
        try:
            loop.train(train_config_from_dict(tiny_config_dict(
                tmp, prefix, train_iters=5, output_dir=f"{tmp}/stop", checkpoint={"save_at_end": False}, **base)))
            out["stop_error"] = None
        except loop.NonFiniteLossError as exc:
            out["stop_error"] = str(exc)
    finally:
        step.masked_token_loss = original_loss
        step.reduce_loss = original_step
        loop.setup_training = original_setup
    from megatron_longsky.training.metrics import read_metrics

    out["records"] = [(r["iteration"], r["skipped"]) for r in read_metrics(f"{tmp}/skip/metrics.jsonl")]
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan")
    prefix = write_token_dataset(tmp / "ds")
    return run_distributed(_scenario, 1, str(tmp), prefix)[0]


def test_non_finite_step_is_skipped_counted_and_training_continues(result):
    losses = result["losses"]
    assert len(losses) == 5 and result["skipped"] == 2
    assert losses[1] != losses[1] and losses[3] != losses[3]  # NaN at steps 2 and 4
    assert all(x == x for i, x in enumerate(losses) if i not in (1, 3))
    assert result["grad_norms"][1] is None and result["grad_norms"][2] is not None
    assert result["unchanged_over_skip"] and result["changed_over_good_step"]
    assert result["records"] == [(1, False), (2, True), (3, False), (4, True), (5, False)]


def test_stops_after_max_consecutive_non_finite_losses(result):
    message = result["stop_error"]
    assert message is not None
    assert "2 consecutive non-finite losses" in message and "iterations 2-3" in message
    assert "max_consecutive_nan_steps=2" in message
