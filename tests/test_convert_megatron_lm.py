"""Megatron-LM torch_dist checkpoints in and out (``longsky convert from-megatron-lm`` /
``to-megatron-lm``), on CPU with gloo.

Megatron-LM checkpoints are written by the megatron-core calls Megatron-LM's save makes
(tests/_megatron_lm.py names the Megatron-LM lines each step mirrors), from GPT models built
as its ``gpt_builder`` builds them, at TP=1 and at TP=2 x PP=2 (4 ranks); imported, their
logits match the Megatron-LM model's. Ours -> Megatron-LM -> ours is bitwise, and what
to-megatron-lm writes loads through Megatron-LM's load steps (``--use-checkpoint-args``
plus the flag file) into a model with our logits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from megatron_longsky.testing.multiprocess import run_distributed

VOCAB = 100
SEQ = 48
COMMON = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, seq_length=SEQ,
              max_position_embeddings=SEQ, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
              add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.2)
CASES = {
    # name: (TP, PP, Megatron-LM flags beyond COMMON)
    "tp1pp1_mha_tied": (1, 1, dict(rotary_base=50000, layernorm_epsilon=1e-6)),
    "tp2pp2_gqa_untied_llama3": (2, 2, dict(group_query_attention=True, num_query_groups=2,
                                            untie_embeddings_and_output_weights=True, use_rope_scaling=True,
                                            layernorm_epsilon=3e-5)),
}
ROUND_TRIP = "tp2pp2_gqa_untied_llama3"


def _write_megatron_lm(root: str, tokens: torch.Tensor, tokenizers: dict) -> dict:
    """4 ranks: for each case, build Megatron-LM's GPT at its layout, take its logits, save it."""
    from megatron.core import parallel_state as ps

    from _megatron_forward import full_logits, switch_layout
    from _megatron_lm import build_gpt, megatron_lm_args, save

    out = {}
    for i, (name, (tp, pp, flags)) in enumerate(CASES.items()):
        switch_layout(tp, pp)
        args = megatron_lm_args(VOCAB, **COMMON, **flags, tensor_model_parallel_size=tp,
                                pipeline_model_parallel_size=pp, tokenizer_type="HuggingFaceTokenizer",
                                tokenizer_model=tokenizers[name])
        torch.manual_seed(10 + i)  # the same master weights on every TP rank (CPU initialisation)
        model = build_gpt(args, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()).eval()
        with torch.no_grad():  # random norm weights (replicated: the same on each TP rank)
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    seed = zlib.crc32(f"{pname}/{ps.get_pipeline_model_parallel_rank()}".encode())
                    gen = torch.Generator().manual_seed(seed)
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        logits = full_logits(model, tokens)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            out[name] = logits
        save(model, args, str(Path(root) / name), iteration=1200 + i)
    return out


