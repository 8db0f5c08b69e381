"""Megatron-LM's checkpoint save and load, redone with the megatron-core calls it makes.

Megatron-LM's training package cannot be imported here (it needs CUDA and triton), so
these helpers mirror, line for line where it matters, Megatron-LM core_v0.16.1:

- ``megatron_lm_args``: what ``parse_args`` + ``validate_args`` leave in ``args`` for a
  Llama-style GPT run (megatron/training/arguments.py; TransformerConfig fields via
  argument_utils.ArgumentGroupFactory, e.g. ``--norm-epsilon`` -> ``layernorm_epsilon``).
- ``vocab_size_with_padding``: tokenizer/tokenizer.py ``_vocab_size_with_padding``.
- ``build_gpt``: arguments.py ``core_transformer_config_from_args`` + gpt_builders.py
  ``gpt_builder`` with the local layer spec (``--transformer-impl local``).
- ``save``: checkpointing.py ``save_checkpoint`` / ``generate_state_dict`` for
  ``--ckpt-format torch_dist``: the model under 'model', ``content_metadata`` from
  ``_build_sharded_state_dict_metadata`` (``singleton_local_shards=False``), common.pt
  with args, checkpoint_version 3.0, iteration, opt_param_scheduler, the RNG state as
  ShardedObjects (``get_rng_state``), then the tracker file. ``te_extra_state=True`` adds the
  ``_extra_state`` ShardedObjects Transformer Engine modules contribute (transformer/utils.py
  ``make_sharded_object_for_checkpoint``), as a TE-built Megatron-LM model saves them.
- ``load_args_from_checkpoint`` / ``load``: checkpointing.py ``load_args_from_checkpoint``
  (``--use-checkpoint-args``) and ``load_checkpoint`` with ``--finetune --no-load-optim
  --no-load-rng`` (``_load_global_dist_base_checkpoint``: ``dist_checkpointing.load(...,
  strict=args.dist_ckpt_strictness)``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex

import torch

RESTORED_FORCED = {  # checkpointing.py 1389-1477: _set_arg(name, force=True)
    "num_query_groups", "group_query_attention", "position_embedding_type", "add_position_embedding",
    "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear",
    "add_qkv_bias", "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
    "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout", "num_experts",
    "tokenizer_model", "tokenizer_type",
}
RESTORED_IF_UNSET = {  # _set_arg(name): only when the command line left it None
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "kv_channels",
    "max_position_embeddings", "padded_vocab_size", "ckpt_format",
}


def vocab_size_with_padding(orig_vocab_size: int, args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(orig_vocab_size / multiple) * multiple)


def command_line_defaults() -> dict:
    """Megatron-LM's defaults for the model arguments (arguments.py / TransformerConfig)."""
    from megatron.core.transformer.enums import AttnBackend

    return dict(
        num_layers=None, hidden_size=None, ffn_hidden_size=None, seq_length=None, num_attention_heads=None,
        num_query_groups=1, group_query_attention=False, kv_channels=None, max_position_embeddings=None,
        position_embedding_type="learned_absolute", add_position_embedding=True,
        use_rotary_position_embeddings=False, rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, rope_scaling_factor=8.0,
        add_bias_linear=True, add_qkv_bias=False, squared_relu=False, quick_geglu=False, swiglu=False,
        untie_embeddings_and_output_weights=False, layernorm_zero_centered_gamma=False, normalization="LayerNorm",
        layernorm_epsilon=1e-5, apply_query_key_layer_scaling=False, attention_dropout=0.1, hidden_dropout=0.1,
        num_experts=None, qk_layernorm=False, qk_l2_norm=False, multi_latent_attention=False,
        experimental_attention_variant=None, mtp_num_layers=None, softmax_type="vanilla", softmax_scale=None,
        window_size=None, no_rope_freq=None, spec=None, use_legacy_models=False, is_hybrid_model=False,
        hybrid_override_pattern=None, heterogeneous_layers_config_path=None,
        heterogeneous_layers_config_encoded_json=None, apply_residual_connection_post_layernorm=False,
        make_vocab_size_divisible_by=128, padded_vocab_size=None, init_method_std=0.02, bf16=False, fp16=False,
        params_dtype=torch.float32, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        ckpt_format="torch_dist", transformer_impl="transformer_engine", attention_backend=AttnBackend.auto,
        tokenizer_type=None, tokenizer_model=None, dist_ckpt_strictness="assume_ok_unexpected",
        use_tokenizer_model_from_checkpoint_args=True,
    )


