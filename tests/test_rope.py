"""RoPE options reach the model and do what they say.

Each option is set on ModelConfig, the GPTModel is built, and its rotary embedding is
checked against (a) an independent few-line rotate-half RoPE and (b) transformers' own
RoPE initialisers (linear / llama3 / yarn), then at positions past the original context
against what the scaling promises. Logits parity with transformers for these settings
is in test_convert.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_longsky.model import build_model, model_config_from_dict
from megatron_longsky.runtime.distributed import ParallelConfig

HEAD_DIM = 16
ORIGINAL = 64
SEQ = 4 * ORIGINAL


@pytest.fixture(scope="module")
def runtime():
    from megatron_longsky.convert.session import single_process_runtime

    with single_process_runtime():
        yield


def rotary(rope: dict, seq: int = SEQ):
    """(angles [seq, head_dim/2], cos/sin scale) of the model built with this RoPE config."""
    cfg = model_config_from_dict({"preset": "tiny", "hidden_size": 4 * HEAD_DIM, "num_attention_heads": 4,
                                  "vocab_size": 128, "rope": rope})
    model = build_model(cfg, ParallelConfig(), 128, pre_process=True, post_process=True, initialize=False)
    out = model.rotary_pos_emb(seq)
    emb, scale = out if isinstance(out, tuple) else (out, 1.0)
    emb = emb.reshape(seq, HEAD_DIM)
    assert torch.equal(emb[:, : HEAD_DIM // 2], emb[:, HEAD_DIM // 2:])  # rotate-half layout
    return emb[:, : HEAD_DIM // 2].double(), scale, model


def hf_inv_freq(rope_parameters: dict):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=SEQ,
                      rope_parameters=rope_parameters)
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    return inv_freq.double(), factor


def positions(seq: int = SEQ) -> torch.Tensor:
    return torch.arange(seq, dtype=torch.float64)


def reference_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Independent rotate-half RoPE: x [seq, heads, dim] -> rotated."""
    dim = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.outer(positions(x.shape[0]), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_raised_base_matches_independent_rope(runtime):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    angles, _, model = rotary({"base": 500000.0})
    base_angles, _, _ = rotary({"base": 10000.0})
    assert not torch.allclose(angles, base_angles)
    x = torch.randn(SEQ, 1, 3, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    ours = apply_rotary_pos_emb(x, model.rotary_pos_emb(SEQ), config=model.config)
    ref = reference_rope(x[:, 0].double(), 500000.0)
    torch.testing.assert_close(ours[:, 0].double(), ref, rtol=1e-4, atol=1e-4)


def test_linear_interpolation_matches_transformers_and_divides_positions(runtime):
    angles, _, _ = rotary({"base": 10000.0, "scaling": "linear", "factor": 4.0})
    inv, _ = hf_inv_freq({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    torch.testing.assert_close(angles, torch.outer(positions(), inv), rtol=1e-5, atol=1e-4)
    plain, _, _ = rotary({"base": 10000.0})
    # Position 4p with factor 4 is exactly position p without scaling, also past 4x the context.
    torch.testing.assert_close(angles[::4], plain[: SEQ // 4], rtol=1e-5, atol=1e-4)


def test_llama3_scaling_matches_transformers_by_frequency_band(runtime):
    rope = {"base": 500000.0, "scaling": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    angles, _, _ = rotary(rope)
    inv, _ = hf_inv_freq({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": ORIGINAL, "rope_theta": 500000.0})
    torch.testing.assert_close(angles, torch.outer(positions(), inv), rtol=1e-5, atol=1e-4)
    plain, _, _ = rotary({"base": 500000.0})
    wavelen = 2 * math.pi / (plain[1])  # angle at position 1 is the inverse frequency
    high = wavelen < ORIGINAL / 4.0  # short wavelengths: untouched
    low = wavelen > ORIGINAL / 1.0  # long wavelengths: interpolated by the factor
    assert high.any() and low.any()
    torch.testing.assert_close(angles[:, high], plain[:, high])
    torch.testing.assert_close(angles[:, low], plain[:, low] / 8.0, rtol=1e-5, atol=1e-6)


def test_yarn_matches_transformers_including_attention_factor(runtime):
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    rope = {"base": 10000.0, "scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    angles, scale, model = rotary(rope)
    inv, hf_factor = hf_inv_freq({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": ORIGINAL})
    torch.testing.assert_close(angles, torch.outer(positions(), inv), rtol=1e-5, atol=1e-4)
    assert scale == pytest.approx(hf_factor) and scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # Attention applies the same factor to q and k.
    assert _yarn_get_concentration_factor_from_config(model.config) == pytest.approx(hf_factor)
    plain, _, _ = rotary({"base": 10000.0})
    # Fastest dims extrapolate (unchanged), slowest are interpolated by the factor.
    torch.testing.assert_close(angles[:, 0], plain[:, 0])
    torch.testing.assert_close(angles[:, -1], plain[:, -1] / 4.0, rtol=1e-5, atol=1e-6)


def test_rope_config_rejects_bad_values():
    from megatron_longsky.config import ConfigError

    with pytest.raises(ConfigError, match="rope.base must be > 0"):
        model_config_from_dict({"rope": {"base": 0}})
    with pytest.raises(ConfigError, match="not one of"):
        model_config_from_dict({"rope": {"scaling": "ntk-by-parts"}})