def _read(imported: dict, megatron_dirs: dict, tokens: torch.Tensor) -> dict:
    """1 rank: logits of our imported checkpoints, and of Megatron-LM's load of to-megatron-lm's output."""
    from megatron.core import dist_checkpointing

    from _megatron_forward import full_logits, load_checkpoint_model, switch_layout
    from _megatron_lm import apply_flags, build_gpt, command_line_defaults, load, load_args_from_checkpoint

    switch_layout(1, 1)
    out = {"ours": {}, "megatron_lm": {}, "errors": {}, "tensors": {}}
    for name, root in imported.items():
        out["ours"][name] = full_logits(load_checkpoint_model(root), tokens)
        out["tensors"][name] = dist_checkpointing.load_plain_tensors(str(Path(root) / "iter_0000000" / "model"))
    for name, directory in megatron_dirs.items():
        flags = (Path(directory) / "megatron_lm_flags.txt").read_text()
        iteration = int((Path(directory) / "latest_checkpointed_iteration.txt").read_text())
        saved = dist_checkpointing.load_common_state_dict(str(Path(directory) / f"iter_{iteration:07d}"))["args"]

        def megatron_args(with_flags=True, strictness=None):
            args = load_args_from_checkpoint(argparse.Namespace(**command_line_defaults()), saved)
            if with_flags:
                apply_flags(args, flags)
            if strictness:
                args.dist_ckpt_strictness = strictness
            return args

        args = megatron_args()
        assert args.load == str(Path(directory).resolve()) and args.finetune and args.use_checkpoint_args
        model = build_gpt(args).eval()
        load(model, args, directory, te_extra_state=True)  # a TE-built model asks for _extra_state too
        out["megatron_lm"][name] = full_logits(model, tokens)
        # Our own loader on a Megatron-LM dist checkpoint (its common.pt holds args, iteration, ...):
        # it used to merge those into the weights and fail with a KeyError.
        plain_it = Path(directory).parent / "plain" / "iter_0000000"
        plain_it.mkdir(parents=True)
        (plain_it / "model").symlink_to(Path(directory) / f"iter_{iteration:07d}")
        shutil.copy(Path(imported[name]) / "iter_0000000" / "config.yaml", plain_it / "config.yaml")
        out["megatron_lm"][name + "/our_loader"] = full_logits(load_checkpoint_model(plain_it), tokens)
        # Without the flag file: the epsilon and the llama3 switch fall back to Megatron-LM's defaults.
        plain = build_gpt(megatron_args(with_flags=False, strictness="log_unexpected")).eval()
        load(plain, megatron_args(with_flags=False, strictness="log_unexpected"), directory, te_extra_state=True)
        out["megatron_lm"][name + "/no_flags"] = full_logits(plain, tokens)
        try:  # Megatron-LM's default strictness with a TE model and our local-spec weights
            load(build_gpt(args).eval(), megatron_args(strictness="assume_ok_unexpected"), directory,
                 te_extra_state=True)
            out["errors"][name] = None
        except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
    return out




@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_longsky.cli import main

    root = tmp_path_factory.mktemp("mlm")
    from test_convert import make_tokenizer

    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    (root / "tok").mkdir()
    make_tokenizer(root / "tok", VOCAB)
    # One tokenizer path exists here (its files are copied in), one only on "the cluster".
    tokenizers = {"tp1pp1_mha_tied": str(root / "tok"), ROUND_TRIP: "/cluster/tokenizers/llama"}
    ranks = run_distributed(_write_megatron_lm, 4, str(root / "megatron_lm"), tokens, tokenizers)
    reference = {k: v for r in ranks for k, v in r.items()}
    ours = {}
    for name in CASES:
        ours[name] = root / f"ours_{name}"
        source = root / "megatron_lm" / name
        assert main(["convert", "from-megatron-lm", "--checkpoint", str(source), "--output", str(ours[name])]) == 0
    # ours -> Megatron-LM -> ours
    mlm = root / "mlm_again"
    assert main(["convert", "to-megatron-lm", "--checkpoint", str(ours[ROUND_TRIP]), "--output", str(mlm)]) == 0
    again = root / "ours_again"
    assert main(["convert", "from-megatron-lm", "--checkpoint", str(mlm), "--output", str(again)]) == 0
    from megatron_longsky.convert import export_checkpoint

    hf = export_checkpoint(ours["tp1pp1_mha_tied"], root / "hf")  # Megatron-LM -> ours -> HF
    read = run_distributed(_read, 1, {**{k: str(v) for k, v in ours.items()}, "again": str(again)},
                           {ROUND_TRIP: str(mlm)}, tokens)[0]
    return {"root": root, "reference": reference, "ours": ours, "mlm": mlm, "again": again, "read": read,
            "hf": hf, "tokens": tokens}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_match_megatron_lm_model(converted, name):
    ours = converted["read"]["ours"][name]
    ref = converted["reference"][name]
    assert ours.shape == ref.shape  # the padded vocabulary is kept (128 x TP)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # TP=2 x PP=2 sums in another order


