"""Recipe dry-run: every stage's megatron-core configs as the GPU path builds them, checked
on a CPU machine before a cluster is booked (``longsky plan --dry-run``).

For each training stage: the job YAML (with the same ``key=value`` overrides as ``longsky
train``), the cluster shape, the performance switches of the simulated machine
(``--simulate gpu-te``: an H100 node with Transformer Engine and apex, the default;
``--simulate gpu``: the same without TE), then the exact ``TransformerConfig``,
``DistributedDataParallelConfig`` and ``OptimizerConfig`` the trainer would build, each
validated by megatron-core's own ``__post_init__``; with TE, Transformer Engine's
attention-backend and FP8-recipe rules for the stage on ``--device``
(:mod:`megatron_longsky.attention.te_rules`). The model is then built on the meta device
(no memory, no weights) under a fake process group of the stage's TP x PP x CP ranks, from
**that same TransformerConfig**: sequence parallelism, FP8, the fusions,
``persist_layer_norm`` and TP overlap as the run sets them. Only the two fields that say
where weights are allocated and whether they are drawn differ (``use_cpu_initialization``
on, so the meta device receives them, and ``perform_initialization`` off). A megatron-core
construction-time assertion is a stage failure naming the setting. The parameters per rank
are compared with the planner's count.

What is instantiated, said plainly (docs/plan.md):

- ``gpu``: the exact layer spec a GPU run without TE uses (megatron-core local modules,
  our core attention, our RMSNorm: :func:`megatron_longsky.model.spec.local_layer_spec`).
- ``gpu-te``: TE is not installed here, so TE's modules cannot be instantiated. The exact
  TransformerConfig is validated by megatron-core with TransformerConfig's two TE probes (is
  TE's fused RoPE importable, TE's version) answering as TE 2.9 would
  (:func:`simulated_transformer_engine`), and the model built is the local-spec stand-in
  (same parameter shapes as the TE spec) with the exact flags; apex's
  ``fused_weight_gradient_mlp_cuda`` (needed by megatron-core's output layer for
  gradient-accumulation fusion) is an importable stand-in without kernels. TE's own
  construction-time checks are not run; its first-forward attention checks are the rules
  table's.

The stages chain as the recipes run them: import (vocabulary padded as the importer
records it) -> CPT -> SFT -> long SFT (each ``init_from`` the previous stage's ``save``,
vocabulary resolved by the trainer's own :func:`resolve_vocab_size` against the previous
stage's recorded config, same architecture and RoPE) -> needle (its lengths within the
model's context) -> export (the HF config the exporter writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_longsky.attention.te_rules import DEVICE_CAPABILITY
from megatron_longsky.config import ConfigError
from megatron_longsky.model.perf import Environment, resolve_perf
from megatron_longsky.plan.inputs import SIMULATED_GPU, SIMULATED_GPU_NO_TE, SIMULATIONS, plan_input  # noqa: F401

SIMULATED_TE_VERSION = "2.9.0"
DEFAULT_DEVICE = "h100"
TRAIN_STAGES = ("cpt", "sft", "long_sft")
# Fields that must not change along a recipe (the weights are carried over).
_ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "kv_groups", "ffn_hidden_size",
                 "tie_embeddings", "norm_epsilon")


class DryRunError(ConfigError):
    """A stage would fail; the message says which and why."""


@dataclass
class StageResult:
    name: str
    facts: dict = field(default_factory=dict)

    def render(self) -> str:
        return f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.facts.items())


@contextlib.contextmanager
def simulated_transformer_engine(version: str = SIMULATED_TE_VERSION):
    """TransformerConfig's probes for TE answer as TE ``version`` would. Nothing that runs
    a kernel is provided: the stand-ins raise if called."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import transformer_config as tc_module
    from packaging.version import Version

    def not_here(*_args, **_kwargs):
        raise RuntimeError("simulated Transformer Engine (dry-run): no kernels")

    saved = {(rope_utils, "fused_apply_rotary_pos_emb"): rope_utils.fused_apply_rotary_pos_emb,
             (rope_utils, "fused_apply_rotary_pos_emb_thd"): rope_utils.fused_apply_rotary_pos_emb_thd,
             (tc_module, "is_te_min_version"): tc_module.is_te_min_version,
             (tc_module, "get_te_version"): tc_module.get_te_version}
    rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb or not_here
    rope_utils.fused_apply_rotary_pos_emb_thd = rope_utils.fused_apply_rotary_pos_emb_thd or not_here
    tc_module.is_te_min_version = lambda v, check_equality=True: (
        Version(version) >= Version(v) if check_equality else Version(version) > Version(v))
    tc_module.get_te_version = lambda: Version(version)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def fake_model_parallel(tp: int, pp: int, cp: int):
    """megatron-core's parallel state for rank 0 of TP x PP x CP ranks, on torch's fake
    process group (no communication), as Megatron-LM's ``--fake-process-group`` does."""
    import torch
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if torch.distributed.is_initialized():
        raise DryRunError("the dry-run needs a process without a process group")
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * pp * cp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 context_parallel_size=cp, create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


