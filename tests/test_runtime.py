"""Runtime: launcher detection, and megatron-core running on CPU through gloo."""

import pytest
import torch

from megatron_longsky.runtime import cpu_compat
from megatron_longsky.runtime.distributed import ParallelConfig, detect_launch_env, first_host
from megatron_longsky.testing.multiprocess import run_distributed


@pytest.mark.parametrize(
    "nodelist,expected",
    [
        ("node1", "node1"),
        ("gpu[003-010,012]", "gpu003"),
        ("gpu[07,09]-ib,cpu1", "gpu07-ib"),
        ("a1,a2", "a1"),
        ("rack1-[0001-0004]", "rack1-0001"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, expected):
    assert first_host(nodelist) == expected


def test_launch_env_from_torchrun():
    env = detect_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "h0", 1234)
    assert env.launcher == "torchrun"


def test_launch_env_from_slurm():
    env = detect_launch_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
         "SLURM_JOB_NODELIST": "h100-[017-018]", "SLURM_JOB_ID": "4242"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 5, "h100-017")
    assert env.master_port == 20000 + 4242 and env.launcher == "slurm"


def test_launch_env_single_process():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_parallel_config_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        ParallelConfig(tensor_model_parallel_size=0)


def test_cpu_layer_maps_cuda_factories_and_restores():
    from megatron_longsky.runtime.device import use_cuda

    assert not use_cuda()  # the suite runs the CPU path (tests/conftest.py), also where CUDA exists
    assert cpu_compat.enable()
    try:
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.arange(3).cuda().device.type == "cpu"
        assert torch.arange(3).to("cuda").device.type == "cpu"
        assert torch.empty(2, pin_memory=True).device.type == "cpu"
        torch.cuda.manual_seed(7)
        a = torch.rand(3)
        torch.cuda.manual_seed(7)
        assert torch.equal(a, torch.rand(3))
    finally:
        cpu_compat.disable()
    assert not cpu_compat.is_active()
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError, TypeError)):
            torch.zeros(1, device="cuda")


def _tiny_gpt_step(tp, pp):
    """Build a tiny GPTModel at (tp, pp), run 1F1B forward/backward and an optimizer step."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longsky.runtime.distributed import initialize

    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=3)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128, max_sequence_length=16, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0), [model]
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4, 16), generator=gen)

    def forward_step(data, model):
        batch = next(data)
        out = model(batch, None, None, labels=torch.roll(batch, -1, 1))
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad_buffer()
    opt.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens[:2], tokens[2:]]), model=model,
        num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False,
    )
    ok, grad_norm, _ = opt.step()
    changed = any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    return {
        "device": str(rt.device), "backend": rt.backend, "ok": ok, "grad_norm": grad_norm,
        "losses": [float(l["loss"]) for l in losses], "changed": changed,
    }


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_gpt_forward_backward_and_step_on_cpu(tp, pp):
    results = run_distributed(_tiny_gpt_step, 2, tp, pp)
    for r in results:
        assert r["device"] == "cpu" and r["backend"] == "gloo" and r["ok"]
        assert r["changed"], "optimizer step did not change the parameters"
        assert r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["grad_norm"]))
    last = results[-1]
    assert len(last["losses"]) == 2 and all(torch.isfinite(torch.tensor(last["losses"])))
    # Both ranks see the same global grad norm.
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-6)


@pytest.mark.slow
def test_single_process_binds_no_port(tmp_path):
    """Two single-process commands on one host (evaluation next to training) must not both
    need MASTER_PORT: with the port taken, a single process still initialises."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = ("from megatron_longsky.runtime.distributed import ParallelConfig, initialize, shutdown\n"
                "rt = initialize(ParallelConfig()); assert rt.launch.world_size == 1; shutdown(); print('ok')")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
        result = subprocess.run([sys.executable, "-c", code], env={**env, "MASTER_PORT": str(port)},
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
