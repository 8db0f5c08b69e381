"""The GPU path, checked on CPU (issue 12 items 1-3, 5, 6, FP8 attention; issue 15 item 8).

- evaluation models are built on the device they run on and without FP8 unless asked;
- checkpoints from the local layer spec load into the Transformer Engine spec and back:
  the TE spec's ``_extra_state`` entries are emulated by giving exactly the modules TE
  replaces (linear_qkv, linear_proj, linear_fc1, linear_fc2, the final norm) TE-like extra
  state. megatron-core's local linears already carry an (empty) ``_extra_state`` "for
  compatibility with TE"; the local norms do not, so the final norm's entry is the one
  a local-spec checkpoint lacks;
- cp_comm_type, hierarchical CP groups, the FP8 shard rule and FP8 attention are checked
  when the config is loaded, with the reason;
- one source for the device and for dtypes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_longsky.config import ConfigError
from megatron_longsky.model import model_config_from_dict
from megatron_longsky.runtime import device as device_lib
from megatron_longsky.runtime.distributed import ParallelConfig
from megatron_longsky.testing.multiprocess import run_distributed

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_longsky"
TINY = {"preset": "tiny", "init_method_std": 0.2}
VOCAB = 256
# Sharded-state-dict keys with TE extra state in the TE GPT layer spec (megatron-core 0.16.1
# extensions/transformer_engine.py: TELayerNormColumnParallelLinear, TERowParallelLinear and
# TENorm carry `_extra_state`; TEDotProductAttention only with a learnable softmax offset; the
# layer norms are fused into linear_qkv / linear_fc1).
TE_EXTRA_STATE_KEYS = {
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2._extra_state",
    "decoder.final_layernorm._extra_state",
}
# ... of which the local spec lacks (its linears return None as extra state; its norms have none):
NOT_IN_LOCAL_SPEC = {"decoder.final_layernorm._extra_state"}
TE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# ----------------------------------------------------------------------------- helpers

def _with_te_extra_state(model):
    """Give the modules the TE spec implements with TE an ``_extra_state`` (as TE modules have:
    FP8 scaling metadata serialised into a uint8 tensor). Returns what set_extra_state received."""
    received = {}

    def extra(module, name):
        base = type(module)

        class WithExtraState(base):
            def get_extra_state(self):
                return torch.tensor([7, len(name)], dtype=torch.uint8)

            def set_extra_state(self, state):
                received[name] = state

        module.__class__ = WithExtraState

    for name, module in model.named_modules():
        if name.endswith(TE_MODULES) or name == "decoder.final_layernorm":
            extra(module, name)
    return received


def _tiny(tie=False, te_extra_state=False, seed=3):
    from megatron_longsky.model import build_model

    model = build_model(model_config_from_dict({**TINY, "tie_embeddings": tie}), ParallelConfig(), VOCAB, seed=seed)
    received = _with_te_extra_state(model) if te_extra_state else None
    return model, received


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _write_checkpoint(root: Path, model_dict: dict, model=None) -> Path:
    from megatron_longsky.checkpoint import save_model_weights, write_checkpoint_config, write_latest
    from megatron_longsky.checkpoint.layout import iteration_dir
    from megatron_longsky.config import to_dict
    from megatron_longsky.model import build_model
    from megatron_longsky.tokenizer import ByteTokenizer

    if model is None:
        model = build_model(model_config_from_dict(model_dict), ParallelConfig(), VOCAB, seed=5)
    target = iteration_dir(root, 1)
    save_model_weights([model], target)
    write_checkpoint_config(target, {"model": {**model_dict, "vocab_size": VOCAB},
                                     "tokenizer": ByteTokenizer().metadata(), "parallel": to_dict(ParallelConfig())})
    write_latest(root, 1)
    return target


@pytest.fixture
def runtime():
    from megatron_longsky.convert.session import single_process_runtime

    with single_process_runtime():
        yield


# ------------------------------------------------------- 3. local spec <-> TE spec checkpoints

def test_local_spec_checkpoint_loads_into_te_spec_model(tmp_path, runtime):
    from megatron_longsky.checkpoint import load_model_weights, save_model_weights

    saved, _ = _tiny(seed=3)
    save_model_weights([saved], tmp_path)
    target, received = _tiny(te_extra_state=True, seed=4)
    assert TE_EXTRA_STATE_KEYS <= {sh.key for sh in _sharded(target)}  # the emulation adds TE's keys
    assert not any(k.endswith("_extra_state") for k in NOT_IN_LOCAL_SPEC & {sh.key for sh in _sharded(saved)})
    report = load_model_weights([target], tmp_path)
    assert set(report.extra_state_not_in_checkpoint) == NOT_IN_LOCAL_SPEC
    assert report.extra_state_not_in_model == [] and report.unused_checkpoint_keys == []
    # the linears get the local spec's empty extra state (TE ignores None); the norm gets none
    assert set(received) == {n for n, _ in target.named_modules() if n.endswith(TE_MODULES)}
    assert all(v is None for v in received.values())
    expected = _weights(saved)
    for name, value in _weights(target).items():
        assert torch.equal(value, expected[name]), name


def test_te_spec_checkpoint_loads_into_local_spec_model_and_into_te_spec(tmp_path, runtime):
    from megatron_longsky.checkpoint import load_model_weights, save_model_weights

    saved, _ = _tiny(te_extra_state=True, seed=3)
    save_model_weights([saved], tmp_path)
    local, _ = _tiny(seed=4)
    report = load_model_weights([local], tmp_path)
    assert set(report.extra_state_not_in_model) == NOT_IN_LOCAL_SPEC
    assert report.extra_state_not_in_checkpoint == [] and report.unused_checkpoint_keys == []
    expected = _weights(saved)
    assert all(torch.equal(v, expected[k]) for k, v in _weights(local).items())
    # TE -> TE keeps the extra state (FP8 scaling history) as before.
    te_model, received = _tiny(te_extra_state=True, seed=5)
    report = load_model_weights([te_model], tmp_path)
    assert report.extra_state_not_in_checkpoint == [] and report.extra_state_not_in_model == []
    assert set(received) == {n for n, _ in te_model.named_modules() if n.endswith(TE_MODULES)} | \
        {"decoder.final_layernorm"}
    assert all(isinstance(v, torch.Tensor) for v in received.values())


def test_a_missing_weight_is_still_an_error(tmp_path, runtime):
    from megatron_longsky.checkpoint import load_model_weights, save_model_weights

    tied, _ = _tiny(tie=True)  # no output_layer.weight in the checkpoint
    save_model_weights([tied], tmp_path)
    untied, _ = _tiny(tie=False)
    with pytest.raises(ValueError, match="output_layer.weight"):  # a CheckpointError (user error)
        load_model_weights([untied], tmp_path)


def _sharded(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return list(nested_values(model.sharded_state_dict()))


def test_local_spec_final_norm_is_the_layers_norm_not_te(runtime):
    """megatron-core would take TE's norm for the final norm of a local-spec model as soon
    as TE imports (then a CPU-written checkpoint lacks its _extra_state, and the model cannot
    run on CPU): ours uses the layers' own norm class."""
    model, _ = _tiny()
    layer_norm = type(model.decoder.layers[0].input_layernorm)
    assert type(model.decoder.final_layernorm) is layer_norm
    assert "decoder.final_layernorm._extra_state" not in model.state_dict()


