"""Build megatron-core GPTModel chunks for this process's pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_longsky.model.config import ModelConfig
from megatron_longsky.model.spec import layer_spec, resolve_impl
from megatron_longsky.runtime.distributed import ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, **extra):
    """megatron-core TransformerConfig for a Llama-style decoder."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    impl = resolve_impl(cfg)
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[cfg.params_dtype]
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
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # CPU initialisation draws the full weight and splits it, so a seed gives the
        # same model at any tensor-parallel size.
        use_cpu_initialization=True,
        perform_initialization=True,
        # Fused kernels exist on GPU only.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cp_comm_type=parallel.cp_comm_type if parallel.context_parallel_size > 1 else None,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        calculate_per_token_loss=True,
    )
    if impl == "transformer_engine" and cfg.fp8:
        kwargs.update(fp8=cfg.fp8, fp8_recipe=cfg.fp8_recipe)
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
):
    """One GPTModel holding this pipeline stage's layers, with RoPE as configured.

    ``seed``: layout-invariant initialisation (:func:`initialize_weights`): the same seed
    gives the same full weights at any TP/PP. Without it megatron-core initialises (its
    weights differ between PP layouts). ``initialize=False`` leaves the weights
    uninitialised, for callers that load them next (conversion, evaluation).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_longsky.model.rope import apply_rope_config

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tcfg = transformer_config(cfg, parallel, perform_initialization=initialize and seed is None)
    rope = cfg.rope
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(cfg),
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
    if initialize and seed is not None:
        from megatron_longsky.model.init import initialize_weights

        initialize_weights(model, seed, cfg.init_method_std, cfg.num_layers)
    return model