@pytest.mark.slow
def test_imported_checkpoint_exports_to_hf_with_the_same_logits(converted):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted["hf"]).eval()
    assert model.config.vocab_size == VOCAB and model.config.rms_norm_eps == 1e-6
    with torch.no_grad():
        logits = model(converted["tokens"]).logits
    torch.testing.assert_close(logits, converted["reference"]["tp1pp1_mha_tied"][:, :, :VOCAB], rtol=1e-4, atol=1e-4)
    assert (converted["hf"] / "tokenizer.json").exists()  # copied in from the args' tokenizer_model


@pytest.mark.slow
def test_imported_config_keeps_megatron_lm_settings(converted):
    conf = yaml.safe_load((converted["ours"][ROUND_TRIP] / "iter_0000000" / "config.yaml").read_text())
    model = conf["model"]
    assert model["vocab_size"] == 256  # 100 padded to 128 x TP=2 by Megatron-LM, not our 128
    assert model["norm_epsilon"] == 3e-5 and model["num_query_groups"] == 2 and model["tie_embeddings"] is False
    assert model["rope"]["scaling"] == "llama3" and model["rope"]["factor"] == 8.0
    assert model["rope"]["original_max_position_embeddings"] == 8192
    assert conf["parallel"]["tensor_model_parallel_size"] == 2 and conf["parallel"]["pipeline_model_parallel_size"] == 2
    assert conf["tokenizer"] == {"type": "hf", "model": "/cluster/tokenizers/llama"}
    mha = yaml.safe_load((converted["ours"]["tp1pp1_mha_tied"] / "iter_0000000" / "config.yaml").read_text())
    assert mha["model"]["num_query_groups"] is None and mha["model"]["tie_embeddings"] is True
    assert mha["tokenizer"] == {"type": "hf", "model": "tokenizer"}  # copied, relative to the checkpoint
    assert mha["model"]["rope"] == {**mha["model"]["rope"], "base": 50000.0, "scaling": "none"}
    source = json.loads((converted["ours"][ROUND_TRIP] / "iter_0000000" / "megatron_lm_args.json").read_text())
    assert source["iteration"] == 1201 and source["args"]["attention_backend"].startswith("<AttnBackend")


