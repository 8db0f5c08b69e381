"""The model: presets, the TE/local layer-spec seam, layout-invariant initialisation."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_longsky.config import ConfigError
from megatron_longsky.model import model_config_from_dict, preset
from megatron_longsky.model.spec import resolve_impl
from megatron_longsky.testing.multiprocess import run_distributed


def test_skywork_13b_preset_matches_its_config_json():
    cfg = model_config_from_dict({"preset": "skywork-13b"})
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_groups) == (52, 4608, 36, 36)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.norm_epsilon) == (12288, 65519, 1e-6)
    assert (cfg.rope.base, cfg.rope.scaling, cfg.seq_length) == (10000.0, "none", 4096)
    assert cfg.head_dim == 128 and not cfg.tie_embeddings


def test_llama3_presets():
    cfg = model_config_from_dict({"preset": "llama3-8b"})
    assert (cfg.num_layers, cfg.hidden_size, cfg.kv_groups, cfg.ffn_hidden_size) == (32, 4096, 8, 14336)
    assert (cfg.vocab_size, cfg.rope.base, cfg.rope.scaling, cfg.seq_length) == (128256, 500000.0, "none", 8192)
    cfg = model_config_from_dict({"preset": "llama3.1-8b", "rope": {"factor": 16.0}})
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("llama3", 16.0, 8192)
    assert cfg.rope.base == 500000.0  # preset keys survive a partial rope override
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config_from_dict({"preset": "llama9"})
    with pytest.raises(ConfigError, match="num_query_groups"):
        model_config_from_dict({**preset("tiny"), "num_query_groups": 3})


def test_auto_picks_local_layers_on_cpu_and_logs_it(caplog):
    from megatron_longsky.model.spec import layer_spec

    cfg = model_config_from_dict({"preset": "tiny"})
    assert resolve_impl(cfg) == "local"
    with caplog.at_level(logging.INFO, logger="megatron_longsky.model.spec"):
        layer_spec(cfg)
    assert "local modules (no Transformer Engine)" in caplog.text


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"transformer_impl": "transformer_engine"}, "Transformer Engine with CUDA is not available"),
        ({"fp8": "hybrid"}, "fp8='hybrid' requires Transformer Engine"),
        ({"fp8": "e4m3", "transformer_impl": "local"}, "requires Transformer Engine"),
    ],
)
def test_te_and_fp8_requests_fail_clearly_without_te(overrides, message):
    from megatron_longsky.model import build_model, transformer_config
    from megatron_longsky.runtime.distributed import ParallelConfig

    cfg = model_config_from_dict({"preset": "tiny", **overrides})
    with pytest.raises(RuntimeError, match=message):
        transformer_config(cfg, ParallelConfig())
    with pytest.raises(RuntimeError, match=message):
        build_model(cfg, ParallelConfig(), vocab_size=128, pre_process=True, post_process=True)


def _init_at_layouts(jobs):
    from megatron_longsky.model import build_model, model_config_from_dict
    from _megatron_forward import current_layout, full_logits, full_weights, switch_layout

    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    layout = None
    for tp, pp, tied, seed in jobs:
        if (tp, pp) != layout:
            layout = (tp, pp)
            switch_layout(tp, pp, seed=100 + tp + 10 * pp)  # the global seed must not matter
        cfg = model_config_from_dict({"preset": "tiny", "vocab_size": 256, "tie_embeddings": tied,
                                      "init_method_std": 0.2})
        model = build_model(cfg, current_layout(), 256, seed=seed).eval()
        logits = full_logits(model, tokens)
        out[(tp, pp, tied, seed)] = {"weights": full_weights(model), "logits": logits}
    return out


@pytest.mark.slow
def test_same_seed_same_full_weights_and_logits_at_any_layout():
    layouts = [(1, 1), (2, 1), (1, 2)]
    jobs = [(tp, pp, tied, 7) for tp, pp in layouts for tied in (False, True)]
    jobs += [(1, 1, False, 8), (1, 1, True, 8)]
    jobs.sort(key=lambda j: (j[0], j[1]))
    ranks = run_distributed(_init_at_layouts, 2, jobs)
    merged = {}
    for result in ranks:
        for key, value in result.items():
            entry = merged.setdefault(key, {"weights": {}, "logits": None})
            entry["weights"].update(value["weights"])
            if value["logits"] is not None:
                entry["logits"] = value["logits"]
    for tied in (False, True):
        ref = merged[(1, 1, tied, 7)]
        names = set(ref["weights"])
        assert ("output_layer.weight" in names) is (not tied)
        assert any(n.startswith("decoder.layers.1.") for n in names)
        for tp, pp in layouts[1:]:
            other = merged[(tp, pp, tied, 7)]
            assert set(other["weights"]) == names, (tp, pp)
            for name in names:
                assert torch.equal(other["weights"][name], ref["weights"][name]), (tp, pp, tied, name)
            torch.testing.assert_close(other["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        # A different seed gives different weights; the statistics are megatron-core's.
        other_seed = merged[(1, 1, tied, 8)]["weights"]
        assert not torch.equal(other_seed["decoder.layers.0.mlp.linear_fc1.weight"],
                               ref["weights"]["decoder.layers.0.mlp.linear_fc1.weight"])
        w = ref["weights"]
        assert w["embedding.word_embeddings.weight"].std().item() == pytest.approx(0.2, rel=0.05)
        assert w["decoder.layers.0.self_attention.linear_proj.weight"].std().item() == pytest.approx(
            0.2 / 2.0, rel=0.1)  # std / sqrt(2 * num_layers), num_layers = 2
        assert torch.equal(w["decoder.final_layernorm.weight"], torch.ones(64))


def _embedding_std_weights(_):
    from megatron_longsky.model import build_model, model_config_from_dict
    from _megatron_forward import current_layout, full_weights, switch_layout

    switch_layout(1, 1, seed=0)
    out = {}
    for embedding_std in (None, 1.0):
        cfg = model_config_from_dict({"preset": "tiny", "vocab_size": 256, "init_method_std": 0.02,
                                      "embedding_init_std": embedding_std})
        out[embedding_std] = full_weights(build_model(cfg, current_layout(), 256, seed=3))
    return out


def test_embedding_init_std_sets_the_word_embedding_alone():
    (weights,) = run_distributed(_embedding_std_weights, 1, None)
    default, wide = weights[None], weights[1.0]
    assert default["embedding.word_embeddings.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert wide["embedding.word_embeddings.weight"].std().item() == pytest.approx(1.0, rel=0.05)
    for name in default:  # every other tensor is drawn exactly as without it
        if name != "embedding.word_embeddings.weight":
            assert torch.equal(default[name], wide[name]), name
    with pytest.raises((ValueError, ConfigError), match="embedding_init_std"):
        model_config_from_dict({"preset": "tiny", "embedding_init_std": 0.0})
