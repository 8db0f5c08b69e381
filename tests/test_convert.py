"""HF <-> megatron conversion: logits parity with transformers at TP=1, TP=2, PP=2;
exact round trips; RoPE fields kept; clear errors.

Tiny random ``LlamaForCausalLM`` models (no hub). Weights use a large init (std 0.2) so
attention is far from uniform and a wrong RoPE or head layout changes the logits.
Tokens run to position 47, past each model's original context of 16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longsky.testing.multiprocess import run_distributed

SEQ = 48
ORIGINAL_CTX = 16
VOCAB = 100

CASES = {
    # name: (LlamaConfig overrides, import TP)
    "mha_untied_theta": (dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=50000.0), 1),
    "gqa_tied_linear": (
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
             rope_scaling={"rope_type": "linear", "factor": 4.0}), 2),
    "gqa_untied_llama3": (
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX}), 2),
    # MQA imported at TP=2 > 1 KV group: megatron-core all-gathers QKV and each rank keeps its group.
    "mqa_untied_tp2": (dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0), 2),
    "gqa_tied_yarn": (
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=20000.0,
             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX}), 1),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
RESAVED = "gqa_untied_llama3"  # also re-saved by the TP=2 and PP=2 ranks, then exported


def make_hf_model(out_dir: Path, seed: int = 0, shards: bool = False, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=ORIGINAL_CTX, initializer_range=0.2,
                  rms_norm_eps=1e-5)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # random norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out_dir, max_shard_size="40KB" if shards else "5GB")
    return model


def make_tokenizer(out_dir: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))


def _logits_at_layouts(cases, layouts, resave_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_longsky.checkpoint import save_model_weights
    from _megatron_forward import full_logits, load_checkpoint_model, switch_layout

    results = {}
    for tp, pp in layouts:
        switch_layout(tp, pp)
        for name, root, tokens in cases:
            model = load_checkpoint_model(root)
            logits = full_logits(model, tokens)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                results[(name, tp, pp)] = logits
            if name == RESAVED and (tp, pp) != (1, 1):
                # A checkpoint genuinely written by TP=2 / PP=2 ranks, for the export test.
                target = Path(resave_dir) / f"tp{tp}pp{pp}"
                src = Path(root) / "iter_0000000"
                if dist.get_rank() == 0:
                    (target / "iter_0000000").mkdir(parents=True)
                    for f in ("config.yaml", "hf_config.json"):
                        shutil.copy(src / f, target / "iter_0000000" / f)
                    (target / "latest").write_text("iter_0000000\n")
                dist.barrier()
                save_model_weights(model, target / "iter_0000000")
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_longsky.convert import import_checkpoint

    root = tmp_path_factory.mktemp("convert")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    out = {"root": root, "tokens": tokens, "hf": {}, "ckpt": {}, "hf_logits": {}}
    for i, (name, (overrides, tp)) in enumerate(CASES.items()):
        hf_dir = root / f"hf_{name}"
        model = make_hf_model(hf_dir, seed=i, shards=(name == "gqa_untied_llama3"), **overrides)
        if name == "mha_untied_theta":
            make_tokenizer(hf_dir, 60)
        with torch.no_grad():
            out["hf_logits"][name] = model(tokens).logits.float()
        out["hf"][name] = model
        if name == "mha_untied_theta":  # one import through the command line
            from megatron_longsky.cli import main

            assert main(["convert", "import", "--hf-dir", str(hf_dir), "--output", str(root / f"ckpt_{name}"),
                         "--tp", str(tp)]) == 0
            out["ckpt"][name] = root / f"ckpt_{name}"
        else:
            out["ckpt"][name] = import_checkpoint(hf_dir, root / f"ckpt_{name}", tp=tp, pp=1)
    cases = [(name, str(path), tokens) for name, path in out["ckpt"].items()]
    ranks = run_distributed(_logits_at_layouts, 2, cases, LAYOUTS, str(root / "resaved"))
    out["megatron_logits"] = {k: v for r in ranks for k, v in r.items()}
    return out


@pytest.mark.slow
def test_hf_rope_settings_matter_for_these_models(converted):
    """Guard: the parity test below could fail if RoPE were converted wrongly."""
    model = converted["hf"]["gqa_untied_llama3"]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**model.config.to_dict(), "rope_scaling": None, "rope_parameters": None,
                         "rope_theta": 500000.0})
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = (plain(converted["tokens"]).logits - converted["hf_logits"]["gqa_untied_llama3"]).abs().max()
    assert diff > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}pp{l[1]}")
@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(converted, name, layout):
    ours = converted["megatron_logits"][(name, *layout)][:, :, :VOCAB]
    ref = converted["hf_logits"][name]
    assert ours.shape == ref.shape
    # Beyond the original context too (positions 16..47).
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[:, ORIGINAL_CTX:], ref[:, ORIGINAL_CTX:], rtol=1e-4, atol=1e-4)


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _rope_fields(config) -> dict:
    params = dict(config.rope_parameters)
    return {k: v for k, v in params.items() if k not in ("attention_factor", "truncate", "beta_fast", "beta_slow")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_reproduces_every_tensor_and_rope(converted, name, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_longsky.convert import export_checkpoint

    out = export_checkpoint(converted["ckpt"][name], tmp_path / "hf")
    original = converted["hf"][name]
    expected = {k: v for k, v in original.state_dict().items()
                if not (original.config.tie_word_embeddings and k == "lm_head.weight")}
    exported = _hf_tensors(out)
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert _rope_fields(reloaded.config) == _rope_fields(original.config)
    assert reloaded.config.tie_word_embeddings == original.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded(converted["tokens"]).logits, converted["hf_logits"][name])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(exported)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_export_of_checkpoint_written_at_other_layouts(converted, layout, tmp_path):
    from megatron_longsky.convert import export_checkpoint

    out = export_checkpoint(converted["root"] / "resaved" / layout, tmp_path / "hf")
    exported = _hf_tensors(out)
    expected = converted["hf"][RESAVED].state_dict()
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_imported_config_vocab_padding_and_tokenizer(converted):
    from megatron_longsky.checkpoint import read_checkpoint_config
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer

    it = converted["ckpt"]["gqa_untied_llama3"] / "iter_0000000"
    conf = yaml.safe_load((it / "config.yaml").read_text())
    assert conf["parallel"]["tensor_model_parallel_size"] == 2
    assert conf["model"]["vocab_size"] == 128  # 100 padded to a multiple of 128, at any TP
    assert conf["model"]["num_query_groups"] == 2 and conf["model"]["tie_embeddings"] is False
    assert conf["model"]["rope"]["scaling"] == "llama3" and conf["model"]["rope"]["base"] == 500000.0
    assert (converted["root"] / "ckpt_gqa_untied_llama3" / "latest").read_text().strip() == "iter_0000000"
    assert "tokenizer" not in conf
    mha = converted["ckpt"]["mha_untied_theta"] / "iter_0000000"
    conf = yaml.safe_load((mha / "config.yaml").read_text())
    assert conf["model"]["vocab_size"] == 128 and conf["model"]["num_query_groups"] is None
    # Relative to the checkpoint, so that it can be moved or copied.
    assert conf["tokenizer"] == {"type": "hf", "model": "tokenizer"}
    tok = build_tokenizer(TokenizerConfig(**read_checkpoint_config(mha)["tokenizer"]))
    assert tok.vocab_size == 60 and tok.eod_id == 1


@pytest.mark.slow
def test_export_ships_tokenizer(converted, tmp_path):
    import shutil

    from megatron_longsky.convert import export_checkpoint

    out = export_checkpoint(converted["ckpt"]["mha_untied_theta"], tmp_path / "hf")
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    # A moved copy still finds its own tokenizer (the original's tokenizer files are gone).
    moved = tmp_path / "moved"
    shutil.copytree(converted["ckpt"]["mha_untied_theta"], moved)
    original_tokenizer = converted["ckpt"]["mha_untied_theta"] / "iter_0000000" / "tokenizer"
    hidden = tmp_path / "hidden_tokenizer"
    original_tokenizer.rename(hidden)
    try:
        again = export_checkpoint(moved, tmp_path / "hf_moved")
    finally:
        hidden.rename(original_tokenizer)
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_cli_import_refuses_tp_megatron_cannot_split(converted, tmp_path, capsys):
    from megatron_longsky.cli import main

    hf_dir = converted["root"] / "hf_gqa_tied_linear"
    rc = main(["convert", "import", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "c"), "--tp", "8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "TP=8 does not divide the 4 attention heads" in err
    assert not (tmp_path / "c").exists()


def _copy_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (dict(intermediate_size=128), "mlp.gate_proj.weight' has shape"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_parameters=None), "rope type 'dynamic'"),
        (dict(vocab_size=50), "the tokenizer has 60 tokens"),
    ],
    ids=["architecture", "shape", "rope", "tokenizer"],
)
def test_import_errors_are_clear(converted, tmp_path, changes, message):
    from megatron_longsky.convert import import_checkpoint
    from megatron_longsky.convert.hf_config import ConversionError

    hf_dir = _copy_config(converted["root"] / "hf_mha_untied_theta", tmp_path / "hf", **changes)
    with pytest.raises(ConversionError, match=message):
        import_checkpoint(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no leftovers


@pytest.mark.slow
def test_pickle_weights_refused_unless_allowed(converted, tmp_path):
    from megatron_longsky.convert import import_checkpoint
    from megatron_longsky.convert.hf_config import ConversionError

    hf_dir = _copy_config(converted["root"] / "hf_mha_untied_theta", tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    torch.save(converted["hf"]["mha_untied_theta"].state_dict(), hf_dir / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="--allow-pickle"):
        import_checkpoint(hf_dir, tmp_path / "ckpt")
    root = import_checkpoint(hf_dir, tmp_path / "ckpt", allow_pickle=True)
    assert (root / "iter_0000000" / "model").is_dir()


@pytest.mark.slow
def test_existing_output_is_not_overwritten(converted, tmp_path):
    from megatron_longsky.convert import import_checkpoint
    from megatron_longsky.utils.output_paths import OutputExistsError

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        import_checkpoint(converted["root"] / "hf_mha_untied_theta", tmp_path / "ckpt")


@pytest.mark.slow
def test_export_of_a_megatron_trained_checkpoint_matches_in_transformers(tmp_path):
    """A checkpoint with no HF origin (our init, byte tokenizer, vocab padded by the
    trainer's rule, llama3 RoPE): exported, loaded by transformers, same logits."""
    from transformers import LlamaForCausalLM

    from _megatron_forward import full_logits
    from megatron_longsky.checkpoint import iteration_dir, save_model_weights, write_latest
    from megatron_longsky.config import to_dict
    from megatron_longsky.convert import export_checkpoint
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.model import build_model, model_config_from_dict
    from megatron_longsky.runtime.distributed import ParallelConfig

    cfg = model_config_from_dict({"preset": "tiny", "init_method_std": 0.2, "vocab_size": 384,
                                  "rope": {"base": 50000.0, "scaling": "llama3", "factor": 4.0,
                                           "original_max_position_embeddings": ORIGINAL_CTX}})
    tokens = torch.randint(0, 259, (1, SEQ), generator=torch.Generator().manual_seed(1))
    ckpt = iteration_dir(tmp_path / "run", 20)
    with single_process_runtime():
        model = build_model(cfg, ParallelConfig(), 384, pre_process=True, post_process=True, seed=3).eval()
        ours = full_logits(model, tokens)[:, :, :259]
        save_model_weights(model, ckpt)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(
        {"model": to_dict(cfg), "tokenizer": {"type": "byte", "model": None},
         "parallel": {"tensor_model_parallel_size": 1}}))
    write_latest(tmp_path / "run", 20)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["vocab_size"] == 259 and conf["eos_token_id"] == 257 and conf["bos_token_id"] == 256
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