def megatron_lm_args(vocab: int, **flags) -> argparse.Namespace:
    """``args`` as a Megatron-LM GPT run saves them: defaults, the given flags, then what
    validate_args and build_tokenizer derive (kv_channels, padded_vocab_size)."""
    values = {**command_line_defaults(), **flags}
    args = argparse.Namespace(**values)
    if args.kv_channels is None:  # arguments.py validate_args
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.padded_vocab_size is None:  # tokenizer.py build_tokenizer
        args.padded_vocab_size = vocab_size_with_padding(vocab, args)
    return args


def load_args_from_checkpoint(args: argparse.Namespace, checkpoint_args: argparse.Namespace) -> argparse.Namespace:
    """checkpointing.py load_args_from_checkpoint, model and tokenizer part."""
    if hasattr(checkpoint_args, "disable_bias_linear"):
        checkpoint_args.add_bias_linear = not checkpoint_args.disable_bias_linear
    for name in RESTORED_FORCED | RESTORED_IF_UNSET:
        if name not in RESTORED_FORCED and getattr(args, name, None) is not None:
            continue
        value = getattr(checkpoint_args, name, None)
        if value is not None:
            setattr(args, name, value)
    return args


def apply_flags(args: argparse.Namespace, flag_text: str) -> argparse.Namespace:
    """The flags of a ``megatron_lm_flags.txt`` that set model arguments, as Megatron-LM parses them."""
    words = shlex.split(flag_text)
    i = 0
    while i < len(words):
        word = words[i]
        takes = {"--norm-epsilon": ("layernorm_epsilon", float),
                 "--make-vocab-size-divisible-by": ("make_vocab_size_divisible_by", int),
                 "--dist-ckpt-strictness": ("dist_ckpt_strictness", str),
                 "--load": ("load", str)}
        switches = {"--use-rope-scaling": "use_rope_scaling", "--bf16": "bf16", "--fp16": "fp16",
                    "--use-checkpoint-args": "use_checkpoint_args", "--finetune": "finetune",
                    "--no-load-optim": "no_load_optim", "--no-load-rng": "no_load_rng"}
        if word in takes:
            name, kind = takes[word]
            setattr(args, name, kind(words[i + 1]))
            i += 2
        elif word in switches:
            setattr(args, switches[word], True)
            i += 1
        else:
            raise AssertionError(f"unknown Megatron-LM flag in the flag file: {word}")
    return args


