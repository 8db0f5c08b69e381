"""Which core attention runs: Transformer Engine's on GPU, ours everywhere else (logged).

With TE (GPU) the TE layer spec already holds ``TEDotProductAttention``; megatron-core
passes it ``cp_comm_type`` (p2p / a2a / all_gather / a2a+p2p) from the TransformerConfig
and THD packed sequences go to TE's fused kernels. Without TE the local spec's
``DotProductAttention`` (which refuses CP > 1 and packed rows) is replaced by
:class:`LongSkyCoreAttention`, whose CP always all-gathers K/V.
"""

from __future__ import annotations

import functools
import logging

from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE, LongSkyCoreAttention

log = logging.getLogger(__name__)


def describe_core_attention(impl: str, cp_size: int = 1, cp_comm_type: str | None = None) -> str:
    """Log and return the attention used for layer implementation ``impl``."""
    if impl == "transformer_engine":
        choice = "TEDotProductAttention"
        log.info("core attention: Transformer Engine (CP=%d, cp_comm_type=%s)", cp_size, cp_comm_type)
    else:
        choice = "LongSkyCoreAttention"
        comm = f", cp_comm_type={cp_comm_type} ignored: K/V all-gather is used" if cp_size > 1 else ""
        log.info("core attention: LongSkyCoreAttention (no Transformer Engine; CP=%d%s)", cp_size, comm)
    return choice


def install_core_attention(spec, block_size: int = DEFAULT_BLOCK_SIZE):
    """Put :class:`LongSkyCoreAttention` into a local GPT layer spec (in place; returned)."""
    submodules = spec.submodules.self_attention.submodules
    if block_size == DEFAULT_BLOCK_SIZE:
        submodules.core_attention = LongSkyCoreAttention
    else:
        submodules.core_attention = functools.partial(LongSkyCoreAttention, block_size=block_size)
    return spec