class _Tokenizer:
    """The size facts of a tokenizer the dry-run cannot load (its files live on the cluster)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def padded_vocab_size(self, divisible_by: int) -> int:
        from megatron_longsky.tokenizer import pad_vocab_size

        return pad_vocab_size(self.vocab_size, divisible_by)


def _stage_error(stage: str, exc: BaseException) -> DryRunError:
    return DryRunError(f"stage {stage}: {type(exc).__name__}: {exc}")


def simulated_environment(simulate: str = "gpu-te", device: str = DEFAULT_DEVICE) -> Environment:
    """The machine a stage is checked for: ``gpu-te`` / ``gpu`` on ``device`` (a ``--device``
    name: its compute capability for TE's rules; TE's version unknown, so every rule of TE
    2.9-2.11 applies)."""
    if simulate not in SIMULATIONS:
        raise ConfigError(f"--simulate must be one of {sorted(SIMULATIONS)}, got {simulate!r}")
    if device not in DEVICE_CAPABILITY:
        raise ConfigError(f"--device {device!r}: no compute capability known (known: {sorted(DEVICE_CAPABILITY)})")
    return dataclasses.replace(SIMULATIONS[simulate], capability=DEVICE_CAPABILITY[device])


def train_stage_configs(cfg, world_size: int, vocab_size: int, env: Environment = SIMULATED_GPU):
    """(TransformerConfig, DistributedDataParallelConfig, OptimizerConfig, PerfChoices, PlanInput)
    exactly as the trainer builds them on ``env``; megatron-core validates each, and with TE
    the attention-backend and FP8-recipe rules are checked for ``env``'s device."""
    from megatron_longsky.model.build import transformer_config
    from megatron_longsky.model.perf import check_transformer_engine
    from megatron_longsky.training.optimizer import ddp_config, optimizer_config

    impl = "transformer_engine" if env.transformer_engine else "local"
    if cfg.model.transformer_impl == "local":
        impl = "local"
    elif cfg.model.transformer_impl == "transformer_engine" and impl != "transformer_engine":
        raise DryRunError("model.transformer_impl=transformer_engine but the simulated machine has no "
                          "Transformer Engine (--simulate gpu)")
    if cfg.model.fp8 and impl != "transformer_engine":
        raise DryRunError(f"model.fp8={cfg.model.fp8} needs Transformer Engine (transformer_impl={impl})")
    p = plan_input(cfg, world_size, vocab_size, "te" if impl == "transformer_engine" else "longsky")
    packed = cfg.data.kind == "sft" and cfg.data.packed
    # What the trainer checks before building (model/perf.py resolve_for_train), on env's device.
    check_transformer_engine(cfg.model, cfg.parallel.context_parallel_size, packed, env, impl)
    perf = resolve_perf(cfg.model, cfg.parallel, env, impl, cfg.optimizer.use_distributed_optimizer, packed)
    with simulated_transformer_engine() if impl == "transformer_engine" else contextlib.nullcontext():
        tcfg = transformer_config(cfg.model, cfg.parallel, perf=perf, impl=impl, on_gpu=env.cuda)
    ddp = ddp_config(cfg, perf)
    opt = optimizer_config(cfg, on_gpu=env.cuda)
    # What megatron-core checks only once the objects meet (DDP / optimizer construction).
    if ddp.overlap_param_gather and not (ddp.use_distributed_optimizer and ddp.overlap_grad_reduce):
        raise DryRunError("overlap_param_gather needs the distributed optimizer and overlap_grad_reduce")
    if opt.bf16 != tcfg.bf16 or opt.fp16 != tcfg.fp16 or opt.params_dtype != tcfg.params_dtype:
        raise DryRunError("optimizer and model disagree on the parameter dtype")
    return tcfg, ddp, opt, perf, p


