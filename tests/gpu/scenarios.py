"""GPU scenarios, each run in a process of its own by tests/gpu/test_gpu.py:

    python tests/gpu/scenarios.py NAME WORKDIR [JSON-ARGS]

prints one line ``RESULT <json>`` (``{"skip": reason}`` when the machine lacks something).
A process per scenario: megatron-core's parallel state, Transformer Engine's FP8 state and
the CUDA context start clean, and ``cpu_checkpoint`` can run the CPU path
(LONGSKY_DEVICE=cpu, no TE) to write the checkpoint the GPU scenarios then load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]  # the repository, tests/ (fixtures)

# every GEMM dimension a multiple of 16 (FP8 GEMMs); FP8 attention scenarios use 2 heads (head dim 128)
MODEL = {"preset": "tiny", "num_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_query_groups": 2,
         "ffn_hidden_size": 512, "seq_length": 128, "vocab_size": 384, "init_method_std": 0.02}
PROBE = [(7 * i + 3) % 250 + 2 for i in range(100)]  # a fixed 100-token sequence


def _train_config(work: Path, name: str, model: dict, **top):
    from _training_fixtures import tiny_config_dict, write_token_dataset

    from megatron_longsky.training.config import train_config_from_dict

    prefix = work / "data" / "tokens"
    if not Path(f"{prefix}.idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        write_token_dataset(prefix, num_docs=128, min_len=100, max_len=400)
    top = {"train_iters": 6, "global_batch_size": 4, "output_dir": str(work / name / "run"),
           "checkpoint": {"save": str(work / name / "ckpt"), "save_at_end": True}, **top}
    cfg = tiny_config_dict(work / name, str(prefix), **top)
    cfg["model"] = {**MODEL, **model}
    return train_config_from_dict(cfg)


def _summary(result) -> dict:
    return {"losses": result.losses, "checkpoint": str(result.checkpoint_dir)}


def _backend_nll(ckpt: str) -> dict:
    from megatron_longsky.eval.megatron_backend import MegatronBackend
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize, shutdown

    initialize(ParallelConfig())
    backend = MegatronBackend.from_checkpoint(ckpt, ParallelConfig())
    out = {"nll": backend.token_nll(PROBE).tolist(), "device": str(backend.device),
           "param_devices": sorted({p.device.type for p in backend.model.parameters()}),
           "te_modules": sum("transformer_engine" in type(m).__module__ for m in backend.model.modules())}
    shutdown()
    return out


def cpu_checkpoint(work: Path, args: dict) -> dict:
    """CPU path (LONGSKY_DEVICE=cpu): a local-spec checkpoint and its NLL on PROBE. The model says
    transformer_impl: auto, as CPU runs and imports do: on the GPU it loads into the TE spec."""
    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.runtime.device import use_cuda
    from megatron_longsky.training.loop import train

    assert not use_cuda() and not transformer_engine_available()
    result = train(_train_config(work, "cpu", {}, train_iters=2))
    return {**_summary(result), **_backend_nll(str(result.checkpoint_dir))}


def train_steps(work: Path, args: dict) -> dict:
    """A few training steps on the GPU with the given model settings."""
    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.training.loop import train

    model = args["model"]
    if model.get("transformer_impl") == "transformer_engine" and not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    cfg = _train_config(work, args["name"], model, **args.get("top", {}))
    return _summary(train(cfg))


def load_cpu_checkpoint(work: Path, args: dict) -> dict:
    """A CPU-written (local spec) checkpoint on the GPU: evaluated with the TE spec, then used as
    the init_from of a TE-spec run (the CPT step of both recipes)."""
    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.training.loop import train

    if not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    out = _backend_nll(args["checkpoint"])
    cfg = _train_config(work, "init_from", {"transformer_impl": "transformer_engine"}, train_iters=2,
                        checkpoint={"save": str(work / "init_from" / "ckpt"), "init_from": args["checkpoint"]})
    out["init_from_losses"] = train(cfg).losses
    return out


def evaluate(work: Path, args: dict) -> dict:
    """Needle, perplexity and greedy generation through the Megatron backend on the GPU."""
    from megatron_longsky.eval import NeedleConfig, run_needle
    from megatron_longsky.eval.backends import LogitsBackend
    from megatron_longsky.eval.megatron_backend import MegatronBackend
    from megatron_longsky.eval.perplexity import PerplexityConfig, perplexity_by_position
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize, shutdown
    from megatron_longsky.tokenizer import ByteTokenizer

    initialize(ParallelConfig())
    tok = ByteTokenizer()
    backend = MegatronBackend.from_checkpoint(args["checkpoint"], ParallelConfig())
    needle = run_needle(NeedleConfig(lengths=[300], depths=[0, 100], value_digits=3, max_new_tokens=4),
                        backend, tok, progress=False)
    ppl = perplexity_by_position(PerplexityConfig(length=64, num_buckets=2, buckets="linear"), backend, tok,
                                 documents=[PROBE[:64], PROBE[10:74]], progress=False)
    out = {"device": str(backend.device), "kv_cache": backend.kv_cache,
           "needle_cases": sum(len(s.cases) for cell in needle.cells for s in cell.samples),
           "ppl_nll_sum": [float(x) for x in ppl.nll_sum],
           "greedy": backend.generate_greedy(PROBE[:40], 12),
           "greedy_recomputed": LogitsBackend.generate_greedy(backend, PROBE[:40], 12)}
    shutdown()
    return out


def convert_round_trip(work: Path, args: dict) -> dict:
    """HF -> ours -> HF on the GPU machine: every tensor back unchanged."""
    import torch
    from safetensors.torch import load_file
    from test_convert import make_hf_model

    from megatron_longsky.convert import export_checkpoint, import_checkpoint

    hf = make_hf_model(work / "hf", num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0)
    root = import_checkpoint(work / "hf", work / "imported")
    out = export_checkpoint(root, work / "exported")
    exported = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        exported.update(load_file(str(f)))
    original = hf.state_dict()
    mismatched = [k for k, v in original.items() if k in exported and not torch.equal(v, exported[k].to(v.dtype))]
    missing = sorted(set(original) - set(exported))
    return {"mismatched": mismatched, "missing": missing, "tensors": len(exported)}


def attention_backends(work: Path, args: dict) -> dict:
    """Transformer Engine's own backend choice (``get_attention_backend``, as DotProductAttention
    calls it at the first forward) next to attention/te_rules.py's verdict, for the cases the
    rules table refuses or allows: every refusal must be TE's 'no backend', every allowance a
    backend TE has. Needs no second GPU: the CP filters read only ``context_parallel=True``."""
    from megatron_longsky.attention import te_rules
    from megatron_longsky.model.spec import transformer_engine_available

    if not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    import torch
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format
    from transformer_engine.pytorch.attention.dot_product_attention.utils import (
        AttentionParams, get_attention_backend,
    )

    capability = te_rules.device_capability()
    te_version = te_rules.installed_te_version()
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}

    def fp8_meta(recipe):
        # As DotProductAttention.init_fp8_metadata builds it with NVTE_DPA_FP8_RECIPE unset:
        # delayed -> [DS]; tensorwise -> [CS, DS] with DS as fp8_meta["recipe"].
        if recipe == "delayed":
            ds = DelayedScaling(fp8_format=Format.HYBRID, fp8_dpa=True)
            return {"recipe": ds, "local_recipes": [ds]}
        cs = Float8CurrentScaling(fp8_format=Format.HYBRID, fp8_dpa=True)
        ds = DelayedScaling(fp8_format=Format.HYBRID, fp8_dpa=True)
        return {"recipe": ds, "local_recipes": [cs, ds]}

    cases = {  # name: (dtype, CP > 1, THD, FP8-attention recipe or None)
        "bf16": ("bfloat16", False, False, None), "bf16_cp": ("bfloat16", True, False, None),
        "bf16_thd_cp": ("bfloat16", True, True, None), "fp32": ("float32", False, False, None),
        "fp32_cp": ("float32", True, False, None), "fp32_thd": ("float32", False, True, None),
        "fp8_dpa_delayed": ("bfloat16", False, False, "delayed"),
        "fp8_dpa_tensorwise": ("bfloat16", False, False, "tensorwise"),
    }
    out = {"capability": list(capability), "te_version": list(te_version), "cases": {}}
    for name, (dtype, cp, thd, recipe) in cases.items():
        params = AttentionParams(
            qkv_type=torch.Tensor, qkv_dtype=dtypes[dtype], qkv_layout="thd_thd_thd" if thd else "sbhd_sbhd_sbhd",
            batch_size=2, num_heads=8, num_gqa_groups=2, max_seqlen_q=1024, max_seqlen_kv=1024, head_dim_qk=128,
            head_dim_v=128, attn_mask_type="padding_causal" if thd else "causal", context_parallel=cp,
            cp_comm_type="p2p", is_training=True, fp8=recipe is not None,
            fp8_meta=fp8_meta(recipe) if recipe else {})
        te_available = [bool(x) for x in get_attention_backend(params)[-1]]
        ours = te_rules.available_backends(te_rules.AttentionCase(
            dtype=dtype, head_dim=128, context_parallel=2 if cp else 1, packed=thd, fp8=recipe is not None,
            fp8_recipe=recipe or "delayed", fp8_attention="dot_product" if recipe else "off",
            capability=capability, te_version=te_version, dpa_fp8_recipe=""))
        out["cases"][name] = {"te": te_available, "ours": ours}
    return out


def tensorwise_fp8_attention(work: Path, args: dict) -> dict:
    """fp8_recipe=tensorwise with FP8 dot-product attention: refused before the model is built
    below sm100 (attention/te_rules.py), unless NVTE_DPA_FP8_RECIPE=DelayedScaling (set for
    this process by the test) makes TE run the attention with delayed scaling; then it trains."""
    from megatron_longsky.attention.te_rules import AttentionBackendError, device_capability
    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.training.loop import train

    if not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    # head dimension 128: the one cuDNN's FP8 fused attention trains below sm100
    cfg = _train_config(work, "cs_dpa", {"transformer_impl": "transformer_engine", "fp8": "hybrid",
                                         "fp8_recipe": "tensorwise", "fp8_attention": "dot_product",
                                         "num_attention_heads": 2, "num_query_groups": 2})
    out = {"capability": list(device_capability())}
    try:
        out["losses"] = train(cfg).losses
    except AttentionBackendError as exc:
        out["refused"] = str(exc)
    return out


def packed_rows(work: Path, args: dict) -> dict:
    """Packed SFT rows (THD) through TE's attention on the GPU, bf16 by default (CP=1 here:
    CP needs a second GPU; the CP x THD rules are compared with TE in attention_backends)."""
    from _training_fixtures import write_sft_dataset

    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.training.loop import train

    if not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    prefix = write_sft_dataset(work, num_samples=24)
    cfg = _train_config(work, "packed", {"transformer_impl": "transformer_engine", "seq_length": 256},
                        data={"kind": "sft", "prefixes": [prefix], "packed": True})
    return _summary(train(cfg))


def train_then_evaluate(work: Path, args: dict) -> dict:
    """Train, then evaluate, in one process (as a job script or notebook does), TE spec. With
    ``parallel.tp_comm_overlap`` TE's userbuffers were initialised on every model build and
    ``initialize_ub`` asserts on the second; here they are initialised once per process and
    destroyed at teardown (model/perf.py). TP overlap needs TP >= 2 GPUs: on one GPU the
    userbuffer bookkeeping is exercised through initialize_tp_comm_overlap itself."""
    import torch

    from megatron_longsky.model.perf import PerfChoices, initialize_tp_comm_overlap, release_tp_comm_overlap
    from megatron_longsky.model.spec import transformer_engine_available
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize, shutdown
    from megatron_longsky.training.loop import evaluate, train

    if not transformer_engine_available():
        return {"skip": "Transformer Engine is not importable"}
    cfg = _train_config(work, "train_eval", {"transformer_impl": "transformer_engine"}, train_iters=2)
    out = {"losses": train(cfg).losses}
    out["eval_loss"] = evaluate(cfg, str(work / "train_eval" / "ckpt"), list(cfg.data.prefixes), num_batches=1)
    # TE's userbuffers, initialised through initialize_tp_comm_overlap twice in one process, as
    # train-then-evaluate with tp_comm_overlap does (TP=1 over a world of 1: only TE's
    # bookkeeping is under test; a first call this machine cannot serve is reported, not hidden).
    initialize(ParallelConfig())
    choices = PerfChoices(False, False, False, False, False, None, tp_comm_overlap=True)
    ub_args = (choices, 128, 1, MODEL["hidden_size"], 1, 1, False, torch.bfloat16)
    try:
        initialize_tp_comm_overlap(*ub_args)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["ub"] = f"unavailable: {type(exc).__name__}: {exc}"
    else:
        initialize_tp_comm_overlap(*ub_args)  # TE asserted here before (module/base.py initialize_ub)
        release_tp_comm_overlap()
        initialize_tp_comm_overlap(*ub_args)  # after a release: initialised again
        release_tp_comm_overlap()
        out["ub"] = "ok"
    shutdown()
    return out


if __name__ == "__main__":
    name, work = sys.argv[1], Path(sys.argv[2])
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    work.mkdir(parents=True, exist_ok=True)
    result = globals()[name](work, args)
    print("RESULT " + json.dumps(result), flush=True)
