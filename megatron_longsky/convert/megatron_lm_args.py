"""Megatron-LM's saved ``args`` (an ``argparse.Namespace`` in ``common.pt``) <-> our ModelConfig.

Read from Megatron-LM core_v0.16.1 (megatron/training/):

- ``checkpointing.py`` ``load_args_from_checkpoint`` (lines 1331-1477) lists what
  ``--use-checkpoint-args`` restores: :data:`RESTORED_ARGS`. Everything else comes from
  the command line, including three settings that change the model and load without
  error when missing: the norm epsilon (``--norm-epsilon``, dest ``layernorm_epsilon``),
  the llama3 RoPE switch (``--use-rope-scaling``) and the vocabulary divisibility
  (``--make-vocab-size-divisible-by``, harmless once ``padded_vocab_size`` is restored).
- ``gpt_builders.py`` ``gpt_builder`` builds GPTModel with ``rope_scaling=args.use_rope_scaling``
  and passes neither ``--rope-scaling-factor`` nor ``--rotary-seq-len-interpolation-factor``
  (unchanged up to Megatron-LM's main branch of 2026-08): megatron-core's llama3 scaling then
  always uses factor 8, low/high frequency factors 1/4 and an original context of 8192
  (``rotary_pos_embedding.py`` ``_apply_scaling``), and linear interpolation and YaRN
  cannot be expressed for a GPT model (``--position-embedding-type`` has no ``yarn``).
- ``tokenizer/tokenizer.py`` ``_vocab_size_with_padding``: the vocabulary is padded to a
  multiple of ``make_vocab_size_divisible_by x TP``; ``build_tokenizer`` keeps a restored
  ``padded_vocab_size``. We keep the padded size as the model's ``vocab_size``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from megatron_longsky.convert.hf_config import ConversionError
from megatron_longsky.model.config import ModelConfig, RopeConfig

log = logging.getLogger(__name__)

# Every argument ``load_args_from_checkpoint`` (checkpointing.py 1389-1477) sets from the
# checkpoint, in its order. The MoE / Mamba / hybrid / heterogeneous ones are None or False
# for the models we write: a None is "not provided" there, so Megatron-LM keeps its default.
RESTORED_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
    "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
    "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
    "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
    "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
    "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
    "hybrid_override_pattern", "spec", "hybrid_attention_ratio", "hybrid_mlp_ratio",
    "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_token_dispatcher_type", "moe_router_pre_softmax", "moe_grouped_gemm",
    "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
    "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "is_hybrid_model",
    "heterogeneous_layers_config_path", "heterogeneous_layers_config_encoded_json", "moe_latent_size",
    "tokenizer_model", "tokenizer_type", "tiktoken_pattern", "padded_vocab_size", "ckpt_format",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "expert_model_parallel_size",
)

# megatron-core's llama3 scaling as Megatron-LM's GPT builder uses it (see the module doc).
MEGATRON_LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# Our tokenizer types <-> Megatron-LM's --tokenizer-type (same ids: no BOS added, EOD = eos).
_TOKENIZER_TO_MEGATRON = {"hf": "HuggingFaceTokenizer", "sentencepiece": "GPTSentencePieceTokenizer"}
_TOKENIZER_FROM_MEGATRON = {
    "HuggingFaceTokenizer": "hf", "GPT2BPETokenizer": "hf", "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece", "Llama2Tokenizer": "sentencepiece",
}


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _refuse(where: str, name: str, value: Any, why: str) -> ConversionError:
    return ConversionError(f"{where}: args.{name}={value!r}: {why}; megatron_longsky models are Llama-style "
                           "(RMSNorm, SwiGLU, RoPE, GQA, no biases), nothing was written")


def check_representable(args: argparse.Namespace, where: str) -> None:
    """Refuse, naming the argument, a Megatron-LM model our ModelConfig cannot express."""
    checks = [
        # (arg, refused when, why)
        ("use_legacy_models", bool(_get(args, "use_legacy_models")), "legacy (non-megatron-core) models"),
        ("num_experts", bool(_get(args, "num_experts")), "mixture-of-experts layers"),
        ("is_hybrid_model", bool(_get(args, "is_hybrid_model") or _get(args, "hybrid_override_pattern")),
         "hybrid Mamba models"),
        ("heterogeneous_layers_config_path",
         bool(_get(args, "heterogeneous_layers_config_path") or _get(args, "heterogeneous_layers_config_encoded_json")),
         "heterogeneous layers"),
        ("spec", _get(args, "spec") not in (None, [], ["local"]), "a custom layer spec"),
        ("multi_latent_attention", bool(_get(args, "multi_latent_attention")), "multi-latent attention"),
        ("experimental_attention_variant", _get(args, "experimental_attention_variant") is not None,
         "an experimental attention variant"),
        ("mtp_num_layers", bool(_get(args, "mtp_num_layers")), "multi-token-prediction layers"),
        ("add_bias_linear", _get(args, "add_bias_linear", True) and not _get(args, "disable_bias_linear", False),
         "linear-layer biases (train with --disable-bias-linear)"),
        ("add_qkv_bias", bool(_get(args, "add_qkv_bias")), "QKV biases"),
        ("qk_layernorm", bool(_get(args, "qk_layernorm")), "query/key layer norms"),
        ("qk_l2_norm", bool(_get(args, "qk_l2_norm")), "query/key L2 norms"),
        ("attention_output_gate", bool(_get(args, "attention_output_gate")), "a gated attention output"),
        ("softmax_type", _get(args, "softmax_type", "vanilla") != "vanilla", "a modified softmax"),
        ("softmax_scale", _get(args, "softmax_scale") is not None, "a custom softmax scale"),
        ("window_size", _get(args, "window_size") is not None, "sliding-window attention"),
        ("no_rope_freq", _get(args, "no_rope_freq") is not None, "layers without RoPE"),
        ("normalization", _get(args, "normalization", "LayerNorm") != "RMSNorm", "a norm other than RMSNorm"),
        ("apply_layernorm_1p",
         bool(_get(args, "apply_layernorm_1p") or _get(args, "layernorm_zero_centered_gamma")),
         "zero-centred norm weights"),
        ("apply_residual_connection_post_layernorm", bool(_get(args, "apply_residual_connection_post_layernorm")),
         "post-norm residuals"),
        ("swiglu", not _get(args, "swiglu", False), "an MLP other than SwiGLU"),
        ("squared_relu", bool(_get(args, "squared_relu") or _get(args, "quick_geglu")), "another activation"),
        ("rotary_interleaved", bool(_get(args, "rotary_interleaved")), "interleaved RoPE"),
        ("rotary_percent", float(_get(args, "rotary_percent", 1.0)) != 1.0, "partial rotary embeddings"),
    ]
    position = _get(args, "position_embedding_type", "learned_absolute")
    if _get(args, "use_rotary_position_embeddings"):
        position = "rope"  # arguments.py validate_args: the legacy switch means rope
    checks.append(("position_embedding_type", position != "rope", "positions other than RoPE"))
    for name, refused, why in checks:
        if refused:
            value = position if name == "position_embedding_type" else _get(args, name)
            raise _refuse(where, name, value, f"{why} cannot be represented")
    heads, hidden = _get(args, "num_attention_heads"), _get(args, "hidden_size")
    kv = _get(args, "kv_channels")
    if heads and hidden and kv is not None and kv * heads != hidden:
        raise _refuse(where, "kv_channels", kv, f"head size != hidden_size/num_attention_heads "
                                                f"({hidden}/{heads}) cannot be represented")


def _required(args: argparse.Namespace, name: str, where: str) -> Any:
    value = _get(args, name)
    if value is None:
        raise ConversionError(f"{where}: args.{name} is missing: not the args of a Megatron-LM GPT model")
    return value


def rope_from_args(args: argparse.Namespace, where: str) -> RopeConfig:
    base = float(_get(args, "rotary_base", 10000))
    if not _get(args, "use_rope_scaling", False):
        if _get(args, "rotary_seq_len_interpolation_factor") is not None:
            log.warning("%s: args.rotary_seq_len_interpolation_factor=%s is ignored: Megatron-LM's GPT builder "
                        "does not pass it to the model (imported without interpolation, as the model ran)",
                        where, _get(args, "rotary_seq_len_interpolation_factor"))
        return RopeConfig(base=base, original_max_position_embeddings=int(_get(args, "seq_length") or 4096))
    factor = _get(args, "rope_scaling_factor", 8.0)
    if factor is not None and float(factor) != MEGATRON_LLAMA3["factor"]:
        log.warning("%s: args.rope_scaling_factor=%s is ignored: Megatron-LM's GPT builder does not pass it, "
                    "the model ran with megatron-core's llama3 factor 8 (imported as such)", where, factor)
    return RopeConfig(base=base, scaling="llama3", **MEGATRON_LLAMA3)


def params_dtype_from_args(args: argparse.Namespace) -> str:
    if _get(args, "bf16"):
        return "bfloat16"
    if _get(args, "fp16"):
        return "float16"
    return "float32"


def model_config_from_args(args: argparse.Namespace, where: str) -> ModelConfig:
    """Our ModelConfig for a Megatron-LM GPT model; raises ConversionError naming the arg."""
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{where}: 'args' is a {type(args).__name__}, not Megatron-LM's argparse.Namespace")
    check_representable(args, where)
    eps = _get(args, "layernorm_epsilon", _get(args, "norm_epsilon"))
    if eps is None:
        raise ConversionError(f"{where}: args.layernorm_epsilon (--norm-epsilon) is missing")
    padded = int(_required(args, "padded_vocab_size", where))
    divisible = int(_get(args, "make_vocab_size_divisible_by", 128) or 1)
    heads = int(_required(args, "num_attention_heads", where))
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention") else None
    seq = int(_required(args, "seq_length", where))
    try:
        return ModelConfig(
            num_layers=int(_required(args, "num_layers", where)),
            hidden_size=int(_required(args, "hidden_size", where)),
            num_attention_heads=heads,
            num_query_groups=None if groups in (None, heads) else int(groups),
            ffn_hidden_size=int(_required(args, "ffn_hidden_size", where)),
            vocab_size=padded,
            make_vocab_size_divisible_by=divisible if padded % divisible == 0 else 1,
            seq_length=seq,
            max_position_embeddings=_get(args, "max_position_embeddings"),
            norm_epsilon=float(eps),
            tie_embeddings=not _get(args, "untie_embeddings_and_output_weights", False),
            init_method_std=float(_get(args, "init_method_std", 0.02) or 0.02),
            rope=rope_from_args(args, where),
            params_dtype=params_dtype_from_args(args),
        )
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def tokenizer_from_args(args: argparse.Namespace) -> Optional[dict]:
    """Our ``tokenizer:`` entry for Megatron-LM's tokenizer args (None: no equivalent)."""
    kind = _TOKENIZER_FROM_MEGATRON.get(_get(args, "tokenizer_type") or "")
    if kind is None:
        return None
    if _get(args, "tokenizer_type") == "GPT2BPETokenizer":
        if not (_get(args, "vocab_file") and _get(args, "merge_file")):
            return None
        return {"type": "hf", "model": str(args.vocab_file), "merges": str(args.merge_file)}
    model = _get(args, "tokenizer_model")
    return {"type": kind, "model": str(model)} if model else None


