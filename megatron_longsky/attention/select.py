"""Which core attention runs: Transformer Engine's on GPU, ours everywhere else (logged).

With TE (GPU) the TE layer spec already holds ``TEDotProductAttention``; megatron-core
passes it ``cp_comm_type`` (p2p / a2a / all_gather / a2a+p2p) from the TransformerConfig
and THD packed sequences go to TE's fused kernels. Without TE the local spec's
``DotProductAttention`` (which refuses CP > 1 and packed rows) is replaced by
:class:`LongSkyCoreAttention`, whose CP always all-gathers K/V.
"""

from __future__ import annotations

import functools

from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE, LongSkyCoreAttention


def install_core_attention(spec, block_size: int = DEFAULT_BLOCK_SIZE):
    """Put :class:`LongSkyCoreAttention` into a local GPT layer spec (in place; returned)."""
    submodules = spec.submodules.self_attention.submodules
    if block_size == DEFAULT_BLOCK_SIZE:
        submodules.core_attention = LongSkyCoreAttention
    else:
        submodules.core_attention = functools.partial(LongSkyCoreAttention, block_size=block_size)
    return spec