def build_gpt(args, pre_process: bool = True, post_process: bool = True):
    """core_transformer_config_from_args + gpt_builder (local spec), on CPU."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels,
        layernorm_epsilon=args.layernorm_epsilon, normalization=args.normalization,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        params_dtype=args.params_dtype, pipeline_dtype=args.params_dtype, bf16=args.bf16, fp16=args.fp16,
        rotary_interleaved=args.rotary_interleaved, use_cpu_initialization=True,
        # CPU: the fused kernels are GPU only.
        masked_softmax_fusion=False, bias_activation_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )
    if args.swiglu:
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    kw["num_query_groups"] = args.num_query_groups if args.group_query_attention else None
    config = TransformerConfig(**kw)
    spec = get_gpt_layer_local_spec(args.num_experts, False, args.qk_layernorm, args.multi_latent_attention,
                                    normalization=args.normalization)
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
    )


TE_MODULES = ("self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
              "mlp.linear_fc1", "mlp.linear_fc2")


def add_te_extra_state(model_sd: dict, model) -> None:
    """The ``_extra_state`` entries TE's modules add to a layer's sharded state dict
    (transformer/utils.py make_sharded_tensors_for_checkpoint -> make_sharded_object_for_checkpoint,
    with the layer's offset in the stacked layers)."""
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    decoder = model.decoder
    total = model.config.num_layers
    for local, layer in enumerate(decoder.layers):
        offset = layer.layer_number - 1  # global layer index (layer_number is 1-based)
        for module in TE_MODULES:
            key = f"decoder.layers.{module}._extra_state"
            model_sd[f"decoder.layers.{local}.{module}._extra_state"] = make_sharded_object_for_checkpoint(
                torch.empty(0, dtype=torch.uint8), key, ((0, offset, total),))
    if getattr(decoder, "final_layernorm", None) is not None:  # TENorm on the last stage
        key = "decoder.final_layernorm._extra_state"
        model_sd[key] = make_sharded_object_for_checkpoint(torch.empty(0, dtype=torch.uint8), key)


def rng_state_objects():
    """checkpointing.py get_rng_state for torch_dist: one ShardedObject per (PP, TP) rank."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": {}}
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    return ShardedObject("rng_state", [state], (ps.get_pipeline_model_parallel_world_size(),
                                                ps.get_tensor_model_parallel_world_size()), (pp, tp),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def save(model, args, save_dir: str, iteration: int, te_extra_state: bool = True) -> None:
    """checkpointing.py save_checkpoint (torch_dist): generate_state_dict, dist_checkpointing.save
    with content_metadata, barrier, then rank 0 writes the tracker."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    # _build_sharded_state_dict_metadata (no distributed optimizer in these runs)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    checkpoint_name = os.path.join(save_dir, f"iter_{iteration:07d}")  # get_checkpoint_name
    model_sd = model.sharded_state_dict(metadata=metadata)
    if te_extra_state:
        add_te_extra_state(model_sd, model)
    state_dict = {
        "args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd,
        # an optimizer entry as a stand-in for the optimizer's sharded state (not a weight)
        "optimizer": {"state": {"exp_avg": _optimizer_like(model_sd)}},
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration * 8, "decay_style": "cosine"},
        "rng_state": [rng_state_objects()],
        "num_floating_point_operations_so_far": 1.5e12,
    }
    if torch.distributed.get_rank() == 0:
        os.makedirs(checkpoint_name, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state_dict, checkpoint_name,
                            content_metadata=_clean_metadata_for_serialization(metadata))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


def _optimizer_like(model_sd: dict) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for name, value in model_sd.items():
        if isinstance(value, ShardedTensor) and name.endswith("final_layernorm.weight"):
            out[name] = ShardedTensor.from_rank_offsets(
                f"optimizer.state.exp_avg.{value.key}", torch.zeros_like(value.data),
                replica_id=value.replica_id)
    return out


def load(model, args, load_dir: str, te_extra_state: bool = False):
    """checkpointing.py load_checkpoint with --finetune --no-load-optim --no-load-rng (torch_dist)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:  # read_metadata
        iteration = int(f.read().strip())
    checkpoint_name = os.path.join(load_dir, f"iter_{iteration:07d}")
    common = dist_checkpointing.load_common_state_dict(checkpoint_name)  # _load_base_checkpoint(rank0=True)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)
    model_sd = model.sharded_state_dict(metadata=metadata)
    if te_extra_state:
        add_te_extra_state(model_sd, model)
    # generate_state_dict(args, model, None, None, None, ...): no optimizer, no RNG (finetune)
    sharded_state_dict = {"args": args, "checkpoint_version": 3.0, "model": model_sd}
    state_dict = dist_checkpointing.load(sharded_state_dict, checkpoint_name, strict=args.dist_ckpt_strictness)
    assert state_dict["checkpoint_version"] == 3.0  # set_checkpoint_version; fix_query_key_value_ordering no-op
    model_state = {k: v for k, v in state_dict["model"].items() if not k.endswith("_extra_state")}
    try:  # load_model_state_dict: strict first, then the fallback for missing TE extra state
        model.load_state_dict(model_state, strict=True)
    except RuntimeError:
        result = model.load_state_dict(model_state, strict=False)
        assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result
    return common
