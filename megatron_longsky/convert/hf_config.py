"""Hugging Face ``config.json`` (Llama family) <-> our :class:`ModelConfig`.

Reads both spellings of the RoPE settings: ``rope_theta`` + ``rope_scaling`` (transformers
4.x, most published checkpoints) and ``rope_parameters`` (transformers 5.x). Writes both,
with the same values, so any transformers version loads the export with the RoPE base and
scaling of the trained model. Anything we cannot represent exactly is an error, never
silently dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from megatron_longsky.model.config import ModelConfig, RopeConfig
from megatron_longsky.errors import UserError

# Architectures with the LlamaForCausalLM tensor layout (Skywork-13B ships custom code
# with the same layout and names).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "SkyworkForCausalLM")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConversionError(UserError, ValueError):
    """Input that cannot be converted; the message names the file and the field."""


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} not found: not a Hugging Face model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: the top level must be an object")
    return data


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The cos/sin scale megatron-core's YaRN applies (its 'concentration factor')."""
    return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)


def _rope_from_hf(hf: dict, where: str) -> RopeConfig:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"{where}: rope_parameters / rope_scaling must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{where}: per-layer-type RoPE parameters are not supported")
    params = dict(params)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {list(_SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor != 1 is not supported")
    original = int(params.get("original_max_position_embeddings")
                   or hf.get("original_max_position_embeddings")
                   or hf.get("max_position_embeddings") or 4096)
    if rope_type == "default":
        return RopeConfig(base=float(theta), original_max_position_embeddings=original)
    factor = params.get("factor")
    if factor is None:
        raise ConversionError(f"{where}: rope scaling {rope_type!r} needs a 'factor'")
    rope = dict(base=float(theta), scaling=rope_type, factor=float(factor),
                original_max_position_embeddings=original)
    if rope_type == "llama3":
        rope.update(low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    if rope_type == "yarn":
        if params.get("truncate", True) is not True:
            raise ConversionError(f"{where}: YaRN with truncate=false is not supported")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        # transformers uses mscale / mscale_all_dim only when both are set (non-zero).
        if not (mscale and mscale_all_dim):
            mscale, mscale_all_dim = 1.0, 0.0
        rope.update(beta_fast=float(params.get("beta_fast") or 32.0),
                    beta_slow=float(params.get("beta_slow") or 1.0),
                    mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
        cfg = RopeConfig(**rope)
        given = params.get("attention_factor")
        if given is not None and not math.isclose(float(given), yarn_attention_factor(cfg), rel_tol=1e-6):
            raise ConversionError(
                f"{where}: YaRN attention_factor {given} differs from the one implied by factor/mscale "
                f"({yarn_attention_factor(cfg):.6g}); megatron-core cannot represent it"
            )
        return cfg
    return RopeConfig(**rope)


def model_config_from_hf(hf: dict, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a Llama-family ``config.json`` (vocab_size is the HF one, unpadded)."""
    try:
        return _model_config_from_hf(hf, where, **overrides)
    except ConversionError:
        raise
    except KeyError as exc:
        raise ConversionError(f"{where}: missing key {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type or out of range
        raise ConversionError(f"{where}: {exc}") from None


def _model_config_from_hf(hf: dict, where: str, **overrides: Any) -> ModelConfig:
    archs = hf.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConversionError(
            f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConversionError(f"{where}: missing field(s) {missing}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not supported (Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported (Llama has no biases)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ConversionError(f"{where}: head_dim {head_dim} * num_attention_heads {heads} != hidden_size {hidden}")
    kv = int(hf.get("num_key_value_heads") or heads)
    max_pos = hf.get("max_position_embeddings")
    rope = _rope_from_hf(hf, where)
    fields = dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv,
        ffn_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        seq_length=int(rope.original_max_position_embeddings if rope.scaling != "none" else (max_pos or 4096)),
        max_position_embeddings=int(max_pos) if max_pos else None,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=rope,
        params_dtype="float32",
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc


def _rope_to_hf(rope: RopeConfig) -> Optional[dict]:
    if rope.scaling == "none":
        return None
    out: dict[str, Any] = {"rope_type": rope.scaling, "factor": rope.factor}
    if rope.scaling == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.scaling == "yarn":
        # attention_factor is written explicitly: transformers and megatron-core derive it
        # from mscale/mscale_all_dim under different rules.
        out.update(original_max_position_embeddings=rope.original_max_position_embeddings,
                   beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                   attention_factor=yarn_attention_factor(rope), truncate=True)
        if rope.mscale and rope.mscale_all_dim:  # the one case where both sides agree on them
            out.update(mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim)
    return out


def hf_config_from_model(cfg: ModelConfig, vocab_size: int, base: Optional[dict] = None,
                         torch_dtype: str = "float32") -> dict:
    """A ``config.json`` for LlamaForCausalLM. ``base`` (the imported model's original
    config) supplies fields we do not model (token ids, ...); ours win on every field we do."""
    out = {k: v for k, v in (base or {}).items()
           if k not in ("auto_map", "rope_scaling", "rope_parameters", "rope_theta", "dtype", "torch_dtype")}
    rope_scaling = _rope_to_hf(cfg.rope)
    # The longest context the model was configured or trained for.
    max_pos = max(cfg.max_position_embeddings or 0, cfg.seq_length)
    if cfg.rope.scaling != "none":
        max_pos = max(max_pos, int(cfg.rope.original_max_position_embeddings * cfg.rope.factor))
    out.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_groups,
        head_dim=cfg.head_dim,
        vocab_size=int(vocab_size),
        max_position_embeddings=int(max_pos),
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope.base,
        rope_scaling=rope_scaling,
        # transformers >= 5 reads this; older versions ignore it.
        rope_parameters={"rope_theta": cfg.rope.base, "rope_type": cfg.rope.scaling
                         if cfg.rope.scaling != "none" else "default", **(rope_scaling or {})},
        torch_dtype=torch_dtype,
    )
    return out
