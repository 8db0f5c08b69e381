"""Which transformer layer implementation runs: Transformer Engine or megatron-core local.

The choice is made at run time and logged. FP8 needs Transformer Engine: asking for it
without TE (e.g. on CPU) is an error, never a silent no-op.
"""

from __future__ import annotations

import logging

from megatron_longsky.model.config import ModelConfig

log = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    from megatron_longsky.runtime.device import use_cuda

    if not use_cuda():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve_impl(cfg: ModelConfig) -> str:
    """'transformer_engine' or 'local', validating the request against this machine."""
    have_te = transformer_engine_available()
    impl = cfg.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if have_te else "local"
    if impl == "transformer_engine" and not have_te:
        raise RuntimeError(
            "transformer_impl=transformer_engine was requested but Transformer Engine with CUDA "
            "is not available on this machine (use transformer_impl=local or auto)"
        )
    if cfg.fp8 and impl != "transformer_engine":
        raise RuntimeError(
            f"fp8={cfg.fp8!r} requires Transformer Engine on a CUDA device; this run uses the "
            "local megatron-core layers (no TE): unset model.fp8 or run on an H100 with TE"
        )
    return impl


def layer_spec(cfg: ModelConfig):
    """The GPT layer spec for this config and machine."""
    impl = resolve_impl(cfg)
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        log.info("layer spec: Transformer Engine (fp8=%s, recipe=%s) [GPU path, untested on CPU CI]",
                 cfg.fp8, cfg.fp8_recipe)
        return get_gpt_layer_with_transformer_engine_spec()
    log.info("layer spec: megatron-core local modules (no Transformer Engine), LongSkyCoreAttention "
             "for context parallelism and packed sequences, LongSkyRMSNorm")
    return local_layer_spec()


def local_layer_spec():
    """megatron-core's local GPT layer spec with our core attention and our RMSNorm.

    megatron-core's local spec puts ``WrappedTorchNorm`` in for RMSNorm
    (models/backends.py, ``LocalSpecProvider.layer_norm``), which asserts no sequence
    parallelism and no ``persist_layer_norm`` (transformer/torch_norm.py);
    :class:`~megatron_longsky.model.norm.LongSkyRMSNorm` computes the same and supports
    sequence parallelism. The plan dry-run builds its meta model from this same spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longsky.attention.select import install_core_attention
    from megatron_longsky.model.norm import LongSkyRMSNorm

    spec = install_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = LongSkyRMSNorm
    spec.submodules.pre_mlp_layernorm = LongSkyRMSNorm
    return spec


def decoder_spec(cfg: ModelConfig, tcfg):
    """What GPTModel gets as ``transformer_layer_spec`` for this stage.

    TE: the TE layer spec (megatron-core adds TE's final norm). Local: the layers plus a
    final norm of the same implementation as the layers' norms. Given a bare layer spec,
    megatron-core picks the final norm by what is importable (TE's norm as soon as TE
    imports), so a local-spec model would hold a TE module, with its ``_extra_state`` on GPU
    machines and none on CPU ones, and could not run on CPU where TE is installed.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = layer_spec(cfg)
    if resolve_impl(cfg) == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tcfg),
                                      layer_norm=spec.submodules.input_layernorm)
