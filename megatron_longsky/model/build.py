"""Build megatron-core GPTModel chunks for this process's pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_longsky.model.config import ModelConfig
from megatron_longsky.model.spec import decoder_spec, resolve_impl
from megatron_longsky.runtime.device import current_device, dtype_from_name, use_cuda
from megatron_longsky.runtime.distributed import ParallelConfig


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, perf=None, impl: str | None = None,
                       on_gpu: bool | None = None, **extra):
    """megatron-core TransformerConfig for a Llama-style decoder.

    ``perf``: the performance switches (:mod:`megatron_longsky.model.perf`; None: resolved
    for this machine, as for packed rows). ``impl`` / ``on_gpu`` default to this machine;
    the recipe dry-run passes a simulated GPU machine."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longsky.model.perf import Environment, log_choices, resolve_perf

    impl = impl or resolve_impl(cfg)
    on_gpu = use_cuda() if on_gpu is None else on_gpu
    if perf is None:
        perf = resolve_perf(cfg, parallel, Environment.detect(), impl)
        log_choices(perf)
    dtype = dtype_from_name(cfg.resolved_dtype(on_gpu), "model.params_dtype")
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.kv_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        embedding_init_method_std=cfg.embedding_init_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        perform_initialization=True,
        # Fused kernels exist on GPU only.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        # apex's persistent norm kernel, for TE runs as Megatron-LM sets it; the local spec's norm
        # (model/norm.py) has no such kernel, and megatron-core's WrappedTorchNorm asserts it off.
        persist_layer_norm=on_gpu and impl == "transformer_engine",
        bias_dropout_fusion=on_gpu,
        cp_comm_type=parallel.cp_comm_type if parallel.context_parallel_size > 1 else None,
        hierarchical_context_parallel_sizes=parallel.hierarchical_cp_groups,
        recompute_method=cfg.recompute_method if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_granularity == "full" else None,
        calculate_per_token_loss=True,
        # CPU initialisation, gradient-accumulation and RoPE fusion, recompute, TP overlap.
        **perf.transformer_config_kwargs(),
    )
    if impl == "transformer_engine" and cfg.fp8:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe,
                      fp8_dot_product_attention=cfg.fp8_attention == "dot_product",
                      fp8_multi_head_attention=cfg.fp8_attention == "multi_head")
    kwargs.update(extra)
    tcfg = TransformerConfig(**kwargs)
    if cfg.rope.scaling == "yarn":
        # GPTModel reads the YaRN settings as plain attributes of the config.
        tcfg.yarn_rotary_scaling_factor = cfg.rope.factor
        tcfg.yarn_original_max_position_embeddings = cfg.rope.original_max_position_embeddings
        tcfg.yarn_beta_fast = cfg.rope.beta_fast
        tcfg.yarn_beta_slow = cfg.rope.beta_slow
        tcfg.yarn_mscale = cfg.rope.mscale
        tcfg.yarn_mscale_all_dim = cfg.rope.mscale_all_dim
        tcfg.yarn_correction_range_round_to_int = True
    return tcfg


def mark_tensor_parallel_params(model) -> None:
    """Set megatron-core's TP attributes (``tensor_model_parallel``, ``partition_dim``) on
    the weights of its parallel layers.

    With ``use_cpu_initialization`` and ``perform_initialization=False`` megatron-core
    0.16 skips setting them, and then the gradient norm counts TP shards as replicas
    and checkpoint/initialisation code cannot tell how a weight is split.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=0, stride=1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=1, stride=1)


def build_model(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    vocab_size: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seed: int | None = None,
    initialize: bool = True,
    perf=None,
    device: torch.device | None = None,
):
    """One GPTModel holding this pipeline stage's layers, with RoPE as configured.

    ``seed``: layout-invariant initialisation (:func:`initialize_weights`): the same seed
    gives the same full weights at any TP/PP. Without it megatron-core initialises (its
    weights differ between PP layouts). ``initialize=False`` leaves the weights
    uninitialised, for callers that load them next (conversion, evaluation). On GPU
    (``perf.use_cpu_initialization`` off) the seed's layout-invariant draw is replaced by
    megatron-core's on-device initialisation: each rank builds only its own shards.

    The model ends on ``device`` (default: this process's device,
    :func:`megatron_longsky.runtime.device.current_device`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_longsky.model.rope import apply_rope_config

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    if parallel.hierarchical_cp_groups and \
            parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False) is None:
        # TE would get no CP group and attend within each rank's own chunks, silently.
        raise RuntimeError("parallel.cp_comm_type=a2a+p2p but megatron-core's hierarchical context-parallel "
                           "groups do not exist: initialise through megatron_longsky.runtime.distributed."
                           "initialize (it creates them from parallel.hierarchical_context_parallel_sizes)")
    from megatron_longsky.model.perf import Environment, check_transformer_engine, log_choices, resolve_perf

    if perf is None:  # evaluation, conversion (training resolves them in resolve_for_train, with its checks)
        env, impl = Environment.detect(), resolve_impl(cfg)
        check_transformer_engine(cfg, parallel.context_parallel_size, False, env, impl)
        perf = resolve_perf(cfg, parallel, env, impl)
    log_choices(perf)
    # The layout-invariant draw (model/init.py) builds every full weight on the host.
    host_init = perf.use_cpu_initialization and seed is not None
    tcfg = transformer_config(cfg, parallel, perf=perf, perform_initialization=initialize and not host_init)
    rope = cfg.rope
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=decoder_spec(cfg, tcfg),
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings or cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="yarn" if rope.scaling == "yarn" else "rope",
        rotary_base=rope.base,
        seq_len_interpolation_factor=rope.factor if rope.scaling == "linear" else None,
    )
    apply_rope_config(model, rope)
    if not tcfg.perform_initialization:
        mark_tensor_parallel_params(model)
    if initialize and host_init:
        from megatron_longsky.model.init import initialize_weights

        initialize_weights(model, seed, cfg.init_method_std, cfg.num_layers, cfg.embedding_init_std)
    return model.to(torch.device(device) if device is not None else current_device())