LLAMA31_8B_CONFIG = {  # Meta-Llama-3.1-8B config.json (transformers 4.x spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_reads_transformers4_config_and_matches_presets():
    from megatron_longsky.convert.hf_config import hf_config_from_model, model_config_from_hf
    from megatron_longsky.model import model_config_from_dict

    ours = model_config_from_hf(LLAMA31_8B_CONFIG)
    ref = model_config_from_dict({"preset": "llama3.1-8b"})
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "vocab_size", "norm_epsilon", "tie_embeddings", "rope"):
        assert getattr(ours, field) == getattr(ref, field), field
    skywork = {**LLAMA31_8B_CONFIG, "architectures": ["SkyworkForCausalLM"], "model_type": "skywork",
               "hidden_size": 4608, "intermediate_size": 12288, "num_attention_heads": 36,
               "num_key_value_heads": 36, "num_hidden_layers": 52, "vocab_size": 65519, "rms_norm_eps": 1e-6,
               "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096}
    ours = model_config_from_hf(skywork)
    ref = model_config_from_dict({"preset": "skywork-13b"})
    for field in ("num_layers", "hidden_size", "num_attention_heads", "kv_groups", "ffn_hidden_size",
                  "vocab_size", "norm_epsilon", "seq_length", "rope"):
        assert getattr(ours, field) == getattr(ref, field), field
    # Legacy {"type": "linear"} spelling, and back out in both spellings.
    legacy = {**LLAMA31_8B_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6}
    cfg = model_config_from_hf(legacy)
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.base) == ("linear", 2.0, 1e6)
    out = hf_config_from_model(cfg, 128256, base=legacy)
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and out["rope_theta"] == 1e6
    assert out["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert out["bos_token_id"] == 128000 and out["architectures"] == ["LlamaForCausalLM"]


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 3), head_dim=st.sampled_from([2, 4]),
       tp=st.sampled_from([1, 2, 4]), ffn=st.sampled_from([4, 8]))
