"""RoPE frequency set-up beyond what GPTModel's constructor exposes.

megatron-core's llama3 scaling hard-codes low/high frequency factors 1 and 4 and an
original context of 8192; we recompute the inverse frequencies from our config so the
model matches Hugging Face's ``rope_scaling`` exactly for any values.
"""

from __future__ import annotations

import math

import torch

from megatron_longsky.model.config import RopeConfig


def base_inv_freq(dim: int, base: float) -> torch.Tensor:
    # Explicitly on CPU: also correct when the model is built under torch.device("meta").
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))


def llama3_inv_freq(dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = base_inv_freq(dim, rope.base)
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope_config(model, rope: RopeConfig) -> None:
    """Set inverse frequencies on the model's rotary embedding for llama3 scaling."""
    if rope.scaling != "llama3":
        return
    emb = getattr(model, "rotary_pos_emb", None)
    if emb is None:
        return
    dim = emb.inv_freq.numel() * 2
    emb.inv_freq = llama3_inv_freq(dim, rope).to(emb.inv_freq.device)