@pytest.mark.slow
def test_round_trip_is_bitwise(converted):
    first, again = converted["read"]["tensors"][ROUND_TRIP], converted["read"]["tensors"]["again"]
    assert set(first) == set(again) and first
    for key, value in first.items():
        assert torch.equal(again[key], value), key
    conf = lambda p: yaml.safe_load((p / "iter_0000000" / "config.yaml").read_text())  # noqa: E731
    assert conf(converted["again"])["model"] == conf(converted["ours"][ROUND_TRIP])["model"]
    torch.testing.assert_close(converted["read"]["ours"]["again"], converted["reference"][ROUND_TRIP],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_megatron_lm_loads_the_export_with_the_flag_file(converted):
    read = converted["read"]
    ours = read["ours"][ROUND_TRIP]
    torch.testing.assert_close(read["megatron_lm"][ROUND_TRIP], ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(read["megatron_lm"][ROUND_TRIP + "/our_loader"], ours)
    # The traps: without the flags the model loads and is subtly wrong; without the strictness
    # flag a TE-built Megatron-LM model does not load our local-spec weights.
    assert (read["megatron_lm"][ROUND_TRIP + "/no_flags"] - ours).abs().max() > 1e-3
    assert read["errors"][ROUND_TRIP] is not None and "_extra_state" in read["errors"][ROUND_TRIP]
    mlm = converted["mlm"]
    assert (mlm / "latest_checkpointed_iteration.txt").read_text() == "0"
    flags = (mlm / "megatron_lm_flags.txt").read_text().splitlines()
    assert flags[:5] == [f"--load {mlm.resolve()}", "--use-checkpoint-args", "--finetune", "--no-load-optim",
                         "--no-load-rng"]
    assert set(flags[5:]) == {"--norm-epsilon 3e-05", "--use-rope-scaling", "--make-vocab-size-divisible-by 128",
                              "--dist-ckpt-strictness log_unexpected"}


@pytest.mark.slow
def test_export_common_pt_holds_what_megatron_lm_reads(converted):
    from megatron.core import dist_checkpointing

    from megatron_longsky.convert.megatron_lm_args import RESTORED_ARGS

    common = dist_checkpointing.load_common_state_dict(str(converted["mlm"] / "iter_0000000"))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert dist_checkpointing.load_content_metadata(preloaded_state_dict=common) == {
        "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    assert all(hasattr(args, name) for name in RESTORED_ARGS)
    assert args.padded_vocab_size == 256 and args.layernorm_epsilon == 3e-5 and args.use_rope_scaling
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model == "/cluster/tokenizers/llama"


# --------------------------------------------------------------------------------------
# Refusals (no model needed)

def _args(**overrides):
    from _megatron_lm import megatron_lm_args

    return megatron_lm_args(VOCAB, **{**COMMON, **overrides})


@pytest.mark.parametrize("override, arg", [
    (dict(add_bias_linear=True), "add_bias_linear"),
    (dict(add_qkv_bias=True), "add_qkv_bias"),
    (dict(num_experts=8), "num_experts"),
    (dict(qk_layernorm=True), "qk_layernorm"),
    (dict(kv_channels=32), "kv_channels"),
    (dict(position_embedding_type="learned_absolute"), "position_embedding_type"),
    (dict(normalization="LayerNorm"), "normalization"),
    (dict(swiglu=False), "swiglu"),
    (dict(rotary_percent=0.5), "rotary_percent"),
    (dict(multi_latent_attention=True), "multi_latent_attention"),
    (dict(rotary_interleaved=True), "rotary_interleaved"),
])
def test_import_refuses_what_we_cannot_represent(override, arg):
    from megatron_longsky.convert.hf_config import ConversionError
    from megatron_longsky.convert.megatron_lm_args import model_config_from_args

    model_config_from_args(_args(), "common.pt")  # the base args are accepted
    with pytest.raises(ConversionError, match=rf"^common.pt: args\.{arg}="):
        model_config_from_args(_args(**override), "common.pt")


def test_import_maps_epsilon_gqa_and_scaling_switch():
    from megatron_longsky.convert.megatron_lm_args import model_config_from_args

    cfg = model_config_from_args(_args(group_query_attention=True, num_query_groups=2, layernorm_epsilon=1e-6,
                                       use_rope_scaling=True, rope_scaling_factor=16.0, bf16=True,
                                       tensor_model_parallel_size=4), "c")
    assert cfg.num_query_groups == 2 and cfg.norm_epsilon == 1e-6 and cfg.params_dtype == "bfloat16"
    assert cfg.vocab_size == 512  # 128 x TP=4
    # gpt_builders.py passes use_rope_scaling but not rope_scaling_factor: the model ran with factor 8
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    assert model_config_from_args(_args(group_query_attention=False, num_query_groups=2), "c").num_query_groups is None
    older = _args()  # core_v0.15 and before: --norm-epsilon was stored as norm_epsilon
    del older.layernorm_epsilon
    older.norm_epsilon = 1e-6
    assert model_config_from_args(older, "c").norm_epsilon == 1e-6


def _write_common_only(directory: Path, args) -> None:
    """A Megatron-LM save's tracker, metadata.json and common.pt (no tensors: refused before loading)."""
    it = directory / "iter_0000007"
    it.mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text("7")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7}, it / "common.pt")


def test_cli_from_megatron_lm_refuses_in_one_line(tmp_path, capsys):
    from megatron_longsky.cli import main

    _write_common_only(tmp_path / "mlm", _args(qk_layernorm=True))
    rc = main(["convert", "from-megatron-lm", "--checkpoint", str(tmp_path / "mlm"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "args.qk_layernorm=True" in err and "iter_0000007/common.pt" in err
    assert not (tmp_path / "o").exists()


def test_cli_from_megatron_lm_refuses_unsafe_pickles(tmp_path, capsys):
    from megatron_longsky.cli import main

    _write_common_only(tmp_path / "mlm", _args(custom=_Custom()))
    rc = main(["convert", "from-megatron-lm", "--checkpoint", str(tmp_path / "mlm"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "_Custom" in err and "--allow-pickle" in err


class _Custom:
    pass


@pytest.mark.parametrize("rope, match", [
    (dict(scaling="yarn", factor=4.0), "scaling='yarn'"),
    (dict(scaling="linear", factor=4.0), "scaling='linear'"),
    (dict(scaling="llama3", factor=4.0, original_max_position_embeddings=8192), "llama3 scaling"),
    (dict(scaling="llama3", factor=8.0, original_max_position_embeddings=4096), "llama3 scaling"),
])
def test_cli_to_megatron_lm_refuses_rope_megatron_lm_cannot_express(tmp_path, capsys, rope, match):
    from megatron_longsky.checkpoint import write_checkpoint_config, write_latest
    from megatron_longsky.cli import main

    it = tmp_path / "ours" / "iter_0000000"
    (it / "model").mkdir(parents=True)
    (it / "model" / "metadata.json").write_text("{}")  # complete as far as the layout goes; no weights are read
    write_checkpoint_config(it, {"model": {"preset": "tiny", "vocab_size": 128, "rope": rope}})
    write_latest(tmp_path / "ours", 0)
    rc = main(["convert", "to-megatron-lm", "--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and match in err and "Megatron-LM" in err
    assert not (tmp_path / "o").exists()


def test_exported_args_cover_every_restored_field_and_flags():
    from megatron_longsky.convert.megatron_lm_args import RESTORED_ARGS, megatron_args, unrestored_flags
    from megatron_longsky.model.config import ModelConfig, RopeConfig

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      vocab_size=128, norm_epsilon=1e-6, params_dtype="bfloat16",
                      rope=RopeConfig(base=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192))
    args = megatron_args(cfg, 128, 2, 1, 5, {"type": "sentencepiece", "model": "/t/tokenizer.model"}, "c")
    assert all(hasattr(args, n) for n in RESTORED_ARGS)
    assert args.rotary_base == 500000 and isinstance(args.rotary_base, int)
    assert args.group_query_attention and args.num_query_groups == 2 and args.kv_channels == 16
    assert args.tokenizer_type == "GPTSentencePieceTokenizer" and not args.add_bias_linear and args.swiglu
    assert unrestored_flags(cfg) == ["--norm-epsilon 1e-06", "--use-rope-scaling", "--make-vocab-size-divisible-by 128",
                                     "--dist-ckpt-strictness log_unexpected", "--bf16"]


def test_cli_refuses_an_existing_output_and_one_that_overlaps_the_input(tmp_path, capsys):
    from megatron_longsky.cli import main

    _write_common_only(tmp_path / "mlm", _args())
    (tmp_path / "taken").mkdir()
    for output, message in [(tmp_path / "taken", "already exists"), (tmp_path / "mlm", "overlaps the input"),
                            (tmp_path, "overlaps the input")]:
        extra = [] if output == tmp_path / "taken" else ["--overwrite"]
        rc = main(["convert", "from-megatron-lm", "--checkpoint", str(tmp_path / "mlm"), "--output", str(output),
                   *extra])
        assert rc == 2 and message in capsys.readouterr().err
    assert (tmp_path / "mlm" / "iter_0000007" / "common.pt").exists()