# ------------------------------------------------------- 1 + 2. evaluation: device, no FP8

FP8_CHECKPOINT = {**TINY, "fp8": "hybrid", "fp8_recipe": "delayed", "fp8_attention": "dot_product"}


def test_evaluation_of_an_fp8_trained_checkpoint_runs_without_fp8(tmp_path, runtime):
    """A training config with fp8: hybrid (the recipes) rides along in config.yaml;
    evaluation must not inherit it (and on CPU it used to refuse to build at all)."""
    from megatron_longsky.eval.megatron_backend import MegatronBackend

    _write_checkpoint(tmp_path, FP8_CHECKPOINT, model=_tiny()[0])  # trained on a GPU with TE
    backend = MegatronBackend.from_checkpoint(tmp_path, ParallelConfig())
    assert backend.config.fp8 is None and not backend.config.fp8_dot_product_attention
    assert backend.kv_cache and not backend.fp8
    logits = backend.logits([[1, 2, 3, 4, 5]])
    assert logits.shape == (1, 5, 256) and torch.isfinite(logits).all()


def test_evaluation_with_fp8_asked_pads_to_fp8_shapes(tmp_path, monkeypatch):
    from megatron_longsky.eval.megatron_backend import evaluation_model_config

    cfg = evaluation_model_config({"model": FP8_CHECKPOINT}, "config.yaml:model")
    assert (cfg.fp8, cfg.fp8_attention) == (None, "off")
    cfg = evaluation_model_config({"model": FP8_CHECKPOINT}, "config.yaml:model", fp8="e4m3")
    assert (cfg.fp8, cfg.fp8_attention) == ("e4m3", "dot_product")

    from megatron_longsky.eval.megatron_backend import MegatronBackend

    backend = MegatronBackend.__new__(MegatronBackend)  # just the padding rule
    backend.cp_size, backend.tp_size, backend.sequence_parallel, backend.fp8 = 2, 1, False, True
    assert backend._padded_length(5) == 32 and backend._padded_length(33) == 64
    backend.fp8 = False
    assert backend._padded_length(5) == 8


