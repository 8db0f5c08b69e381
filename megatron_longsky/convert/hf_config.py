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


_MISSING = object()


def _field(hf: dict, key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    """``hf[key]`` of JSON type ``kind`` (int, float or bool), else ``default``; a value of
    another type is an error naming the field: ``"false"`` is not false, ``"32"`` not 32."""
    value = hf.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ConversionError(f"{where}: missing field {key!r}")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a finite number"}[kind]
        raise ConversionError(f"{where}: {key} must be {expected}, got {value!r}")
    return float(value) if kind is float else value


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The cos/sin scale megatron-core's YaRN applies (its 'concentration factor')."""
    return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)


def _rope_params(hf: dict, where: str) -> dict:
    """The RoPE settings of ``rope_parameters`` and/or ``rope_scaling``: when a config has
    both (and ``rope_theta``), they must agree, or which one transformers uses depends on
    its version; types are normalised (``type`` -> ``rope_type``)."""
    found = {}
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConversionError(f"{where}: {key} must be an object, got {params!r}")
        if any(isinstance(v, dict) for v in params.values()):
            raise ConversionError(f"{where}: per-layer-type RoPE parameters are not supported")
        params = dict(params)
        if "type" in params:
            kind = params.pop("type")
            if params.setdefault("rope_type", kind) != kind:
                raise ConversionError(f"{where}: {key} has type {kind!r} and rope_type {params['rope_type']!r}")
        found[key] = params
    if "rope_theta" in hf:
        found["top level"] = {"rope_theta": hf["rope_theta"]}
    merged: dict = {}
    source: dict = {}
    for key, params in found.items():
        for name, value in params.items():
            if name in merged and merged[name] != value:
                raise ConversionError(f"{where}: {source[name]} says {name}={merged[name]!r} but {key} says "
                                      f"{value!r}; the RoPE settings contradict each other")
            merged.setdefault(name, value)
            source.setdefault(name, name if key == "top level" else f"{key}.{name}")
    if len(found) > 1 and found.get("rope_parameters") is not None and found.get("rope_scaling") is not None:
        a, b = found["rope_parameters"], found["rope_scaling"]
        if a.get("rope_type", "default") != b.get("rope_type", "default"):
            raise ConversionError(f"{where}: rope_parameters (rope_type {a.get('rope_type', 'default')!r}) and "
                                  f"rope_scaling (rope_type {b.get('rope_type', 'default')!r}) contradict each other")
    return merged


def _rope_from_hf(hf: dict, where: str) -> RopeConfig:
    params = _rope_params(hf, where)
    theta = _field(params, "rope_theta", float, where, 10000.0)
    rope_type = params.get("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {list(_SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor != 1 is not supported")
    original = (_field(params, "original_max_position_embeddings", int, where, None)
                or _field(hf, "original_max_position_embeddings", int, where, None)
                or _field(hf, "max_position_embeddings", int, where, None) or 4096)
    if rope_type == "default":
        extra = sorted(set(params) & {"factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                      "attention_factor", "mscale", "mscale_all_dim"})
        if extra:
            raise ConversionError(f"{where}: RoPE scaling fields {extra} are given without a scaling rope_type "
                                  f"(rope_type is 'default'); which scaling is meant?")
        return RopeConfig(base=theta, original_max_position_embeddings=original)
    if "factor" not in params:
        raise ConversionError(f"{where}: rope scaling {rope_type!r} needs a 'factor'")
    factor = _field(params, "factor", float, where)
    rope = dict(base=theta, scaling=rope_type, factor=factor, original_max_position_embeddings=original)
    if rope_type == "llama3":
        rope.update(low_freq_factor=_field(params, "low_freq_factor", float, where, 1.0),
                    high_freq_factor=_field(params, "high_freq_factor", float, where, 4.0))
    if rope_type == "yarn":
        if params.get("truncate", True) is not True:
            raise ConversionError(f"{where}: YaRN with truncate=false is not supported")
        mscale = _field(params, "mscale", float, where, None)
        mscale_all_dim = _field(params, "mscale_all_dim", float, where, None)
        # transformers uses mscale / mscale_all_dim only when both are set (non-zero).
        if not (mscale and mscale_all_dim):
            mscale, mscale_all_dim = 1.0, 0.0
        rope.update(beta_fast=_field(params, "beta_fast", float, where, None) or 32.0,
                    beta_slow=_field(params, "beta_slow", float, where, None) or 1.0,
                    mscale=mscale, mscale_all_dim=mscale_all_dim)
        cfg = RopeConfig(**rope)
        given = _field(params, "attention_factor", float, where, None)
        if given is not None and not math.isclose(given, yarn_attention_factor(cfg), rel_tol=1e-6):
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
    heads = _field(hf, "num_attention_heads", int, where)
    hidden = _field(hf, "hidden_size", int, where)
    head_dim = _field(hf, "head_dim", int, where, None)
    if head_dim is not None and head_dim * heads != hidden:
        raise ConversionError(f"{where}: head_dim {head_dim} * num_attention_heads {heads} != hidden_size {hidden}")
    kv = _field(hf, "num_key_value_heads", int, where, None) or heads
    max_pos = _field(hf, "max_position_embeddings", int, where, None)
    rope = _rope_from_hf(hf, where)
    fields = dict(
        num_layers=_field(hf, "num_hidden_layers", int, where),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv,
        ffn_hidden_size=_field(hf, "intermediate_size", int, where),
        vocab_size=_field(hf, "vocab_size", int, where),
        seq_length=int(rope.original_max_position_embeddings if rope.scaling != "none" else (max_pos or 4096)),
        max_position_embeddings=max_pos or None,
        norm_epsilon=_field(hf, "rms_norm_eps", float, where, 1e-6),
        tie_embeddings=_field(hf, "tie_word_embeddings", bool, where, False),
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
