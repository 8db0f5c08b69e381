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

# head size 64 (FP8 attention kernels), every GEMM dimension a multiple of 16 (FP8 GEMMs)
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


if __name__ == "__main__":
    name, work = sys.argv[1], Path(sys.argv[2])
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    work.mkdir(parents=True, exist_ok=True)
    result = globals()[name](work, args)
    print("RESULT " + json.dumps(result), flush=True)