def test_evaluation_model_is_built_on_the_device_it_runs_on(tmp_path, runtime, monkeypatch):
    """The meta device stands in for CUDA: every parameter and buffer must end up there
    (the backend used to keep megatron-core's CPU-initialised model while inputs went to CUDA)."""
    import megatron_longsky.checkpoint as checkpoint_pkg
    from megatron_longsky.eval import megatron_backend

    _write_checkpoint(tmp_path, TINY)
    meta = torch.device("meta")
    monkeypatch.setattr(megatron_backend, "current_device", lambda: meta)
    monkeypatch.setattr(checkpoint_pkg, "load_model_weights", lambda model, ckpt: None)
    backend = megatron_backend.MegatronBackend.from_checkpoint(tmp_path, ParallelConfig())
    assert backend.device == meta
    tensors = list(backend.model.parameters()) + list(backend.model.buffers())
    assert tensors and {t.device.type for t in tensors} == {"meta"}


def test_build_model_allocates_loaded_weights_on_the_device(runtime):
    from megatron_longsky.model import build_model

    cfg = model_config_from_dict(TINY)
    model = build_model(cfg, ParallelConfig(), VOCAB, initialize=False, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model = build_model(cfg, ParallelConfig(), VOCAB, seed=1)  # CPU process: CPU
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# ------------------------------------------------------------- 5. cp_comm_type, at config time

def _train_config(**overrides):
    from megatron_longsky.training.config import load_train_config

    return load_train_config(None, ["model.preset=tiny"] + [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("overrides,message", [
    # tiny: 4 query heads, 2 KV groups; a2a spreads both over the CP ranks
    ({"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a"}, "2 key/value heads"),
    ({"parallel.context_parallel_size": 2, "parallel.tensor_model_parallel_size": 2,
      "parallel.cp_comm_type": "a2a"}, "1 key/value heads"),
    ({"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "all_gather", "data.kind": "sft",
      "data.packed": "true"}, "THD .packed. input only with cp_comm_type=p2p"),
    ({"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "a2a", "data.kind": "sft",
      "data.packed": "true"}, "only with cp_comm_type=p2p"),
    ({"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p"}, "needs parallel.hierarchical"),
    ({"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p",
      "parallel.hierarchical_context_parallel_sizes": "[2,3]"}, "product is context_parallel_size=4"),
    ({"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p",
      "parallel.hierarchical_context_parallel_sizes": "[4,1]"}, "spreads each TP rank's attention heads over 4"),
    ({"parallel.context_parallel_size": 2, "parallel.hierarchical_context_parallel_sizes": "[1,2]"},
     "used by cp_comm_type=a2a\\+p2p only"),
])
def test_cp_comm_type_needs_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _train_config(**overrides)


def test_cp_comm_types_that_fit_are_accepted():
    cfg = _train_config(**{"parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p",
                           "parallel.hierarchical_context_parallel_sizes": "[2,2]"})
    assert cfg.parallel.hierarchical_cp_groups == [2, 2]
    assert _train_config(**{"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "a2a"})
    assert _train_config(**{"parallel.context_parallel_size": 2, "data.kind": "sft", "data.packed": "true"})
    assert _train_config(**{"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "all_gather"})


def test_a2a_p2p_model_refuses_to_build_without_hierarchical_groups(runtime):
    """parallel_state here has no hierarchical CP groups: TE would attend without a CP group."""
    from megatron_longsky.model import build_model

    parallel = ParallelConfig(context_parallel_size=2, cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[1, 2])
    with pytest.raises(RuntimeError, match="hierarchical context-parallel groups do not exist"):
        build_model(model_config_from_dict(TINY), parallel, VOCAB, seed=1)


def _hierarchical_groups(all_sizes):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longsky.model import build_model, transformer_config
    from megatron_longsky.runtime.distributed import initialize

    out = []
    for sizes in all_sizes:
        parallel = ParallelConfig(context_parallel_size=2, cp_comm_type="a2a+p2p",
                                  hierarchical_context_parallel_sizes=sizes)
        initialize(parallel, seed=1)
        groups = parallel_state.get_hierarchical_context_parallel_groups()
        build_model(model_config_from_dict(TINY), parallel, VOCAB, seed=1)  # no refusal: the groups exist
        tcfg = transformer_config(model_config_from_dict(TINY), parallel)
        out.append(([dist.get_world_size(g) for g in groups], tcfg.hierarchical_context_parallel_sizes))
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_initialize_creates_the_hierarchical_cp_groups():
    pytest.importorskip("einops", reason="megatron-core needs einops for hierarchical CP groups")
    all_sizes = [[2, 1], [1, 2]]
    for result in run_distributed(_hierarchical_groups, 2, all_sizes):
        assert result == [(sizes, sizes) for sizes in all_sizes]


# ------------------------------------------------------------------- 6. the FP8 shard rule

def test_fp8_shard_rule_is_checked_at_config_time():
    # 72 / CP=2 = 36 tokens per rank: not a multiple of 16
    with pytest.raises(ConfigError, match="FP8 needs each shard divisible by 16"):
        _train_config(**{"model.fp8": "hybrid", "model.seq_length": 72, "parallel.context_parallel_size": 2})
    sft = {"data.kind": "sft", "data.prefixes": "[x]", "model.seq_length": 128}
    # SFT samples are padded to data.pad_to_multiple: every CP rank's part must divide by 16
    _train_config(**sft, **{"model.fp8": "hybrid", "parallel.context_parallel_size": 2})  # 64 = 2 x 16 x 2
    with pytest.raises(ConfigError, match="data.pad_to_multiple=16 is not a multiple of 32"):
        _train_config(**sft, **{"model.fp8": "hybrid", "parallel.context_parallel_size": 2,
                                "data.pad_to_multiple": 16})
    _train_config(**sft, **{"parallel.context_parallel_size": 2, "data.pad_to_multiple": 4})  # BF16: 2 x CP


def test_packed_document_padding_rule():
    from megatron_longsky.attention.context_parallel import SequenceLengthError, validate_pad_multiple

    validate_pad_multiple(32, 2, "hybrid")
    validate_pad_multiple(4, 2, None)
    with pytest.raises(SequenceLengthError, match="FP8 needs each CP rank's part of every document"):
        validate_pad_multiple(4, 2, "hybrid")
    with pytest.raises(SequenceLengthError, match="cuts every document into 8 chunks"):
        validate_pad_multiple(6, 4, None)


def test_sft_dataset_gets_the_fp8_padding(monkeypatch):
    from megatron_longsky.sft import dataset as sft_dataset
    from megatron_longsky.training import data as data_lib

    seen = {}

    class Recorder:
        def __init__(self, prefix, seq_length, pad_to_multiple, seed, unpacked):
            seen["pad"] = pad_to_multiple

        def __len__(self):
            return 1

    monkeypatch.setattr(sft_dataset, "PackedSFTDataset", Recorder)
    cfg = _train_config(**{"model.fp8": "hybrid", "model.seq_length": 128, "parallel.context_parallel_size": 2,
                           "data.kind": "sft", "data.packed": "true", "data.prefixes": "[x]"})
    data_lib.build_sft_splits(cfg, 8)
    # data.pad_to_multiple (64, whatever the layout) keeps each CP rank's part of a sample a multiple of 16
    assert seen["pad"] == cfg.data.pad_to_multiple == 64 and seen["pad"] % (16 * 2) == 0


# ------------------------------------------------------------------------- FP8 attention

@pytest.mark.parametrize("model,message", [
    ({"fp8_attention": "dot_product"}, "needs model.fp8"),
    ({"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_attention": "multi_head"}, "works with fp8_recipe delayed"),
    ({"fp8": "hybrid", "fp8_recipe": "mxfp8", "fp8_attention": "dot_product"}, "delayed or tensorwise"),
])
def test_fp8_attention_model_rules(model, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict({**TINY, **model})


@pytest.mark.parametrize("overrides,message", [
    ({"data.kind": "sft", "data.packed": "true"}, "does not take THD"),
    ({"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "all_gather"}, "no FP8 attention"),
])
def test_fp8_attention_with_cp_and_thd(overrides, message):
    fp8 = {"model.fp8": "hybrid", "model.fp8_attention": "dot_product"}
    with pytest.raises(ConfigError, match=message):
        _train_config(**fp8, **overrides)
    assert _train_config(**fp8, **{"parallel.context_parallel_size": 2, "parallel.cp_comm_type": "a2a"})


@pytest.mark.parametrize("choice,dpa,mha", [("off", False, False), ("dot_product", True, False),
                                             ("multi_head", False, True)])
def test_fp8_attention_reaches_transformer_config(monkeypatch, choice, dpa, mha):
    """With TE present (stubbed here), the choice becomes megatron-core's switches, which
    megatron-core validates in TransformerConfig."""
    from megatron_longsky.model import spec, transformer_config

    import dataclasses

    from megatron_longsky.model.perf import Environment, resolve_perf

    monkeypatch.setattr(spec, "transformer_engine_available", lambda: True)
    cfg = model_config_from_dict({**TINY, "fp8": "hybrid", "fp8_attention": choice})
    perf = resolve_perf(cfg, ParallelConfig(), Environment(cuda=False, transformer_engine=True,
                                                           apex_grad_accum_fusion=False), "transformer_engine")
    # megatron-core checks that TE's fused RoPE is importable; it is not on this machine
    tcfg = transformer_config(cfg, ParallelConfig(), perf=dataclasses.replace(perf, apply_rope_fusion=False))
    assert (tcfg.fp8, tcfg.fp8_dot_product_attention, tcfg.fp8_multi_head_attention) == ("hybrid", dpa, mha)


# ----------------------------------------------------------- issue 15.8: device and dtypes

def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(device_lib.DEVICE_ENV, "cpu")
    assert not device_lib.use_cuda() and device_lib.current_device() == torch.device("cpu")
    monkeypatch.setenv(device_lib.DEVICE_ENV, "auto")
    assert device_lib.use_cuda()
    monkeypatch.delenv(device_lib.DEVICE_ENV)
    assert device_lib.use_cuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not device_lib.use_cuda()
    monkeypatch.setenv(device_lib.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        device_lib.use_cuda()
    monkeypatch.setenv(device_lib.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="LONGSKY_DEVICE"):
        device_lib.use_cuda()


def test_cpu_layer_stays_off_for_a_cuda_process(monkeypatch):
    from megatron_longsky.runtime import cpu_compat

    monkeypatch.setattr(device_lib, "use_cuda", lambda: True)
    was_active = cpu_compat.is_active()
    cpu_compat.disable()
    try:
        assert cpu_compat.enable() is False and not cpu_compat.is_active()
    finally:
        monkeypatch.undo()
        if was_active:
            cpu_compat.enable()


def test_dtype_names_round_trip():
    for name, dtype in device_lib.DTYPES.items():
        assert device_lib.dtype_from_name(name) is dtype and device_lib.dtype_name(dtype) == name
    with pytest.raises(ValueError, match="model.params_dtype='fp64'"):
        device_lib.dtype_from_name("fp64", "model.params_dtype")


def test_one_place_decides_the_device_and_one_maps_dtypes():
    """No module but runtime/device.py asks torch for CUDA or keeps its own dtype table."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "device.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "cuda.is_available()" in text or re.search(r'["\']bfloat16["\']\s*:\s*torch\.bfloat16', text) or \
                re.search(r"torch\.bfloat16\s*:\s*[\"']bfloat16", text) or "getattr(torch, dtype" in text:
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_cpu_setting_keeps_gpu_extensions_out_of_the_process():
    """LONGSKY_DEVICE=cpu blocks TE/apex before megatron-core imports them (it would pick TE's
    CUDA-only fused Adam and norms on a GPU machine)."""
    import os
    import subprocess
    import sys

    code = ("import sys, megatron_longsky, megatron.core.optimizer as o; "
            "print(all(sys.modules[n] is None for n in ('transformer_engine', 'apex')), o.Adam.__module__)")
    env = {**os.environ, "LONGSKY_DEVICE": "cpu", "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "torch.optim.adamw"], out.stderr[-2000:]


# ------------------------------------------------------------------ planner: FP8 attention

def test_plan_counts_fp8_attention_in_time_and_memory():
    from megatron_longsky.plan.flops import attention_peak, estimate_step_time, step_flops
    from megatron_longsky.plan.memory import PlanInput, layer_activations

    def model(**kw):
        return model_config_from_dict({"preset": "llama3-8b", "seq_length": 131072, "fp8": "hybrid", **kw})

    off, on = model(), model(fp8_attention="dot_product")
    flops = step_flops(off, 128256, 8)
    assert 0 < flops.attention_flops < flops.hardware_flops
    slow = estimate_step_time(flops, 8, 1979.0, 0.4, attention_peak(off, 1979.0))
    fast = estimate_step_time(flops, 8, 1979.0, 0.4, attention_peak(on, 1979.0))
    assert attention_peak(off, 1979.0) == pytest.approx(989.0) and attention_peak(on, 1979.0) == 1979.0
    assert fast.step_seconds == pytest.approx(flops.hardware_flops / (8 * 1979e12 * 0.4))
    assert slow.step_seconds > 1.5 * fast.step_seconds  # attention dominates at 128K
    mem = {name: layer_activations(PlanInput(model=m, vocab_size=128256, tensor_parallel=2, context_parallel=4))
           for name, m in [("off", off), ("on", on), ("mha", model(fp8_attention="multi_head"))]}
    assert mem["on"].core_attention < mem["off"].core_attention
    assert mem["mha"].linear_and_norm < mem["on"].linear_and_norm


def test_fp8_attention_off_is_read_from_yaml():
    """YAML 1.1 reads a bare `off` as false."""
    assert model_config_from_dict({**TINY, "fp8_attention": False}).fp8_attention == "off"


# ----------------------------------------------------------------------- longsky doctor

def _environment(**changes):
    from megatron_longsky.runtime.doctor import Environment

    good = dict(python="3.12.3", torch="2.10.0a0+b4e4ee81d3", cuda="13.1", cudnn=91000, nccl="2.28.3",
                gpus=[("NVIDIA H100 80GB HBM3", (9, 0))] * 8, transformer_engine="2.10.0",
                transformer_engine_error=None, apex="nvidia", megatron_core="0.16.1", longsky="0.1.0",
                einops="0.8.1", device_setting="auto")
    return Environment(**{**good, **changes})


def test_doctor_on_a_good_h100_container():
    from megatron_longsky.runtime.doctor import diagnose, render

    report = diagnose(_environment())
    assert report.problems == []
    paths = dict(report.paths)
    assert paths["layer spec (transformer_impl: auto)"] == "Transformer Engine"
    assert paths["FP8 (model.fp8)"].startswith("available") and paths["checkpoint.async_save"] == "asynchronous writes"
    assert "doctor: ok" in render(report)


@pytest.mark.parametrize("changes,fix", [
    ({"megatron_core": "0.17.0"}, "pip install megatron-core==0.16.1"),
    ({"megatron_core": None}, "pip install megatron-core==0.16.1"),
    ({"transformer_engine": "2.8.0"}, "transformer_engine\\[pytorch\\]>=2.9,<2.12"),
    ({"transformer_engine": "2.12.0"}, "outside what megatron-core 0.16.1 supports"),
    ({"torch": "2.5.1"}, "older than megatron-core 0.16.1 needs"),
    ({"apex": "pypi-impostor"}, "pip uninstall -y apex"),
    ({"gpus": [], "device_setting": "cuda"}, "LONGSKY_DEVICE=cuda but torch sees no CUDA device"),
])
def test_doctor_refuses_known_bad_combinations_with_the_fix(changes, fix):
    from megatron_longsky.runtime.doctor import diagnose

    problems = diagnose(_environment(**changes)).problems
    assert len(problems) == 1 and re.search(fix, problems[0]), problems


def test_doctor_paths_without_te_and_on_this_machine(capsys):
    from megatron_longsky.runtime.doctor import diagnose, main

    paths = dict(diagnose(_environment(transformer_engine=None, einops=None)).paths)
    assert paths["layer spec (transformer_impl: auto)"] == "megatron-core local"
    assert paths["FP8 (model.fp8)"].startswith("unavailable")
    assert "einops" in paths["cp_comm_type a2a+p2p (hierarchical CP groups)"]
    assert main([]) == 0  # this machine: CPU, megatron-core 0.16.1
    out = capsys.readouterr().out
    assert "megatron-core       0.16.1" in out and "doctor: ok" in out


def test_doctor_checks_a_training_config_against_the_machine(capsys):
    from megatron_longsky.runtime.doctor import diagnose, main

    # head dimension 128: cuDNN's FP8 attention trains no other on Hopper (attention/te_rules.py)
    cfg = _train_config(**{"model.fp8": "hybrid", "model.fp8_attention": "dot_product",
                           "model.hidden_size": 256, "model.num_attention_heads": 2, "model.num_query_groups": 2,
                           "parallel.context_parallel_size": 4, "parallel.cp_comm_type": "a2a+p2p",
                           "parallel.hierarchical_context_parallel_sizes": "[2,2]"})
    assert diagnose(_environment(), cfg).problems == []
    ada = [("NVIDIA L40S", (8, 9))]
    problems = diagnose(_environment(gpus=ada, einops=None), cfg).problems
    assert len(problems) == 2 and "fp8_attention=off" in problems[0] and "pip install einops" in problems[1]
    problems = diagnose(_environment(gpus=[], transformer_engine=None), cfg).problems
    assert any("model.fp8=hybrid needs Transformer Engine" in p for p in problems)
    # this machine (CPU): an FP8 recipe cannot run here, said with the fix; a bad key is a usage error
    assert main(["--config", str(PACKAGE.parent / "examples/configs/recipes/llama3_8b_128k/cpt.yaml")]) == 1
    assert "PROBLEM: model.fp8=hybrid" in capsys.readouterr().out
    assert main(["model.no_such_key=1"]) == 2
