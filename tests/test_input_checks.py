"""No input trusted (issue 22): configs, overrides, flags and file contents a user gets wrong are
one line naming the culprit and exit 2, found before a model is built; values a user means
(``lr: 3e-3``) are read as meant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_longsky.cli import main as longsky
from megatron_longsky.config import ConfigError, load_yaml, parse_override
from megatron_longsky.training.config import load_train_config


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test's command if it gets as far as initialising the process group."""
    import megatron_longsky.runtime.distributed as distributed

    def refuse(*args, **kwargs):
        raise AssertionError("a model was about to be built although the inputs are wrong")

    monkeypatch.setattr(distributed, "initialize", refuse)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LONGSKY_DEBUG"):
        monkeypatch.delenv(key, raising=False)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO] " not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- YAML: exponent floats, duplicate keys, where a value came from -------------------------

def test_exponent_floats_are_floats_in_yaml_files_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optimizer:\n  lr: 3e-3\n  min_lr: 1E-5\n")
    cfg = load_train_config(path, ["optimizer.weight_decay=1e-2", "schedule.init_lr=-0e0"])
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.weight_decay) == (3e-3, 1e-5, 1e-2)
    assert parse_override("a=1e-4") == (["a"], 1e-4)
    assert parse_override("a=12") == (["a"], 12) and parse_override("a=v1e3") == (["a"], "v1e3")


def test_duplicate_yaml_keys_name_the_file_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("seed: 1\nmodel:\n  num_layers: 2\n  num_layers: 4\n")
    with pytest.raises(ConfigError, match=r"job.yaml:4:3: .*duplicate key 'num_layers' \(first given on line 3"):
        load_yaml(path)
    path.write_text("seed: 1\nmodel: {}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"job.yaml:3:1: .*duplicate key 'seed' \(first given on line 1"):
        load_yaml(path)
    path.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")  # a merge key overridden: not a duplicate
    assert load_yaml(path)["other"] == {"x": 2}


def test_an_override_error_names_the_command_line_not_the_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optimizer:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as exc:
        load_train_config(path, ["optimizer.lr=fast"])
    assert "optimizer.lr: expected a number, got 'fast'" in str(exc.value)
    assert "the command line: optimizer.lr=fast" in str(exc.value)
    path.write_text("optimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"job.yaml.optimizer.lr: expected a number") as exc:
        load_train_config(path)
    assert "command line" not in str(exc.value)


# --- values that were accepted silently or ended in a traceback ------------------------------

@pytest.mark.parametrize("override, expected", [
    ("model.rope=10000", "model.rope: expected a mapping such as {base: 10000}"),
    ("seed=-1", "seed=-1 must be in [0, 2**32)"),
    ("seed=4294967296", "seed=4294967296 must be in [0, 2**32)"),
    ("data.weights=[0]", "data.weights=[0.0] sum to 0"),
    ("data.weights=[.nan]", "data.weights[0]: expected a finite number"),
    ("logging.level=BOGUS", "logging.level='BOGUS' is not one of DEBUG"),
    ("train_iters=100000000000000000000", "check train_iters"),
    ("train_iters=1e20", "train_iters: expected an integer"),
])
def test_bad_train_values_are_one_line(capsys, nothing_built, override, expected):
    assert longsky(["train", "data.prefixes=[x]", override]) == 2
    assert expected in _error(capsys)


def test_cache_dir_that_is_a_file_is_refused_before_the_run(tmp_path, capsys, nothing_built):
    from _training_fixtures import tiny_config_dict, write_token_dataset

    prefix = write_token_dataset(tmp_path / "ds", num_docs=8)
    (tmp_path / "file").write_text("")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, prefix)))
    assert longsky(["train", "--config", str(job), f"data.cache_dir={tmp_path / 'file'}"]) == 2
    assert "data.cache_dir=" in _error(capsys)


def test_usage_errors_are_two_lines_not_the_whole_usage(capsys):
    assert longsky(["preprocess", "--input", "x", "--output-prefix", "y", "--bogus"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: longsky preprocess") and "--bogus" in lines[1]


@pytest.mark.parametrize("argv, expected", [
    (["--lang", "klingon"], "--lang 'klingon' is not a Punkt language"),
    (["--log-level", "BOGUS"], "argument --log-level: invalid choice"),
])
def test_preprocess_flags_are_checked(tmp_path, capsys, argv, expected):
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    assert longsky(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(out), *argv]) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
    assert not list(tmp_path.glob("out*"))


# --- evaluation commands: refused before the model is loaded ---------------------------------

@pytest.fixture
def fake_checkpoint(tmp_path) -> Path:
    """An iteration directory with a config (byte tokenizer) and an empty weights index (so it
    counts as complete): a command that reached the model would fail differently."""
    ckpt = tmp_path / "iter_0000001"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "metadata.json").write_text("{}")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"type": "byte"}, "model": {"vocab_size": 384}}))
    return ckpt


