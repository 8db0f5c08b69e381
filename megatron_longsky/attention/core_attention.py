"""Core attention with context parallelism and packed (THD) sequences, without Transformer Engine.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward
signature, 0.16.1), placed at ``self_attention.submodules.core_attention`` of the local
layer spec. megatron-core's own local attention refuses CP > 1 and packed sequences;
this one supports both on any process group (gloo on CPU, NCCL on GPU):

* CP: the local Q (this rank's two zig-zag chunks) attends over K/V all-gathered from
  the CP group; the exact causal mask comes from the global positions of the chunks.
* Packed: ``packed_seq_params.cu_seqlens_q(_padded)`` over the unsharded row confine
  attention to each document (at CP > 1 each document is zig-zag split on its own).
* Long sequences: :mod:`blockwise` online softmax over K/V blocks; no s x s mask or
  score matrix exists. A short sequence (at most ``DENSE_MAX_TOKENS``, CP=1, unpacked) goes
  to one ``scaled_dot_product_attention`` call with its [S, S] mask.

Shapes follow megatron: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn];
THD (packed): q [t, np, hn], k/v [t, ng, hn] -> [t, np*hn].
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor

from megatron_longsky.attention import context_parallel as cp_utils
from megatron_longsky.attention import packed as packed_utils
from megatron_longsky.attention.blockwise import blockwise_attention, dense_attention

log = logging.getLogger(__name__)

# Measured on CPU (benchmarks/RESULTS.md): at 8K tokens 256 is fastest with the smallest
# per-block buffers (4096: 6x slower, 10x the memory); on packed rows 256 is as fast as 512
# or faster (benchmarks/blockwise_blocks.py).
DEFAULT_BLOCK_SIZE = 256
# The longest unpacked CP=1 sequence attended in one SDPA call (one [S, S] mask and score
# matrix) rather than blockwise: a separate limit from the block size, which is tuned for
# the blockwise path (benchmarks/dense_threshold.py, forward + backward: at 384-512 tokens one
# call is 1.3-2.0x faster than 256-row blocks; they break even at 1024-2048, where the [S, S]
# scores of a micro-batch of 4 already take 64-256 MiB).
DENSE_MAX_TOKENS = 512
_logged_cp_settings: set = set()

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class LongSkyCoreAttention(MegatronModule):
    """Context-parallel, packed-sequence-aware core attention (see the module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, dense_max_tokens: int = DENSE_MAX_TOKENS):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = getattr(pg_collection, "cp", None)
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = max(1, config.num_query_groups // tp_size)
        self.head_dim = config.kv_channels
        self.block_size = int(block_size)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.dense_max_tokens = int(dense_max_tokens)
        if self.dense_max_tokens < 0:
            raise ValueError(f"dense_max_tokens must be >= 0, got {dense_max_tokens}")
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        if config.apply_query_key_layer_scaling:
            scale /= self.layer_number
        self.softmax_scale = scale
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: LongSkyCoreAttention implements no attention "
                             "dropout (long-context recipes train without it); set it to 0")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by LongSkyCoreAttention")
        self.cp_size = 1 if self.cp_group is None else self.cp_group.size()
        self.cp_rank = 0 if self.cp_group is None else self.cp_group.rank()
        _log_cp_choice(self.cp_size, cp_comm_type or config.cp_comm_type)

    # ------------------------------------------------------------------ masks
    def _causal(self, attn_mask_type) -> bool:
        kind = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if kind in (AttnMaskType.causal, AttnMaskType.padding_causal):
            return True
        if kind in (AttnMaskType.no_mask, AttnMaskType.padding):
            return False
        raise ValueError(f"attn_mask_type={kind} is not supported by LongSkyCoreAttention")

    def _positions(self, sq: int, sk: int, device, packed_seq_params):
        """(q_pos, k_pos, q_seg, k_seg) for this rank's queries and the (gathered) keys."""
        cp = self.cp_size
        if packed_seq_params is None:
            if cp == 1:  # queries are the last sq of sk positions (sq < sk with a KV cache)
                return torch.arange(sk - sq, sk, device=device), torch.arange(sk, device=device), None, None
            q_pos = cp_utils.zigzag_positions(sq * cp, cp, self.cp_rank, device)
            return q_pos, cp_utils.gathered_positions(sk // cp, cp, device), None, None
        # Every layer sees the same packed_seq_params: compute the positions once per batch.
        key = (sq, cp, self.cp_rank, str(device))
        cached = getattr(packed_seq_params, "_longsky_positions", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is None:
            cu_kv = packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu and not torch.equal(cu.cpu(), cu_kv.cpu()):
            raise ValueError("LongSkyCoreAttention supports self-attention only: cu_seqlens_q != cu_seqlens_kv")
        cu = cu.to(device)
        packed_utils.validate_cu_seqlens(cu, sq * cp, cp, where="packed_seq_params.cu_seqlens")
        q_pos, q_seg = packed_utils.positions_and_segments(cu, cp, self.cp_rank)
        k_pos, k_seg = packed_utils.gathered_positions_and_segments(cu, cp)
        packed_seq_params._longsky_positions = (key, (q_pos, k_pos, q_seg, k_seg))
        return q_pos, k_pos, q_seg, k_seg

    # ---------------------------------------------------------------- forward
    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias: Optional[Tensor] = None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by LongSkyCoreAttention")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise ValueError(f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: only 'thd' is supported")
        if thd:  # [t, h, d] -> [t, 1, h, d]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        causal = self._causal(attn_mask_type)
        sq, b = query.shape[0], query.shape[1]

        if self.cp_size > 1:
            key = cp_utils.all_gather_sequence(key, self.cp_group)
            value = cp_utils.all_gather_sequence(value, self.cp_group)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))

        if attention_mask is not None:
            if self.cp_size > 1 or thd:
                raise ValueError("LongSkyCoreAttention builds masks from positions under context parallelism "
                                 "and packing: pass attention_mask=None (use packed_seq_params for documents)")
            out = self._masked_dense(q, k, v, attention_mask, causal)
        else:
            q_pos, k_pos, q_seg, k_seg = self._positions(sq, k.shape[2], query.device, packed_seq_params)
            # A short sequence with no CP chunks or documents for blocks to follow: one SDPA call.
            short = q.shape[2] <= self.dense_max_tokens and k.shape[2] <= self.dense_max_tokens
            if short and self.cp_size == 1 and packed_seq_params is None:
                out = dense_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, scale=self.softmax_scale, causal=causal)
            else:
                out = blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, scale=self.softmax_scale,
                                          causal=causal, block_q=self.block_size, block_k=self.block_size)
        # [b, h, s, d] -> [s, b, h*d]
        out = out.permute(2, 0, 1, 3).reshape(sq, b, -1)
        return out.squeeze(1) if thd else out

    def _masked_dense(self, q, k, v, attention_mask: Tensor, causal: bool) -> Tensor:
        """A caller-supplied mask (megatron convention: True = hidden), CP=1 unpacked only."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        allowed = ~attention_mask.bool()
        if causal:
            sq, sk = q.shape[2], k.shape[2]
            allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)


def _log_cp_choice(cp_size: int, cp_comm_type) -> None:
    """Say once per setting (not once per layer) which CP implementation runs."""
    key = (cp_size, str(cp_comm_type))
    if cp_size > 1 and key not in _logged_cp_settings:
        _logged_cp_settings.add(key)
        log.info("context parallelism CP=%d: LongSkyCoreAttention all-gathers K/V over the CP group "
                 "(cp_comm_type=%s applies to Transformer Engine only)", cp_size, cp_comm_type)