# --------------------------------------------------------------------------------------
# ours -> Megatron-LM


def check_exportable_rope(rope: RopeConfig, where: str) -> None:
    """Megatron-LM's GPT can express no scaling, or llama3 exactly as megatron-core hard-codes it."""
    if rope.scaling == "none":
        return
    if rope.scaling == "llama3":
        ours = dict(factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                    original_max_position_embeddings=rope.original_max_position_embeddings)
        if {k: float(v) for k, v in ours.items()} == {k: float(v) for k, v in MEGATRON_LLAMA3.items()}:
            return
        raise ConversionError(
            f"{where}: model.rope llama3 scaling {ours} cannot be expressed in Megatron-LM: its GPT builder "
            f"(core_v0.16.1 gpt_builders.py) only switches on megatron-core's fixed llama3 scaling {MEGATRON_LLAMA3}")
    raise ConversionError(
        f"{where}: model.rope.scaling={rope.scaling!r} cannot be expressed in Megatron-LM: its GPT builder "
        "(core_v0.16.1 gpt_builders.py) has RoPE with no scaling or llama3 scaling (factor 8, original 8192) only")


def megatron_tokenizer_args(tokenizer: Optional[dict]) -> dict:
    """``tokenizer_type`` / ``tokenizer_model`` for our ``tokenizer:`` entry (None: no equivalent)."""
    if not tokenizer or tokenizer.get("type") not in _TOKENIZER_TO_MEGATRON or tokenizer.get("merges"):
        return {"tokenizer_type": None, "tokenizer_model": None}
    return {"tokenizer_type": _TOKENIZER_TO_MEGATRON[tokenizer["type"]], "tokenizer_model": tokenizer.get("model")}