@contextlib.contextmanager
def simulated_apex():
    """megatron-core's linear layers see apex's ``fused_weight_gradient_mlp_cuda`` as present
    (``tensor_parallel/layers.py`` reads ``_grad_accum_fusion_available``, set at its import, when
    ``gradient_accumulation_fusion`` is on); nothing calls a kernel on the meta device."""
    from megatron.core.tensor_parallel import layers

    saved = layers._grad_accum_fusion_available
    layers._grad_accum_fusion_available = True
    try:
        yield
    finally:
        layers._grad_accum_fusion_available = saved


# TransformerConfig fields -> the setting of ours that sets them (model/build.py, model/perf.py).
_SETTING = {
    "sequence_parallel": "parallel.sequence_parallel", "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "context_parallel_size": "parallel.context_parallel_size", "cp_comm_type": "parallel.cp_comm_type",
    "fp8": "model.fp8", "fp8_recipe": "model.fp8_recipe", "tp_comm_overlap": "parallel.tp_comm_overlap",
    "fp8_dot_product_attention": "model.fp8_attention", "fp8_multi_head_attention": "model.fp8_attention",
    "params_dtype": "model.params_dtype", "bf16": "model.params_dtype", "fp16": "model.params_dtype",
    "recompute_granularity": "model.recompute_granularity", "num_query_groups": "model.num_query_groups",
    "persist_layer_norm": "persist_layer_norm (model/build.py: on for GPU runs with TE)",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion (model/perf.py)",
    "apply_rope_fusion": "apply_rope_fusion (model/perf.py)",
}


def construction_failure(exc: BaseException) -> str:
    """What a construction-time failure in megatron-core says, with the settings the failing
    line reads (``config.<field>``, mapped to ours) and where it is."""
    import linecache
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where, fields = "", []
    for frame in reversed(frames):
        line = frame.line or linecache.getline(frame.filename, frame.lineno)
        found = re.findall(r"config\.([A-Za-z_]\w*)", line or "")
        if "megatron" in frame.filename and (found or not where):
            where = where or f"{Path(frame.filename).name}:{frame.lineno}"
            if found:
                where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
                fields = found
                break
    settings = [_SETTING.get(f, f"TransformerConfig.{f}") for f in dict.fromkeys(fields)]
    named = f" (setting: {', '.join(settings)})" if settings else ""
    return f"{type(exc).__name__} building the model{named}: {exc or 'assertion failed'}" + (
        f" [{where}]" if where else "")