@pytest.mark.parametrize("extra, expected", [
    (["--lengths", "8"], "--lengths: length 8 is too short for this tokenizer"),
    (["--haystack", "{tmp}/missing.txt"], "haystack file does not exist: {tmp}/missing.txt"),
    (["--haystack", "{tmp}/empty.txt"], "empty.txt: no sentences"),
    (["--mode", "chat"], "chat mode needs a chat template"),
    (["--mode", "chat", "--chat-template", "{tmp}/bad.jinja"], "chat template {tmp}/bad.jinja:1: invalid Jinja"),
    (["--mode", "chat", "--chat-template", "{tmp}/latin1.jinja"], "{tmp}/latin1.jinja: not UTF-8"),
    (["--tokenizer-type", "hf", "--tokenizer-model", "{tmp}/nothere"], "tokenizer model does not exist"),
])
def test_needle_inputs_are_checked_before_the_model(tmp_path, capsys, nothing_built, fake_checkpoint, extra,
                                                    expected):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jinja").write_text("{% if %}")
    (tmp_path / "latin1.jinja").write_bytes(b"caf\xe9 {{ messages }}")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["needle", "--checkpoint", str(fake_checkpoint), "--output", str(tmp_path / "out"), *extra]
    if "--lengths" not in extra:
        argv += ["--lengths", "400"]
    assert longsky(argv) == 2
    assert expected.replace("{tmp}", str(tmp_path)) in _error(capsys)


def test_tp_larger_than_the_world_is_a_config_error():
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize

    with pytest.raises(ConfigError, match=r"do not divide by tensor x pipeline x context parallel size 2\*1\*1"):
        initialize(ParallelConfig(tensor_model_parallel_size=2))


@pytest.mark.parametrize("data, expected", [
    ("{tmp}/missing.jsonl", "--data {tmp}/missing.jsonl: no such file"),
    ("{tmp}/short.jsonl", "no document in {tmp}/short.jsonl has 99 tokens"),
    ("{tmp}/latin1.txt", "{tmp}/latin1.txt: not UTF-8"),
    ("{tmp}/number.jsonl", "number.jsonl:1: not a JSON object with a 'text' string"),
])
def test_eval_ppl_data_is_checked_before_the_model(tmp_path, capsys, nothing_built, fake_checkpoint, data, expected):
    (tmp_path / "short.jsonl").write_text('{"text": "short"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    argv = ["eval", "ppl", "--checkpoint", str(fake_checkpoint), "--output", str(tmp_path / "out"),
            "--data", data.replace("{tmp}", str(tmp_path)), "--length", "100"]
    assert longsky(argv) == 2
    assert expected.replace("{tmp}", str(tmp_path)) in _error(capsys)


_TURNS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
_META = {"answer": "a", "family": "f", "kind": "k", "id": "x"}


@pytest.mark.parametrize("record, expected", [
    ({"messages": _TURNS, "meta": {k: v for k, v in _META.items() if k != "answer"}}, "'meta' has no 'answer'"),
    ({"messages": "hi", "meta": _META}, "'messages' must be a list"),
    ({"messages": [1, 2], "meta": _META}, "'messages' must be a list"),
    ({"messages": _TURNS, "meta": {**_META, "answer": 5}}, "'meta.answer' must be a string"),
])
def test_synl_eval_records_are_checked(tmp_path, capsys, nothing_built, fake_checkpoint, record, expected):
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["synl-eval", "--checkpoint", str(fake_checkpoint), "--output", str(tmp_path / "o"), "--data",
            str(tmp_path / "d.jsonl")]
    assert longsky(argv) == 2
    assert f"d.jsonl:1: {expected}" in _error(capsys)


@pytest.mark.parametrize("flag", ["--max-samples", "--max-new-tokens"])
def test_synl_eval_counts_must_be_positive(tmp_path, capsys, fake_checkpoint, flag):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": _TURNS, "meta": _META}) + "\n")
    argv = ["synl-eval", "--checkpoint", str(fake_checkpoint), "--output", str(tmp_path / "o"), "--data",
            str(tmp_path / "d.jsonl"), flag, "0"]
    assert longsky(argv) == 2
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