def megatron_args(cfg: ModelConfig, padded_vocab: int, tensor_parallel: int, pipeline_parallel: int,
                  iteration: int, tokenizer: Optional[dict], where: str) -> argparse.Namespace:
    """The Namespace Megatron-LM saves as ``args``: every field ``--use-checkpoint-args`` restores
    (:data:`RESTORED_ARGS`), plus the model settings it does not restore, recorded for readers
    (ours included) and given again on the command line (:func:`unrestored_flags`)."""
    check_exportable_rope(cfg.rope, where)
    base = cfg.rope.base
    values = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        seq_length=cfg.seq_length, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.kv_groups, group_query_attention=cfg.num_query_groups is not None,
        kv_channels=cfg.head_dim,
        max_position_embeddings=max(cfg.max_position_embeddings or cfg.seq_length, cfg.seq_length),
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=True,
        # --rotary-base is an int on Megatron-LM's command line; a restored value is used as is.
        rotary_base=int(base) if float(base).is_integer() else float(base),
        rotary_percent=1.0, rotary_interleaved=False, add_bias_linear=False, add_qkv_bias=False,
        squared_relu=False, swiglu=True, untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        apply_layernorm_1p=False, normalization="RMSNorm", apply_query_key_layer_scaling=False,
        attention_dropout=0.0, hidden_dropout=0.0,  # our model's (model/build.py)
        hybrid_override_pattern=None, spec=None, hybrid_attention_ratio=None, hybrid_mlp_ratio=None,
        num_experts=None, moe_layer_freq=None, moe_ffn_hidden_size=None, moe_router_topk=None,
        moe_token_dispatcher_type=None, moe_router_pre_softmax=False, moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=None, moe_router_score_function=None,
        moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None,
        mamba_state_dim=None, mamba_head_dim=None, mamba_num_groups=None, mamba_num_heads=None,
        is_hybrid_model=False, heterogeneous_layers_config_path=None,
        heterogeneous_layers_config_encoded_json=None, moe_latent_size=None,
        **megatron_tokenizer_args(tokenizer), tiktoken_pattern=None,
        padded_vocab_size=padded_vocab, ckpt_format="torch_dist",
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1,
    )
    missing = [name for name in RESTORED_ARGS if name not in values]
    assert not missing, missing  # a new restored arg must be given a value above
    values.update(
        # Not restored by --use-checkpoint-args (see unrestored_flags); core_v0.16.1 spells the
        # epsilon `layernorm_epsilon` (TransformerConfig field behind --norm-epsilon), earlier
        # versions (core_v0.15 and before) `norm_epsilon`.
        layernorm_epsilon=cfg.norm_epsilon, norm_epsilon=cfg.norm_epsilon, layernorm_zero_centered_gamma=False,
        use_rope_scaling=cfg.rope.scaling == "llama3", rope_scaling_factor=MEGATRON_LLAMA3["factor"],
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        init_method_std=cfg.init_method_std,
        bf16=cfg.params_dtype == "bfloat16", fp16=cfg.params_dtype == "float16",
        # Megatron-LM's load skips optimizer and RNG state a checkpoint says it lacks (checkpointing.py
        # load_checkpoint: getattr(ckpt_args, 'no_save_optim'/'no_save_rng')).
        no_save_optim=True, no_save_rng=True, iteration=iteration,
        consumed_train_samples=0, skipped_train_samples=0, consumed_valid_samples=0,
        world_size=tensor_parallel * pipeline_parallel, data_parallel_size=1,
    )
    return argparse.Namespace(**values)


def unrestored_flags(cfg: ModelConfig) -> list[str]:
    """Megatron-LM command-line flags, one per line, that the model needs and
    ``--use-checkpoint-args`` does not restore."""
    flags = [f"--norm-epsilon {cfg.norm_epsilon!r}"]
    if cfg.rope.scaling == "llama3":
        flags.append("--use-rope-scaling")
    flags.append(f"--make-vocab-size-divisible-by {cfg.make_vocab_size_divisible_by}")
    # Our local-spec weights lack Transformer Engine's _extra_state entries (FP8 metadata, no
    # weights); with the default 'assume_ok_unexpected' Megatron-LM's TE model fails on them.
    flags.append("--dist-ckpt-strictness log_unexpected")
    if cfg.params_dtype == "bfloat16":
        flags.append("--bf16")
    elif cfg.params_dtype == "float16":
        flags.append("--fp16")
    return flags