def meta_model(cfg, tcfg, vocab_size: int, env: Environment = SIMULATED_GPU):
    """This layout's rank-0 model on the meta device, from the run's own TransformerConfig
    (``use_cpu_initialization`` on and ``perform_initialization`` off, nothing else changed)
    and the layer spec the run on ``env`` takes (see the module docstring for ``gpu-te``)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_longsky.model.rope import apply_rope_config
    from megatron_longsky.model.spec import local_layer_spec

    par = cfg.parallel
    rope = cfg.model.rope
    te = env.transformer_engine and cfg.model.transformer_impl != "local"
    with fake_model_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                             par.context_parallel_size), torch.device("meta"), \
            (simulated_transformer_engine() if te else contextlib.nullcontext()), \
            (simulated_apex() if tcfg.gradient_accumulation_fusion else contextlib.nullcontext()):
        # replace() runs TransformerConfig.__post_init__ again (its TE probes: inside the simulation).
        meta_cfg = dataclasses.replace(tcfg, use_cpu_initialization=True, perform_initialization=False)
        for name in ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
                     "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int"):
            if hasattr(tcfg, name):
                setattr(meta_cfg, name, getattr(tcfg, name))
        spec = local_layer_spec()
        # As model/spec.py decoder_spec gives it to a local-spec run: the layers and our final norm.
        block = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(meta_cfg),
                                           layer_norm=spec.submodules.input_layernorm)
        try:
            model = GPTModel(
                config=meta_cfg,
                transformer_layer_spec=block,
                vocab_size=vocab_size,
                max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
                share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                position_embedding_type="yarn" if rope.scaling == "yarn" else "rope",
                rotary_base=rope.base,
                seq_len_interpolation_factor=rope.factor if rope.scaling == "linear" else None,
            )
        except (AssertionError, ValueError, RuntimeError, TypeError, ImportError) as exc:
            raise DryRunError(construction_failure(exc)) from exc
        apply_rope_config(model, rope)
        return model


def meta_model_params(cfg, tcfg, vocab_size: int, env: Environment = SIMULATED_GPU) -> int:
    """The parameter count of :func:`meta_model`."""
    return sum(p.numel() for p in meta_model(cfg, tcfg, vocab_size, env).parameters())


def dry_run_train_stage(name: str, cfg, world_size: int, vocab_size: int, build_meta: bool = True,
                        env: Environment = SIMULATED_GPU) -> StageResult:
    from megatron_longsky.plan.memory import params_on_rank

    try:
        tcfg, ddp, opt, perf, p = train_stage_configs(cfg, world_size, vocab_size, env)
        facts = {"gpus": world_size, "TP": p.tensor_parallel, "PP": p.pipeline_parallel, "CP": p.context_parallel,
                 "DP": p.data_parallel, "micro-batches": p.num_microbatches, "vocab": vocab_size,
                 "layers": "TE" if env.transformer_engine and cfg.model.transformer_impl != "local" else "local",
                 "dtype": cfg.model.resolved_dtype(on_gpu=env.cuda), "sp": tcfg.sequence_parallel,
                 "fp8": tcfg.fp8, "recompute": tcfg.recompute_granularity,
                 "rope_fusion": tcfg.apply_rope_fusion, "grad_accum_fusion": tcfg.gradient_accumulation_fusion,
                 "overlap_grad_reduce": ddp.overlap_grad_reduce, "overlap_param_gather": ddp.overlap_param_gather,
                 "tp_comm_overlap": tcfg.tp_comm_overlap, "distributed_optimizer": opt.use_distributed_optimizer}
        if build_meta:
            params = meta_model_params(cfg, tcfg, vocab_size, env)
            planned = params_on_rank(p, "first") if p.pipeline_parallel == 1 else None
            if planned is not None and planned != params:
                raise DryRunError(f"the meta model holds {params} parameters per rank, the planner counts {planned}")
            facts["params_per_rank"] = params
    except DryRunError as exc:
        raise DryRunError(f"stage {name}: {exc}") from exc
    except (ConfigError, ValueError, AssertionError, RuntimeError, TypeError) as exc:
        raise _stage_error(name, exc) from exc
    return StageResult(name, facts)


def stated_nodes(path: Path) -> Optional[int]:
    """The node count a recipe stage's header states (``# nodes: N``)."""
    found = re.search(r"^# nodes: (\d+)", Path(path).read_text(encoding="utf-8"), re.MULTILINE)
    return int(found.group(1)) if found else None


def _record(directory: Path, cfg_model, vocab_size: int) -> Path:
    """The part of a checkpoint's config.yaml the next stage reads (model, vocabulary)."""
    from megatron_longsky.checkpoint.layout import write_checkpoint_config

    directory.mkdir(parents=True, exist_ok=True)
    model = dataclasses.asdict(cfg_model)
    model["vocab_size"] = vocab_size
    write_checkpoint_config(directory, {"model": model})
    return directory


