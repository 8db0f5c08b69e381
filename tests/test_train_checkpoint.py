"""Training checkpoints across layouts: resharding on resume (model + optimizer + schedule),
keep-last-N, the ``latest`` pointer only moving after a complete save, and stage
transitions (``init_from``: weights only, new sequence length, RoPE and layout)."""

from __future__ import annotations

import pytest
import yaml

from megatron_longsky.testing.multiprocess import run_distributed

from _training_fixtures import tiny_config_dict, write_token_dataset


def _init_process_group():
    import torch

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="env://")


def _full_weights(model_chunks) -> dict:
    from megatron_longsky.checkpoint.model_io import unwrap

    return {k: v.detach().clone() for k, v in unwrap(model_chunks[0]).state_dict().items()
            if not k.endswith("_extra_state")}


def _scenario(tmp, prefix):
    import dataclasses

    import torch

    from megatron_longsky.checkpoint.layout import list_iterations, read_latest
    from megatron_longsky.training import checkpointing
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import evaluate, setup_training, teardown, train

    _init_process_group()
    rank = torch.distributed.get_rank()
    out = {}

    def cfg(**kw):
        return train_config_from_dict(tiny_config_dict(tmp, prefix, **kw))

    # 1. Train 3 steps at TP=2, saving every step, keeping the last 2.
    first = train(cfg(train_iters=3, parallel={"tensor_model_parallel_size": 2}, output_dir=f"{tmp}/tp2",
                      checkpoint={"save": f"{tmp}/ckpt", "save_interval": 1, "keep_last": 2}))
    out["first_losses"] = first.losses
    out["kept"] = list_iterations(f"{tmp}/ckpt")
    out["latest"] = read_latest(f"{tmp}/ckpt").name
    # Re-running a finished job resumes at its end, trains nothing and rewrites nothing.
    mtime = (read_latest(f"{tmp}/ckpt") / "trainer" / "state.json").stat().st_mtime_ns
    again = train(cfg(train_iters=3, parallel={"tensor_model_parallel_size": 2}, output_dir=f"{tmp}/tp2",
                      checkpoint={"save": f"{tmp}/ckpt", "save_interval": 1, "keep_last": 2}))
    out["rerun"] = (again.iterations, again.checkpoint_dir.name, again.final_iteration,
                    (read_latest(f"{tmp}/ckpt") / "trainer" / "state.json").stat().st_mtime_ns == mtime)

    # The same 3 steps with the distributed optimizer (its state has another format).
    train(cfg(train_iters=3, parallel={"tensor_model_parallel_size": 2}, output_dir=f"{tmp}/tp2_distopt",
              optimizer={"use_distributed_optimizer": True},
              # resumed below at other TP/PP layouts: the form that reshards over them
              checkpoint={"save": f"{tmp}/ckpt_distopt", "save_interval": 0,
                          "optimizer_format": "fully_reshardable"}))

    # 2. Resume at TP=2 (reference), PP=2 and DP=2, with and without the distributed optimizer.
    dist = {"use_distributed_optimizer": True}
    for name, source, parallel, optimizer in [
            ("tp2", "ckpt", {"tensor_model_parallel_size": 2}, {}),
            ("pp2", "ckpt", {"pipeline_model_parallel_size": 2}, {}),
            ("dp2", "ckpt", {}, {}),
            ("dp2_distopt", "ckpt_distopt", {}, dist),
            ("pp2_distopt", "ckpt_distopt", {"pipeline_model_parallel_size": 2}, dist)]:
        result = train(cfg(train_iters=5, parallel=parallel, optimizer=optimizer, output_dir=f"{tmp}/resume_{name}",
                           checkpoint={"load": f"{tmp}/{source}", "save": f"{tmp}/resume_{name}/ckpt"}))
        out[f"resume_{name}"] = {"iterations": result.iterations, "losses": result.losses,
                                 "grad_norms": result.grad_norms}
    try:
        train(cfg(train_iters=5, optimizer=dist, output_dir=f"{tmp}/mismatch",
                  checkpoint={"load": f"{tmp}/ckpt", "save": f"{tmp}/mismatch/ckpt"}))
        out["mismatch_error"] = None
    except ValueError as exc:
        out["mismatch_error"] = str(exc)

    # 3. A crash in the middle of a save leaves 'latest' on the previous complete checkpoint.
    setup, state, _ = setup_training(cfg(train_iters=5, checkpoint={"load": f"{tmp}/ckpt", "save": f"{tmp}/ckpt"}))
    state.iteration = 4
    original_rng_state = checkpointing.rng_state

    def failing_rng_state():  # every rank fails in the middle of writing
        raise OSError("disk full (simulated)")

    checkpointing.rng_state = failing_rng_state
    try:
        checkpointing.save_checkpoint(f"{tmp}/ckpt", state, setup.model, setup.optimizer, setup.scheduler,
                                      setup.config_dict, keep_last=2)
        out["crash_raised"] = False
    except OSError:
        out["crash_raised"] = True
    finally:
        checkpointing.rng_state = original_rng_state
    torch.distributed.barrier()
    out["latest_after_crash"] = read_latest(f"{tmp}/ckpt").name
    out["partial_left"] = (checkpointing.Path(f"{tmp}/ckpt") / ".iter_0000004.partial").exists()
    out["iterations_after_crash"] = list_iterations(f"{tmp}/ckpt")
    reference_weights = _full_weights(setup.model)  # the iteration-3 weights, at DP=2 (full copies)

    # An asynchronous save (background writer process) appears only when the queue finalizes it.
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    queue = AsyncCallsQueue()
    # Two saves back to back: the second first waits for (and publishes) the first, since
    # megatron-core's writers share one results queue; each writes model and optimizer as
    # one background request, published only when the queue finalizes it.
    for iteration in (6, 7):
        state.iteration = iteration
        checkpointing.save_checkpoint(f"{tmp}/async", state, setup.model, setup.optimizer, setup.scheduler,
                                      setup.config_dict, async_queue=queue)
    out["async_latest_before"] = read_latest(f"{tmp}/async").name
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    out["async_latest_after"] = read_latest(f"{tmp}/async").name
    teardown(setup)
    # ... and holds the same weights: load it at another layout (PP=2) and compare.
    setup, state, _ = setup_training(cfg(train_iters=9, parallel={"pipeline_model_parallel_size": 2},
                                         checkpoint={"load": f"{tmp}/async", "save": f"{tmp}/async"}))
    out["async_resumed_iteration"] = state.iteration
    stage_weights = _full_weights(setup.model)
    # embedding (first stage) / output layer and final norm (last stage) keep their names under PP
    shared = [k for k in stage_weights if not k.startswith("decoder.layers.")]
    out["async_compared"] = shared
    out["async_weights_equal"] = all(torch.equal(stage_weights[k], reference_weights[k]) for k in shared)
    teardown(setup)

    # 4. Stage transition: weights only, longer sequences, a raised RoPE base, another layout.
    stage = cfg(train_iters=2, output_dir=f"{tmp}/stage2",
                model={"seq_length": 64, "rope": {"base": 500000.0}},
                checkpoint={"init_from": f"{tmp}/ckpt", "save": f"{tmp}/stage2/ckpt"})
    setup, state, resumed = setup_training(stage)
    loaded = _full_weights(setup.model)
    out["init_weights_equal"] = sorted(loaded) == sorted(reference_weights) and all(
        torch.equal(loaded[k], reference_weights[k]) for k in loaded)
    out["init_state"] = (state.iteration, state.consumed_samples, setup.scheduler.num_steps, resumed is None)
    out["init_optimizer_empty"] = not any(setup.optimizer.state_dict()["state"])
    teardown(setup)
    stage = dataclasses.replace(stage, eval_interval=2, eval_iters=1,
                                data=dataclasses.replace(stage.data, split="80,20,0"))
    result = train(stage)
    out["stage_valid"] = result.valid_losses
    out["stage_losses"] = result.losses
    out["stage_iteration"] = result.final_iteration
    saved = yaml.safe_load((result.checkpoint_dir / "config.yaml").read_text()) if rank == 0 else None
    out["stage_saved_model"] = saved and (saved["model"]["seq_length"], saved["model"]["rope"]["base"])

    # 5. Held-out loss of a checkpoint: forward only, the same at any layout.
    out["eval"] = {name: evaluate(cfg(parallel=parallel), f"{tmp}/ckpt", [prefix], num_batches=2)
                   for name, parallel in [("dp2", {}), ("pp2", {"pipeline_model_parallel_size": 2})]}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    prefix = write_token_dataset(tmp / "ds")
    return run_distributed(_scenario, 2, str(tmp), prefix)