def test_mapping_round_trips_and_tp_shards_whole_kv_groups(groups, per_group, head_dim, tp, ffn):
    from megatron_longsky.convert.mapping import layer_to_hf, layer_to_megatron, tp_shard
    from megatron_longsky.model.config import ModelConfig

    heads = groups * per_group
    cfg = ModelConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                      num_query_groups=groups, ffn_hidden_size=ffn)
    h, d = cfg.hidden_size, head_dim
    gen = torch.Generator().manual_seed(groups * 100 + per_group * 10 + head_dim)
    hf = {"input_layernorm.weight": torch.randn(h, generator=gen),
          "post_attention_layernorm.weight": torch.randn(h, generator=gen),
          "self_attn.q_proj.weight": torch.randn(heads * d, h, generator=gen),
          "self_attn.k_proj.weight": torch.randn(groups * d, h, generator=gen),
          "self_attn.v_proj.weight": torch.randn(groups * d, h, generator=gen),
          "self_attn.o_proj.weight": torch.randn(h, heads * d, generator=gen),
          "mlp.gate_proj.weight": torch.randn(ffn, h, generator=gen),
          "mlp.up_proj.weight": torch.randn(ffn, h, generator=gen),
          "mlp.down_proj.weight": torch.randn(h, ffn, generator=gen)}
    meg = layer_to_megatron(hf, cfg)
    back = layer_to_hf(meg, cfg)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    if groups % tp:
        return
    q, k, v = hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"]
    for rank in range(tp):
        # Rank r's QKV shard holds exactly its own KV groups and their query heads, in order.
        shard = tp_shard("linear_qkv.weight", meg["self_attention.linear_qkv.weight"], 0, rank, tp)
        g0, g1 = rank * groups // tp, (rank + 1) * groups // tp
        expected = []
        for g in range(g0, g1):
            expected += [q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        assert torch.equal(shard, torch.cat(expected))
        if ffn % tp == 0:
            fc1 = tp_shard("mlp.linear_fc1.weight", meg["mlp.linear_fc1.weight"], 0, rank, tp)
            rows = ffn // tp
            gate, up = hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]
            assert torch.equal(fc1, torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]]))