def dry_run_recipe(recipe_dir: str | Path, overrides: list[str] = (), nodes: Optional[int] = None,
                   gpus_per_node: int = 8, build_meta: bool = True,
                   env: Environment = SIMULATED_GPU) -> list[StageResult]:
    """Every stage of a recipe directory (cpt/sft/long_sft/needle YAMLs), chained."""
    from megatron_longsky.config import load_config
    from megatron_longsky.convert.hf_config import hf_config_from_model
    from megatron_longsky.eval.needle import NeedleConfig
    from megatron_longsky.model.config import preset
    from megatron_longsky.training.config import load_train_config
    from megatron_longsky.training.loop import resolve_vocab_size

    recipe_dir = Path(recipe_dir)
    results = []
    cfgs = {}
    for stage in TRAIN_STAGES:
        path = recipe_dir / f"{stage}.yaml"
        if not path.exists():
            raise DryRunError(f"{recipe_dir}: no {stage}.yaml")
        try:
            cfgs[stage] = load_train_config(path, list(overrides))
        except (ConfigError, ValueError) as exc:
            raise _stage_error(stage, exc) from exc
    with tempfile.TemporaryDirectory(prefix="longsky-dry-run-") as tmp:
        tmp = Path(tmp)
        # import: the HF model's own vocabulary (the preset's), padded by the model config.
        cpt = cfgs["cpt"]
        raw_model = load_config_model_preset(recipe_dir / "cpt.yaml")
        hf_vocab = preset(raw_model)["vocab_size"] if raw_model else cpt.model.vocab_size
        if not hf_vocab:
            raise DryRunError("stage import: the model's vocabulary size is unknown (no preset vocab_size)")
        tokenizer = _Tokenizer(hf_vocab)
        import_vocab = dataclasses.replace(cpt.model, vocab_size=hf_vocab).padded_vocab_size(
            tensor_parallel=cpt.parallel.tensor_model_parallel_size)
        previous = _record(tmp / "import", cpt.model, import_vocab)
        results.append(StageResult("import", {"vocab": f"{hf_vocab} padded to {import_vocab}",
                                              "output": cpt.checkpoint.init_from}))
        previous_save, previous_model = cpt.checkpoint.init_from, cpt.model
        for stage in TRAIN_STAGES:
            cfg = cfgs[stage]
            if cfg.checkpoint.init_from != previous_save:
                raise DryRunError(f"stage {stage}: checkpoint.init_from={cfg.checkpoint.init_from} is not the "
                                  f"previous stage's output {previous_save}")
            changed = [k for k in _ARCHITECTURE if getattr(cfg.model, k) != getattr(previous_model, k)]
            if cfg.model.rope.base != previous_model.rope.base or cfg.model.rope.scaling != previous_model.rope.scaling:
                changed.append("rope")
            if changed:
                raise DryRunError(f"stage {stage}: {', '.join(changed)} differ from the weights it starts from")
            try:
                vocab = resolve_vocab_size(cfg, tokenizer, previous)
            except (ConfigError, ValueError) as exc:
                raise _stage_error(stage, exc) from exc
            stage_nodes = nodes or stated_nodes(recipe_dir / f"{stage}.yaml")
            if not stage_nodes:
                raise DryRunError(f"stage {stage}: no node count (pass --nodes, or state '# nodes: N' in the YAML)")
            results.append(dry_run_train_stage(stage, cfg, stage_nodes * gpus_per_node, vocab, build_meta, env))
            previous = _record(tmp / stage, cfg.model, vocab)
            previous_save, previous_model = cfg.checkpoint.save, cfg.model
        final = cfgs[TRAIN_STAGES[-1]]
        context = max(final.model.max_position_embeddings or 0, final.model.seq_length)
        needle_path = recipe_dir / "needle.yaml"
        if needle_path.exists():
            try:
                needle = load_config(NeedleConfig, needle_path)
            except (ConfigError, ValueError) as exc:
                raise _stage_error("needle", exc) from exc
            if max(needle.lengths) > context:
                raise DryRunError(f"stage needle: lengths up to {max(needle.lengths)} exceed the context "
                                  f"{context} the model was trained for")
            results.append(StageResult("needle", {"lengths": f"{min(needle.lengths)}..{max(needle.lengths)}",
                                                  "context": context}))
        # The exporter writes the imported model's own vocabulary (its hf_config.json), not the
        # padded embedding rows (convert/exporter.py).
        hf = hf_config_from_model(final.model, hf_vocab, torch_dtype=final.model.resolved_dtype(on_gpu=env.cuda))
        results.append(StageResult("export", {"rope_theta": hf["rope_theta"],
                                              "max_position_embeddings": hf["max_position_embeddings"],
                                              "vocab": f"{hf['vocab_size']} of {vocab} rows"}))
    return results


def load_config_model_preset(path: Path) -> Optional[str]:
    from megatron_longsky.config import load_yaml

    return (load_yaml(path).get("model") or {}).get("preset")