# --- tokenizer files: the file is named -------------------------------------------------------

def test_invalid_utf8_in_tokenizer_files_names_the_file(tmp_path):
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer
    from megatron_longsky.tokenizer.base import TokenizerError
    from megatron_longsky.tokenizer.train import train_bpe_tokenizer

    directory = Path(train_bpe_tokenizer(["hello world, the quick brown fox"] * 20, vocab_size=300,
                                         out_dir=tmp_path / "bpe"))
    (directory / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not UTF-8"):
        build_tokenizer(TokenizerConfig("hf", str(directory)))


# --- HF config.json and weights: strict types, one RoPE reading -------------------------------

_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 384,
       "max_position_embeddings": 64, "rope_theta": 10000.0}


@pytest.mark.parametrize("changes, message", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"hidden_size": "32"}, "hidden_size must be an integer, got '32'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
      "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "contradict"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_theta"),
    ({"rope_scaling": {"factor": 4.0}}, "without a scaling rope_type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, "factor must be a finite number"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
])
def test_hf_config_fields_are_strict(changes, message):
    from megatron_longsky.convert.hf_config import ConversionError, model_config_from_hf

    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")) as exc:
        model_config_from_hf({**_HF, **changes}, where="hf/config.json")
    assert str(exc.value).startswith("hf/config.json: ")


def test_hf_config_rope_settings_that_agree_are_read():
    from megatron_longsky.convert.hf_config import hf_config_from_model, model_config_from_hf

    linear = {"rope_type": "linear", "factor": 4.0}
    both = {**_HF, "rope_scaling": {"type": "linear", "factor": 4.0},
            "rope_parameters": {"rope_theta": 10000.0, **linear}}
    cfg = model_config_from_hf(both)
    assert (cfg.rope.scaling, cfg.rope.factor, cfg.tie_embeddings) == ("linear", 4.0, False)
    again = model_config_from_hf(hf_config_from_model(cfg, 384)).rope  # what export writes: both spellings
    assert (again.scaling, again.factor, again.base) == ("linear", 4.0, 10000.0)


def test_weight_index_and_missing_tensors_are_conversion_errors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from megatron_longsky.convert.hf_config import ConversionError
    from megatron_longsky.convert.hf_weights import HFWeights

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(ConversionError, match="'weight_map' must map each tensor name to a shard file name"):
        HFWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    weights = HFWeights(tmp_path)
    with pytest.raises(ConversionError, match="tensor 'model.norm.weight' not found"):
        weights.shape("model.norm.weight")


# --- plan --------------------------------------------------------------------------------------

@pytest.fixture
def plan_job(tmp_path) -> str:
    from _training_fixtures import tiny_config_dict

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, str(tmp_path / "none"))))
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb must be > 0 and finite, got inf"),
    (["--peak-tflops", "inf"], "--peak-tflops must be > 0 and finite, got inf"),
    (["--nodes", "2", "--vocab-size", "7", "parallel.tensor_model_parallel_size=2"],
     "--vocab-size 7 is not divisible by tensor_model_parallel_size 2"),
])
def test_plan_refuses_impossible_cluster_numbers(capsys, plan_job, argv, expected):
    argv = ["plan", "--config", plan_job, "--gpus-per-node", "1", *argv]
    assert longsky(argv if "--nodes" in argv else [*argv, "--nodes", "1"]) == 2
    assert expected in _error(capsys)


def test_plan_of_a_needle_config_says_what_it_expects(capsys):
    needle = Path(__file__).resolve().parents[1] / "examples/configs/recipes/skywork13b_200k/needle.yaml"
    assert longsky(["plan", "--config", str(needle), "--nodes", "1"]) == 2
    assert "longsky plan --config takes a training config" in _error(capsys)


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "no cpt.yaml, sft.yaml, long_sft.yaml"),
    (lambda d: (d.mkdir(), *[(d / f"{s}.yaml").write_text("model: [\n") for s in ("cpt", "sft", "long_sft")]),
     "cpt.yaml:2:1: invalid YAML"),
])
def test_plan_dry_run_recipe_dir_errors_exit_2(tmp_path, capsys, make, expected):
    make(tmp_path / "recipe")
    assert longsky(["plan", "--dry-run", "--recipe", str(tmp_path / "recipe")]) == 2
    assert expected in _error(capsys)