@pytest.mark.slow
def test_checkpoint_trained_by_longsky_train_exports_and_matches(tmp_path, monkeypatch):
    """`longsky train` (2 steps, llama3 RoPE, in this process) -> export -> transformers: same logits."""
    from transformers import LlamaForCausalLM

    from _megatron_forward import full_logits, load_checkpoint_model
    from _training_fixtures import tiny_config_dict, write_token_dataset
    from megatron_longsky.cli import main
    from megatron_longsky.convert import export_checkpoint
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.runtime import cpu_compat
    from megatron_longsky.testing.multiprocess import free_port

    prefix = write_token_dataset(tmp_path / "data", num_docs=16)
    cfg = tiny_config_dict(tmp_path, prefix, train_iters=2, output_dir=str(tmp_path / "run"),
                           model={"rope": {"base": 50000.0, "scaling": "llama3", "factor": 4.0,
                                           "original_max_position_embeddings": 16}})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    compat_was_active = cpu_compat.is_active()
    try:
        assert main(["train", "--config", str(tmp_path / "job.yaml")]) == 0
    finally:
        if not compat_was_active:
            cpu_compat.disable()
    ckpt_root = next(p.parent for p in (tmp_path / "run").rglob("latest"))
    tokens = torch.randint(0, 259, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with single_process_runtime():
        ours = full_logits(load_checkpoint_model(ckpt_root), tokens)[:, :, :259]
    out = export_checkpoint(ckpt_root, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.vocab_size == 259 and hf.config.rope_parameters["factor"] == 4.0
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(scaling=st.sampled_from(["none", "linear", "llama3", "yarn"]),
       base=st.sampled_from([10000.0, 500000.0, 1.0e7]), factor=st.sampled_from([2.0, 4.0, 8.0, 32.0]),
       original=st.sampled_from([2048, 4096, 8192]), mscales=st.sampled_from([(1.0, 0.0), (0.707, 0.707), (1.0, 1.0)]))
def test_rope_config_survives_hf_config_round_trip(scaling, base, factor, original, mscales):
    from megatron_longsky.convert.hf_config import hf_config_from_model, model_config_from_hf
    from megatron_longsky.model.config import ModelConfig, RopeConfig

    rope = dict(base=base, scaling=scaling, factor=factor, original_max_position_embeddings=original)
    if scaling == "llama3":
        rope.update(low_freq_factor=2.0, high_freq_factor=8.0)
    if scaling == "yarn":
        rope.update(beta_fast=16.0, beta_slow=2.0, mscale=mscales[0], mscale_all_dim=mscales[1])
    if scaling == "none":
        rope = dict(base=base, original_max_position_embeddings=original)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      vocab_size=300, seq_length=original, rope=RopeConfig(**rope))
    back = model_config_from_hf(json.loads(json.dumps(hf_config_from_model(cfg, 300))))
    if scaling == "linear":  # HF's linear scaling has no notion of the original context
        back.rope.original_max_position_embeddings = original
    assert back.rope == cfg.rope
    assert (back.num_layers, back.kv_groups, back.ffn_hidden_size, back.vocab_size) == (2, 2, 96, 300)