def test_keep_last_n_and_latest(results):
    r = results[0]
    assert r["kept"] == [2, 3] and r["latest"] == "iter_0000003"


def test_rerunning_a_finished_job_is_a_no_op(results):
    assert results[0]["rerun"] == ([], "iter_0000003", 3, True)


@pytest.mark.parametrize("layout", ["pp2", "dp2", "dp2_distopt", "pp2_distopt"])
def test_resume_at_another_layout_continues_identically(results, layout):
    for r in results:
        ref, other = r["resume_tp2"], r[f"resume_{layout}"]
        assert ref["iterations"] == other["iterations"] == [4, 5]
        assert other["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert other["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
        # and it did continue training rather than restart: loss below the first steps'
        assert max(other["losses"]) < r["first_losses"][0]


def test_switching_optimizer_kind_on_resume_is_a_clear_error(results):
    assert "use_distributed_optimizer" in results[0]["mismatch_error"]


def test_crash_during_save_keeps_latest_on_previous_checkpoint(results):
    for r in results:
        assert r["crash_raised"]
        assert r["latest_after_crash"] == "iter_0000003"
        assert 4 not in r["iterations_after_crash"]
    assert results[0]["partial_left"]  # the incomplete save is visibly incomplete, never 'latest'


def test_stage_transition_loads_weights_only(results):
    for r in results:
        assert r["init_weights_equal"]
        assert r["init_state"] == (0, 0, 0, True)  # fresh data position and schedule, not a resume
        assert r["init_optimizer_empty"]
        assert r["stage_iteration"] == 2 and all(x == x for x in r["stage_losses"])
    assert results[0]["stage_saved_model"] == (64, 500000.0)


def test_valid_loss_during_training_and_evaluate_at_two_layouts(results):
    for r in results:
        assert list(r["stage_valid"]) == [2] and r["stage_valid"][2] == r["stage_valid"][2]
        assert r["eval"]["dp2"] == pytest.approx(r["eval"]["pp2"], rel=1e-5)
        # the trained checkpoint predicts this data better than chance (ln 384 ~ 5.95)
        assert r["eval"]["dp2"] < 5.9


def test_async_save_publishes_on_finalize_and_loads(results):
    for rank, r in enumerate(results):
        assert r["async_latest_before"] == "iter_0000006" and r["async_latest_after"] == "iter_0000007"
        assert r["async_resumed_iteration"] == 7
        assert r["async_compared"] and r["async_weights_equal"]
    assert "embedding.word_embeddings.weight" in results[0]["async_compared"]
    assert "output_layer.weight" in results[1]["async_compared"]