@pytest.mark.parametrize("override, expected", [
    ("base_iters=-5", "base_iters must be >= 1, got -5"),
    ("recall_fraction=2", "recall_fraction must be in [0, 1]"),
    ("micro_batch_size=3", "global_batch_size 16 is not a multiple of micro_batch_size 3"),
    ("lr=0", "lr must be > 0"),
])
def test_quickstart_config_is_checked_when_loaded(tmp_path, capsys, monkeypatch, override, expected):
    import megatron_longsky.quickstart as quickstart

    monkeypatch.setattr(quickstart, "run", lambda *a, **k: pytest.fail("the quickstart started"))
    assert longsky(["quickstart", "--output", str(tmp_path / "qs"), override]) == 2
    assert expected in _error(capsys)


# --- checkpoints: their tokenizer travels with them; a model of another shape is refused ------

def test_resume_with_another_seed_is_refused_unless_allowed(tmp_path):
    from _training_fixtures import tiny_config_dict
    from megatron_longsky.training.resume_check import check_same_run, run_differences

    saved = tiny_config_dict(tmp_path, "data/a_text_document")
    assert run_differences(saved, {**saved, "seed": saved["seed"]}) == []
    with pytest.raises(ConfigError, match=r"seed: checkpoint 7, this run 8"):
        check_same_run(saved, {**saved, "seed": 8}, "runs/x/iter_0000002")
    assert check_same_run(saved, {**saved, "seed": 8}, "x", allow_mismatch=True) == ["seed: checkpoint 7, this run 8"]


def test_init_from_a_checkpoint_of_another_shape_is_refused_before_the_run(tmp_path, capsys, nothing_built,
                                                                          fake_checkpoint):
    from _training_fixtures import tiny_config_dict, write_token_dataset

    (fake_checkpoint / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"type": "byte"}, "model": {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 384}}))
    prefix = write_token_dataset(tmp_path / "ds", num_docs=8)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, prefix, checkpoint={"init_from": str(fake_checkpoint)})))
    assert longsky(["train", "--config", str(job)]) == 2
    line = _error(capsys)
    assert "checkpoint.init_from=" in line and "model.hidden_size: checkpoint 64, this config 32" in line


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny model trained one step with a BPE tokenizer (a tokenizer with files)."""
    import numpy as np

    from _training_fixtures import tiny_config_dict
    from megatron_longsky.data.indexed import IndexedDatasetWriter
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer
    from megatron_longsky.tokenizer.train import train_bpe_tokenizer
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    tmp = tmp_path_factory.mktemp("bpe_run")
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    bpe = train_bpe_tokenizer(texts, vocab_size=300, out_dir=tmp / "bpe")
    tok = build_tokenizer(TokenizerConfig("hf", str(bpe)))
    writer = IndexedDatasetWriter(tmp / "ds", np.uint16)
    for text in texts:
        ids = np.array(tok.encode(text) + [tok.eod_id], dtype=np.uint16)
        writer.add_document(ids, [len(ids)])
    writer.finalize({"tokenizer": tok.metadata()})
    writer.commit()
    data = tiny_config_dict(tmp, str(tmp / "ds"), tokenizer={"type": "hf", "model": str(bpe)}, train_iters=1,
                            global_batch_size=2, micro_batch_size=1)
    data["model"] = {k: v for k, v in data["model"].items() if k != "vocab_size"}
    result = train(train_config_from_dict(data))
    return tmp, data, result.checkpoint_dir


@pytest.mark.slow
def test_trained_checkpoints_carry_their_tokenizer(bpe_run, tmp_path, monkeypatch):
    from megatron_longsky.checkpoint.layout import read_checkpoint_config
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    tmp, data, ckpt = bpe_run
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert raw["tokenizer"] == {"type": "hf", "model": "tokenizer", "merges": None}
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    original = build_tokenizer(TokenizerConfig("hf", data["tokenizer"]["model"]))
    # The same run resumes (the copy and the original are one tokenizer: same fingerprint).
    resumed = train(train_config_from_dict({**data, "train_iters": 2}))
    assert resumed.iterations == [2]
    # The checkpoint, moved elsewhere with its tokenizer's original files gone, still has it.
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(resumed.checkpoint_dir, moved)
    shutil.move(data["tokenizer"]["model"], tmp_path / "bpe_elsewhere")
    monkeypatch.chdir(tmp_path)
    entry = read_checkpoint_config(moved)["tokenizer"]
    assert entry["model"] == str(moved / "tokenizer")
    assert build_tokenizer(TokenizerConfig(entry["type"], entry["model"])).fingerprint == original.fingerprint
    shutil.move(tmp_path / "bpe_elsewhere", data["tokenizer"]["model"])


@pytest.mark.slow
def test_export_of_a_checkpoint_whose_config_disagrees_with_its_weights(bpe_run, tmp_path, capsys):
    import shutil

    _, _, ckpt = bpe_run
    edited = tmp_path / "iter_0000001"
    shutil.copytree(ckpt, edited)
    conf = yaml.safe_load((edited / "config.yaml").read_text())
    conf["model"]["ffn_hidden_size"] = 96
    (edited / "config.yaml").write_text(yaml.safe_dump(conf))
    assert longsky(["convert", "export", "--checkpoint", str(edited), "--output", str(tmp_path / "hf")]) == 2
    line = _error(capsys)
    assert "has shape" in line and "needs" in line and str(edited) in line
    assert not (tmp_path / "hf").exists()


# --- a single process binds no TCP port (docs/slurm.md) ----------------------------------------

def _listening_sockets() -> int:
    """TCP sockets of this process in the LISTEN state (Linux /proc)."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                count += fields[3] == "0A" and fields[9] in inodes
    return count


