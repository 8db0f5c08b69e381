"""Property-based fuzzing of what a user types (issue 22): for any generated YAML config,
``key=value`` override or Hugging Face ``config.json``, a command either accepts it or
refuses it with exit status 2 and one line naming the culprit, never a traceback. In
process and with few examples, so it stays fast; the fixed cases of ``tests/cli_fuzz.py``
stay as regression."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_longsky.cli import main as longsky

_FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

# Keys a user could write (real ones, near misses, nested paths) and values of every YAML kind.
_KEYS = st.sampled_from([
    "seed", "train_iters", "micro_batch_size", "global_batch_size", "eval_interval", "output_dir",
    "optimizer.lr", "optimizer.min_lr", "optimizer.clip_grad", "optimizer.adam_beta1", "schedule.warmup_iters",
    "schedule.decay_style", "model.num_layers", "model.hidden_size", "model.rope", "model.rope.base",
    "model.rope.scaling", "model.preset", "model.seq_length", "model.fp8", "model.vocab_size",
    "parallel.tensor_model_parallel_size", "data.weights", "data.split", "data.prefixes", "data.kind",
    "logging.level", "logging.log_interval", "checkpoint.save_interval", "tokenizer.type", "trian_iters",
    "model.rope.nope", "model", "optimizer",
])
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["1e-3", "3e-3", ".nan", "-.inf", "off", "yes", "[0]", "[1, 2]",
                                           "{base: 1}", "[", "{", "tiny", "llama3", "!!python/none", "0x10"]),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=6)


def _render(value) -> str:
    """A value as a user would type it after ``key=`` (YAML flow style, or the raw string)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _judge(rc: int, err: str, culprits: list[str]) -> None:
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert any(c and c in lines[0] for c in culprits), (culprits, lines[0])


@_FAST
@given(st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=3))
def test_any_override_is_accepted_or_one_line_naming_it(capsys, pairs):
    overrides = [f"{key}={_render(value)}" for key, value in pairs]
    rc = longsky(["train", "--print-config", "data.prefixes=[x]", *overrides])
    err = capsys.readouterr().err
    # The culprit: a key (its last part, or a parent) or the value given for it.
    culprits = [part for key, _ in pairs for part in key.split(".")] + [_render(v) for _, v in pairs] + [
        "seed", "batch", "lr", "train_iters", "tensor_model_parallel_size", "hidden_size", "num_attention_heads",
        "seq_length", "vocab", "weights", "split", "rope", "eval_interval", "preset", "fp8", "tokenizer"]
    _judge(rc, err, culprits)


@_FAST
@given(st.dictionaries(_KEYS.map(lambda k: k.split(".")[0]), _VALUES, max_size=4))
def test_any_yaml_config_is_accepted_or_one_line_naming_the_file(tmp_path_factory, capsys, data):
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"prefixes": ["x"]}, **data}))
    rc = longsky(["train", "--print-config", "--config", str(path)])
    _judge(rc, capsys.readouterr().err, [str(path), "job.yaml"])


@_FAST
@given(st.text(max_size=200))
def test_any_yaml_text_is_accepted_or_one_line_naming_the_file(tmp_path_factory, capsys, text):
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(text, encoding="utf-8")
    rc = longsky(["train", "--print-config", "--config", str(path), "data.prefixes=[x]"])
    _judge(rc, capsys.readouterr().err, [str(path), "job.yaml", "data", "config"])


_HF_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 384}
_HF_KEYS = st.sampled_from(list(_HF_BASE) + [
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "rms_norm_eps", "head_dim", "hidden_act", "attention_bias", "partial_rotary_factor"])
_ROPE = st.dictionaries(st.sampled_from(["type", "rope_type", "factor", "rope_theta", "low_freq_factor",
                                         "original_max_position_embeddings", "beta_fast", "attention_factor"]),
                        st.one_of(_SCALARS, st.sampled_from(["linear", "llama3", "yarn", "dynamic", "default"])),
                        max_size=4)


@_FAST
@given(st.dictionaries(_HF_KEYS, st.one_of(_VALUES, _ROPE), max_size=4))
def test_any_hf_config_is_read_or_refused_naming_the_field(changes):
    from megatron_longsky.convert.hf_config import ConversionError, model_config_from_hf

    hf = {**_HF_BASE, **changes}
    try:
        cfg = model_config_from_hf(hf, where="hf/config.json")
    except ConversionError as exc:
        message = str(exc)
        assert message.startswith("hf/config.json: ") and "\n" not in message
        return
    # Accepted: the values are the ones written, of the right types (a string never became a bool).
    written = hf.get("tie_word_embeddings")
    assert cfg.tie_embeddings is (False if written is None else written)
    assert cfg.hidden_size == hf["hidden_size"] and math.isfinite(cfg.rope.base)


def test_the_property_judge_catches_a_traceback():
    with pytest.raises(AssertionError):
        _judge(1, "Traceback (most recent call last):\n  boom", ["x"])
    with pytest.raises(AssertionError):
        _judge(2, "first\nsecond", ["first"])
    with pytest.raises(AssertionError):
        _judge(2, "an error naming nothing given", ["seed"])
    _judge(2, "longsky train: error: seed=-1 must be in [0, 2**32)", ["seed"])
