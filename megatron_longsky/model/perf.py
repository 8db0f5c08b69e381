"""GPU performance switches, chosen at run time from the machine and the config.

``resolve_perf(model, parallel, ...)`` is a pure function of the config and an
:class:`Environment` (CUDA, Transformer Engine, apex's fused weight-gradient kernel), so the
choices can be checked on CPU for any simulated machine; ``Environment.detect()`` reads this
one. Each choice follows the megatron-core 0.16.1 source:

- ``use_cpu_initialization``: on CPU only. On GPU each rank allocates and initialises its
  own shards on the device (megatron-core's initialisation, seeded per TP/PP rank), instead
  of drawing every full weight on the host.
- ``gradient_accumulation_fusion``: needs apex's ``fused_weight_gradient_mlp_cuda`` even
  with TE: the output layer is megatron-core's own ``ColumnParallelLinear``, which raises
  without it (``tensor_parallel/layers.py``); TE's linears then fuse their wgrad too.
- ``overlap_grad_reduce`` / ``overlap_param_gather``: with the distributed optimizer on GPU
  (the gradient reduce-scatter and the parameter all-gather run during backward/forward).
  Buckets get a fixed size so the optimizer's 'dp_reshardable' checkpoints keep one layout
  at every data-parallel size.
- ``apply_rope_fusion``: TE's fused RoPE, except YaRN with packed rows: the fused THD kernel
  has no ``mscale`` (megatron-core falls back to the unfused kernel only for BSHD input).
- selective recompute: with our attention it recomputes core attention (its scores are the
  memory); TE's fused attention keeps no score matrix, so recomputing it would only re-run
  it: the run keeps every activation instead (megatron-core warns about the same thing).
- ``tp_comm_overlap``: an option (``parallel.tp_comm_overlap``); needs TE, CUDA, TP > 1 and
  sequence parallelism (TE's userbuffers, initialised before the model is built).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Optional

from megatron_longsky.config import ConfigError

log = logging.getLogger(__name__)

# DDP bucket size (elements) with overlapped gradient reduction: megatron-core's default for
# up to 40 data-parallel ranks, fixed so the bucket layout does not depend on the DP size.
OVERLAP_BUCKET_SIZE = 40_000_000


@dataclass(frozen=True)
class Environment:
    """What the machine offers (simulated in tests and by ``longsky plan --dry-run``)."""

    cuda: bool
    transformer_engine: bool
    apex_grad_accum_fusion: bool
    # GPU compute capability and TE (major, minor); None: unknown (then TE's attention rules
    # are checked for every TE version 2.9-2.11 and without the device rules).
    capability: Optional[tuple] = None
    te_version: Optional[tuple] = None

    @classmethod
    def detect(cls) -> "Environment":
        from megatron_longsky.attention.te_rules import device_capability, installed_te_version
        from megatron_longsky.model.spec import transformer_engine_available
        from megatron_longsky.runtime.device import use_cuda

        cuda = use_cuda()
        apex = cuda and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
        te = transformer_engine_available()
        return cls(cuda=cuda, transformer_engine=te, apex_grad_accum_fusion=apex,
                   capability=device_capability() if cuda else None, te_version=installed_te_version() if te else None)


@dataclass(frozen=True)
class PerfChoices:
    use_cpu_initialization: bool
    gradient_accumulation_fusion: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    apply_rope_fusion: bool
    # The recompute actually run: None, 'selective' (with recompute_modules) or 'full'.
    recompute_granularity: Optional[str]
    recompute_modules: Optional[tuple] = None
    tp_comm_overlap: bool = False
    bucket_size: Optional[int] = None
    reasons: dict = field(default_factory=dict, compare=False)

    def transformer_config_kwargs(self) -> dict:
        kwargs = dict(
            use_cpu_initialization=self.use_cpu_initialization,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            apply_rope_fusion=self.apply_rope_fusion,
            recompute_granularity=self.recompute_granularity,
            tp_comm_overlap=self.tp_comm_overlap,
        )
        if self.recompute_modules is not None:
            kwargs["recompute_modules"] = list(self.recompute_modules)
        return kwargs

    def ddp_config_kwargs(self) -> dict:
        return dict(overlap_grad_reduce=self.overlap_grad_reduce, overlap_param_gather=self.overlap_param_gather,
                    bucket_size=self.bucket_size)

    def summary(self) -> str:
        keys = ("use_cpu_initialization", "gradient_accumulation_fusion", "overlap_grad_reduce",
                "overlap_param_gather", "apply_rope_fusion", "recompute_granularity", "tp_comm_overlap")
        return "; ".join(f"{k}={getattr(self, k)} ({self.reasons.get(k, '')})" for k in keys)


def resolve_perf(model, parallel, env: Environment, impl: str, use_distributed_optimizer: bool = False,
                 packed_rows: bool = True) -> PerfChoices:
    """The switches for this config on ``env``. ``impl``: the layer implementation this run
    uses ('transformer_engine' or 'local', see :func:`model.spec.resolve_impl`).
    ``packed_rows``: whether rows hold several documents (packed SFT): RoPE then runs on
    THD input. Raises ConfigError for an option this machine or config cannot honour."""
    te = impl == "transformer_engine"
    reasons = {}
    gpu = env.cuda
    reasons["use_cpu_initialization"] = "no GPU" if not gpu else "each rank builds its shards on the device"
    grad_fusion = gpu and env.apex_grad_accum_fusion
    reasons["gradient_accumulation_fusion"] = (
        "apex fused_weight_gradient_mlp_cuda" if grad_fusion
        else "no GPU" if not gpu else "apex's fused_weight_gradient_mlp_cuda is not installed")
    overlap = gpu and use_distributed_optimizer
    reasons["overlap_grad_reduce"] = reasons["overlap_param_gather"] = (
        "distributed optimizer on GPU" if overlap
        else "no GPU" if not gpu else "needs optimizer.use_distributed_optimizer")
    yarn = model.rope.scaling == "yarn"
    rope_fusion = te and not (yarn and packed_rows)
    reasons["apply_rope_fusion"] = (
        "TE fused RoPE" if rope_fusion
        else "needs Transformer Engine" if not te else "YaRN's mscale is not applied by TE's fused THD kernel")
    granularity, modules = model.recompute_granularity, None
    if granularity == "selective":
        if te:
            granularity = None
            reasons["recompute_granularity"] = ("selective requested: TE's fused attention keeps no score "
                                                "matrix, recomputing it would only re-run it; nothing recomputed")
        else:
            modules = ("core_attn",)
            reasons["recompute_granularity"] = "selective: core attention (its scores) recomputed"
    else:
        reasons["recompute_granularity"] = "as configured"
    tp_overlap = parallel.tp_comm_overlap
    if tp_overlap:
        missing = [need for need, ok in (("a GPU", gpu), ("Transformer Engine", te),
                                         ("tensor_model_parallel_size > 1", parallel.tensor_model_parallel_size > 1),
                                         ("parallel.sequence_parallel", parallel.sequence_parallel)) if not ok]
        if missing:
            raise ConfigError(f"parallel.tp_comm_overlap needs {', '.join(missing)}")
    reasons["tp_comm_overlap"] = "parallel.tp_comm_overlap" if tp_overlap else "off (parallel.tp_comm_overlap)"
    return PerfChoices(
        use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=grad_fusion,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap,
        apply_rope_fusion=rope_fusion,
        recompute_granularity=granularity,
        recompute_modules=modules,
        tp_comm_overlap=tp_overlap,
        bucket_size=OVERLAP_BUCKET_SIZE if overlap else None,
        reasons=reasons,
    )


def resolve_for_train(cfg, env: Optional[Environment] = None, impl: Optional[str] = None) -> PerfChoices:
    """:func:`resolve_perf` for a TrainConfig on this machine (or a simulated one)."""
    from megatron_longsky.model.spec import resolve_impl

    env = env or Environment.detect()
    impl = impl or resolve_impl(cfg.model)
    packed = cfg.data.kind == "sft" and cfg.data.packed
    check_transformer_engine(cfg.model, cfg.parallel.context_parallel_size, packed, env, impl)
    return resolve_perf(cfg.model, cfg.parallel, env, impl, cfg.optimizer.use_distributed_optimizer, packed)


def check_transformer_engine(model, context_parallel: int, packed: bool, env: Environment, impl: str) -> None:
    """Before anything is built on a TE machine: TE's attention-backend and FP8-recipe rules
    (attention/te_rules.py) for this model on ``env``'s device and TE version. Raises
    :class:`~megatron_longsky.attention.te_rules.AttentionBackendError` (a ConfigError)."""
    if impl != "transformer_engine" or not env.cuda:
        return
    from megatron_longsky.attention.te_rules import check_model

    check_model(model, context_parallel, packed, dtype=model.resolved_dtype(on_gpu=True),
                capability=env.capability, te_version=env.te_version)


_LOGGED: set = set()


def log_choices(choices: PerfChoices) -> None:
    """Log the switches once per process (and again only if they change)."""
    key = tuple(getattr(choices, f.name) for f in dataclasses.fields(choices) if f.name != "reasons")
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    log.info("performance switches: %s", choices.summary())


# What the userbuffers of this process were initialised for (None: not initialised by us).
_UB_KEY: Optional[tuple] = None


def initialize_tp_comm_overlap(choices: PerfChoices, seq_length: int, micro_batch_size: int, hidden_size: int,
                               context_parallel: int, tensor_parallel: int, fp8: bool, dtype) -> None:
    """TE's userbuffers for TP communication overlap, as Megatron-LM initialises them:
    after the parallel groups, before the model. GPU only.

    Once per process: TE asserts ``UB communicators are already initialized`` on a second
    ``initialize_ub`` (transformer_engine/pytorch/module/base.py, ``initialize_ub``, TE 2.9-2.11),
    so a second model build with the same buffers (train then evaluate, one process) reuses
    them, and other buffers replace them (``destroy_ub`` first). :func:`release_tp_comm_overlap`
    destroys them when the parallel state goes."""
    global _UB_KEY
    if not choices.tp_comm_overlap:
        return
    from transformer_engine.pytorch import module as te_module

    shape = [seq_length * micro_batch_size // context_parallel, hidden_size]
    key = (tuple(shape), tensor_parallel, bool(fp8), dtype)
    if _UB_KEY == key and te_module.base._ub_communicators is not None:
        return
    if te_module.base._ub_communicators is not None:
        te_module.base.destroy_ub()
    te_module.base.initialize_ub(shape=shape, tp_size=tensor_parallel, use_fp8=fp8, dtype=dtype)
    _UB_KEY = key


def release_tp_comm_overlap() -> None:
    """Destroy the userbuffers :func:`initialize_tp_comm_overlap` made (with the process
    groups they were bootstrapped on, at teardown); nothing when there are none."""
    global _UB_KEY
    if _UB_KEY is None:
        return
    from transformer_engine.pytorch import module as te_module

    te_module.base.destroy_ub()
    _UB_KEY = None