def test_a_single_cpu_process_binds_no_tcp_port(monkeypatch):
    import torch

    from megatron_longsky.runtime.distributed import ParallelConfig, initialize, shutdown

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    before = _listening_sockets()
    initialize(ParallelConfig())
    try:
        assert _listening_sockets() == before  # gloo bound one listener per group (21)
        # The one-rank collectives still do what a one-rank group does.
        t = torch.arange(4.0)
        torch.distributed.all_reduce(t)
        out = torch.empty(4)
        torch.distributed.all_gather_into_tensor(out, torch.arange(4.0))
        assert torch.equal(t, torch.arange(4.0)) and torch.equal(out, torch.arange(4.0))
    finally:
        shutdown()


def test_sigterm_to_the_local_slurm_helper_stops_its_daemons(tmp_path):
    """`slurm_local.main` used sigwait without blocking SIGTERM: the signal's default action
    ended the process and left munged/slurmctld/slurmd running."""
    import signal
    import subprocess
    import sys
    import time

    stopped = tmp_path / "stopped"
    script = f"""
import sys
import megatron_longsky.launch.slurm_local as sl
class Fake:
    conf = "fake.conf"
    def stop(self):
        open({str(stopped)!r}, "w").write("stopped")
sl.missing_binaries = lambda: []
sl.LocalSlurm.start = staticmethod(lambda *a, **k: Fake())
sys.exit(sl.main([]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "export SLURM_CONF=fake.conf"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert stopped.read_text() == "stopped"


# --- each run resolved once (the checks hand their results to the set-up) -----------------------

@pytest.mark.slow
def test_train_resolves_tokenizer_and_checkpoint_once(tmp_path, monkeypatch):
    import megatron_longsky.checkpoint.layout as layout
    import megatron_longsky.tokenizer as tokenizer_pkg
    import megatron_longsky.training.loop as loop
    import megatron_longsky.training.preflight as preflight
    from _training_fixtures import tiny_config_dict, write_token_dataset
    from megatron_longsky.training.config import train_config_from_dict

    monkeypatch.setenv("MASTER_PORT", "0")
    prefix = write_token_dataset(tmp_path / "ds", num_docs=16)
    cfg = train_config_from_dict(tiny_config_dict(tmp_path, prefix, train_iters=1))
    loop.train(cfg)  # a checkpoint to resume
    calls: dict[str, int] = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tokenizer_pkg, "build_tokenizer", counting("tokenizer", tokenizer_pkg.build_tokenizer))
    for name in ("read_latest", "resolve_checkpoint", "read_checkpoint_config"):
        original = getattr(layout, name)
        for module in (layout, preflight, loop):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counting(name, original))
    resumed = train_config_from_dict(tiny_config_dict(tmp_path, prefix, train_iters=2))
    setup, state, resume_dir = loop.setup_training(resumed)
    try:
        assert resume_dir is not None and state.iteration == 1
        # was: the tokenizer built twice, `latest` read twice and config.yaml three times
        assert calls == {"tokenizer": 1, "read_latest": 1, "read_checkpoint_config": 1}, calls
    finally:
        loop.teardown(setup)


def test_preflight_does_not_import_the_loop():
    """The loop imports the checks; the checks never import the loop (no import cycle)."""
    import ast

    import megatron_longsky.training.preflight as preflight

    tree = ast.parse(Path(preflight.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "megatron_longsky.training.loop" not in imported
