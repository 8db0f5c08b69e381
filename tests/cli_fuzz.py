"""Malformed inputs for every ``longsky`` command, and what a clean refusal looks like.

Each case feeds one command one malformed input (a corrupt file, a wrong path, a bad
value, an output that would overwrite an input) and is judged as:

- ``clean``: exit status 2 and exactly one error line naming the problem (a file, key
  or value of the case), no traceback, no output under its final name, the inputs
  unchanged and no process left behind;
- ``traceback``: a Python traceback (or exit status 1, our "internal error");
- ``accepted``: exit status 0 (a silent acceptance, unless the case marks the input as
  valid after all: ``may_succeed``);
- ``unclear``: anything else (several lines, a line naming nothing, another status, a
  left-over output or process).

``tests/test_cli_fuzz.py`` runs the cases in-process; ``python tests/cli_fuzz.py`` runs
every case as a real ``longsky`` subprocess and prints the counts.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d rank\d+ ")


@dataclass
class Case:
    name: str
    argv: list[str]
    # One of these must appear in the error line (the file, key or value at fault).
    names: list[str]
    # Paths that must not exist afterwards (finished-looking outputs).
    outputs: list[str] = field(default_factory=list)
    # Files whose bytes must not change (inputs; an output equal to an input).
    unchanged: list[str] = field(default_factory=list)
    may_succeed: bool = False
    # Why this case is expected to fail until another change lands (the issue item).
    pending: Optional[str] = None


@dataclass
class Outcome:
    verdict: str  # clean / traceback / accepted / unclear
    rc: int
    detail: str


# --- the corpus --------------------------------------------------------------------------

_WRITE = {"on": True}


def _put(path: Path, data: bytes) -> None:
    if _WRITE["on"]:
        path.write_bytes(data)


def _write_dataset(prefix: Path, tokenizer_meta: dict, tokens: list[list[int]], dtype=np.uint16) -> str:
    from megatron_longsky.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(prefix, dtype)
    for doc in tokens:
        writer.add_document(np.array(doc, dtype=dtype), [len(doc)])
    writer.finalize({"tokenizer": tokenizer_meta})
    writer.commit()
    return str(prefix)


def _copy_dataset(src: str, dst: Path) -> str:
    for suffix in (".bin", ".idx", ".meta.json"):
        if Path(src + suffix).exists():
            shutil.copy(src + suffix, str(dst) + suffix)
    return str(dst)


def _text_corpus(root: Path, key: str, good: dict) -> dict[str, tuple[Path, list[str], bool]]:
    """name -> (file, names the error should mention, may the command accept it)."""
    good_line = json.dumps(good) + "\n"
    files: dict[str, tuple[bytes, bool]] = {
        "empty": (b"", False),
        "bom": (b"\xef\xbb\xbf" + good_line.encode(), True),
        "nul": (good_line.encode() + b"\x00\x00\x00\n", False),
        "invalid_utf8": (good_line.encode() + b'{"' + key.encode() + b'": "\xff\xfe"}\n', False),
        "huge_line": (good_line.encode() + b"x" * (10 << 20) + b"\n", False),
        "wrong_type": (good_line.encode() + json.dumps({key: 5}).encode() + b"\n", False),
        "missing_key": (good_line.encode() + json.dumps({"other": "a"}).encode() + b"\n", False),
        "non_object": (good_line.encode() + b"[1, 2, 3]\n", False),
        "deep_json": (good_line.encode() + b"[" * 100_000 + b"\n", False),
    }
    out = {}
    for name, (data, ok) in files.items():
        path = root / f"{key}_{name}.jsonl"
        _put(path, data)
        out[name] = (path, [path.name], ok)
    gz = root / f"{key}_truncated.jsonl.gz"
    varied = "".join(json.dumps({**good, "n": i}) + "\n" for i in range(2000)).encode()
    compressed = gzip.compress(varied) if _WRITE["on"] else b""
    _put(gz, compressed[: len(compressed) // 2])
    out["truncated_gzip"] = (gz, [gz.name], False)
    return out


def _config_corpus(root: Path, good: dict) -> dict[str, tuple[Path, list[str], bool]]:
    text = yaml.safe_dump(good)
    files = {
        "invalid_yaml": (text.encode() + b"train_iters: [\n", ["invalid YAML", "job_invalid_yaml"], False),
        "bom": (b"\xef\xbb\xbf" + text.encode(), [], True),
        "nul": (text.encode() + b"\x00\n", ["job_nul"], False),
        "invalid_utf8": (text.encode() + b"seed: \xff\n", ["job_invalid_utf8"], False),
        "wrong_type": (yaml.safe_dump({**good, "train_iters": "many"}).encode(), ["train_iters"], False),
        "unknown_key": (yaml.safe_dump({**good, "trian_iters": 5}).encode(), ["trian_iters"], False),
        "non_mapping": (b"- a\n- b\n", ["job_non_mapping"], False),
        "zero_size": (yaml.safe_dump({**good, "model": {**good["model"], "seq_length": 0}}).encode(),
                      ["seq_length"], False),
    }
    out = {}
    for name, (data, names, ok) in files.items():
        path = root / f"job_{name}.yaml"
        _put(path, data)
        out[name] = (path, names + [path.name], ok)
    return out


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else "-"


def build_corpus(root: str | Path, write: bool = True) -> list[Case]:
    """Write the malformed inputs under ``root``; return the cases over every command
    (``write=False``: only the cases, e.g. to list their names)."""
    _WRITE["on"] = write
    try:
        return _build_corpus(Path(root))
    finally:
        _WRITE["on"] = True


def _build_corpus(root: Path) -> list[Case]:
    from megatron_longsky.tokenizer import ByteTokenizer

    if _WRITE["on"]:
        root.mkdir(parents=True, exist_ok=True)
    _put(root / "a_file", b"not a directory\n")
    blocked = root / "a_file" / "sub"  # can never be created: its parent is a file
    missing = root / "does_not_exist"
    byte_meta = ByteTokenizer().metadata()
    other_meta = {**byte_meta, "fingerprint": "other-tokenizer", "type": "hf"}
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(97, 123, size=int(rng.integers(40, 120)))) + [0] for _ in range(40)]
    good, other, truncated, garbage_idx = (str(root / n) for n in ("good", "other_tok", "truncated", "garbage_idx"))
    empty_pair = root / "empty_pair"
    if _WRITE["on"]:
        _write_dataset(root / "good", byte_meta, docs)
        _write_dataset(root / "other_tok", other_meta, docs)
        _copy_dataset(good, root / "truncated")
        with open(truncated + ".bin", "r+b") as f:
            f.truncate(Path(truncated + ".bin").stat().st_size * 3 // 4)
        _copy_dataset(good, root / "garbage_idx")
        Path(garbage_idx + ".idx").write_bytes(b"\x00garbage" * 8)
        Path(f"{empty_pair}.bin").write_bytes(b"")
        Path(f"{empty_pair}.idx").write_bytes(b"")

    cases: list[Case] = []

    # preprocess / preprocess-sft: every malformed jsonl, plus paths.
    for command, key, good_record, extra in (
        ("preprocess", "text", {"text": "hello world"}, []),
        ("preprocess-sft", "messages", {"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]}, ["--no-progress"]),
    ):
        corpus = _text_corpus(root, key, good_record)
        for name, (path, names, ok) in corpus.items():
            out = root / f"out_{command}_{name}"
            outputs = [f"{out}_text_document.idx", f"{out}_tokens_document.idx"]
            pending = None
            if command == "preprocess-sft" and name == "wrong_type":
                names = names + ["messages"]
            cases.append(Case(f"{command}/{name}", [command, "--input", str(path), "--output-prefix", str(out),
                                                    *extra], names, outputs, [str(path)], ok, pending))
        ok_input = str(corpus["bom"][0])
        cases.append(Case(f"{command}/missing_input", [command, "--input", str(missing / "x.jsonl"),
                                                       "--output-prefix", str(root / f"o_{command}"), *extra],
                          [str(missing / "x.jsonl")]))
        cases.append(Case(f"{command}/unwritable_output", [command, "--input", ok_input, "--output-prefix",
                                                           str(blocked / "out"), *extra],
                          [str(blocked), str(root / "a_file")], unchanged=[ok_input]))

    # merge-datasets
    for name, inputs, names, pending in (
        ("missing_input", [str(missing)], [str(missing)], None),
        ("truncated_bin", [good, truncated], ["truncated"], None),
        ("garbage_idx", [good, garbage_idx], ["garbage_idx"], None),
        ("empty_files", [good, str(empty_pair)], ["empty_pair"], None),
        ("mismatched_tokenizers", [good, other], ["other_tok", "good"], None),
    ):
        merge_out = str(root / f"merged_{name}")
        argv = ["merge-datasets", *[a for p in inputs for a in ("--input", p)], "--output-prefix", merge_out]
        cases.append(Case(f"merge-datasets/{name}", argv, names, [merge_out + ".idx"],
                          [p + ".bin" for p in inputs], pending=pending))
    cases.append(Case("merge-datasets/output_is_input", ["merge-datasets", "--input", good, "--input", other,
                                                         "--output-prefix", good], [good, "good"],
                      unchanged=[good + ".bin", good + ".idx"]))
    cases.append(Case("merge-datasets/unwritable_output", ["merge-datasets", "--input", good, "--output-prefix",
                                                           str(blocked / "m")], [str(blocked), "a_file"]))

    # build-cip
    cip_common = ["--seq-length", "64", "--docs-per-seq", "2", "--chunks-per-doc", "2"]
    cip_out = str(root / "cip")
    for name, inputs, names, pending in (
        ("missing_input", [str(missing)], [str(missing)], None),
        ("truncated_bin", [truncated], ["truncated"], None),
        ("garbage_idx", [garbage_idx], ["garbage_idx"], None),
        ("empty_files", [str(empty_pair)], ["empty_pair"], None),
        ("mismatched_tokenizers", [good, other], ["other_tok", "good"], None),
    ):
        cases.append(Case(f"build-cip/{name}", ["build-cip", "--input-prefix", *inputs, "--output-prefix", cip_out,
                                                *cip_common], names, [cip_out + ".idx"],
                          [p + ".bin" for p in inputs], pending=pending))
    cases.append(Case("build-cip/output_is_input", ["build-cip", "--input-prefix", good, "--output-prefix", good,
                                                    *cip_common], [good], unchanged=[good + ".bin", good + ".idx"]))
    cases.append(Case("build-cip/unwritable_output", ["build-cip", "--input-prefix", good, "--output-prefix",
                                                      str(blocked / "c"), *cip_common], [str(blocked), "a_file"]))
    cases.append(Case("build-cip/zero_seq_length", ["build-cip", "--input-prefix", good, "--output-prefix", cip_out,
                                                    "--seq-length", "0"], ["seq_length", "seq-length"],
                      [cip_out + ".idx"]))

    # train and plan: malformed configs and data.
    job = {
        "model": {"preset": "tiny", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 64, "seq_length": 32, "vocab_size": 384},
        "tokenizer": {"type": "byte"},
        "data": {"kind": "gpt", "prefixes": [good], "split": "100,0,0", "cache_dir": str(root / "cache")},
        "logging": {"tensorboard": False}, "output_dir": str(root / "run"), "train_iters": 2,
        "micro_batch_size": 1, "global_batch_size": 2,
    }
    configs = _config_corpus(root, job)
    for name, (path, names, ok) in configs.items():
        cases.append(Case(f"train/config_{name}", ["train", "--config", str(path)], names,
                          [str(root / "run" / "checkpoints" / "latest")]))
        cases.append(Case(f"plan/config_{name}", ["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node",
                                                  "1"], names, may_succeed=ok))
    # bom: the job is valid after all for plan; for train it would run, so point its data at nothing
    cases = [c for c in cases if c.name != "train/config_bom"]
    for name, overrides, names in (
        ("missing_config", ["--config", str(missing / "job.yaml")], [str(missing / "job.yaml")]),
        ("missing_data", [f"data.prefixes=[{missing}]"], [str(missing)]),
        ("truncated_bin", [f"data.prefixes=[{truncated}]"], ["truncated"]),
        ("garbage_idx", [f"data.prefixes=[{garbage_idx}]"], ["garbage_idx"]),
        ("empty_files", [f"data.prefixes=[{empty_pair}]"], ["empty_pair"]),
        ("mismatched_tokenizer", [f"data.prefixes=[{other}]"], ["other_tok"]),
        ("bad_split", ["data.split=1,,x"], ["data.split"]),
        ("unwritable_output", [f"output_dir={blocked}"], ["output_dir", str(blocked)]),
        ("tp_beyond_heads", ["parallel.tensor_model_parallel_size=3"], ["tensor_model_parallel_size"]),
        ("negative_clip_grad", ["optimizer.clip_grad=-1"], ["clip_grad"]),
        ("missing_init_from", [f"checkpoint.init_from={missing}"], ["init_from", str(missing)]),
    ):
        argv = ["train", *(overrides if name == "missing_config" else
                           ["--config", str(configs["bom"][0]), *overrides])]
        cases.append(Case(f"train/{name}", argv, names, [str(root / "run" / "checkpoints" / "latest")]))
    for flag in ("--gpu-memory-gb", "--peak-tflops"):
        for value in ("0", "-1"):
            cases.append(Case(f"plan/{flag[2:]}={value}", ["plan", "--config", str(configs["bom"][0]), "--nodes",
                                                           "1", flag, value], [flag]))

    # convert
    hf_dirs = {}
    for name, content in (("empty_config", b""), ("invalid_json", b"{"), ("non_object", b"[1]"),
                          ("missing_keys", b"{}"), ("wrong_types", json.dumps({
                              "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": "big",
                              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                              "vocab_size": 100}).encode())):
        d = root / f"hf_{name}"
        if _WRITE["on"]:
            d.mkdir(exist_ok=True)
        _put(d / "config.json", content)
        hf_dirs[name] = d
    for name, d in [("missing_dir", missing)] + list(hf_dirs.items()):
        out = root / f"conv_{name}"
        cases.append(Case(f"convert-import/{name}", ["convert", "import", "--hf-dir", str(d), "--output", str(out)],
                          [str(d), d.name, "config.json"], [str(out)]))
    cases.append(Case("convert-export/missing_checkpoint", ["convert", "export", "--checkpoint", str(missing),
                                                            "--output", str(root / "exp")], [str(missing)],
                      [str(root / "exp")]))
    cases.append(Case("convert-export/file_as_checkpoint", ["convert", "export", "--checkpoint",
                                                            str(root / "a_file"), "--output", str(root / "exp")],
                      ["a_file"], [str(root / "exp")]))

    # evaluation commands: a checkpoint that is not there, malformed data.
    for label, command, extra in (("needle", ["needle"], []), ("eval-passkey", ["eval", "passkey"], []),
                                  ("eval-ruler", ["eval", "ruler"], []),
                                  ("synl-eval", ["synl-eval"], ["--data", str(configs["bom"][0])])):
        for name, ckpt in (("missing_checkpoint", missing), ("file_as_checkpoint", root / "a_file")):
            out = root / f"eval_{label}_{name}"
            names = [str(ckpt), ckpt.name] + (["job_bom.yaml"] if label == "synl-eval" else [])
            cases.append(Case(f"{label}/{name}", [*command, "--checkpoint", str(ckpt), "--output", str(out), *extra],
                              names, [str(out)]))
    synl_corpus = _text_corpus(root, "synl", {"messages": [], "meta": {}})
    for name in ("empty", "invalid_utf8", "non_object", "nul", "deep_json"):
        path = synl_corpus[name][0]
        cases.append(Case(f"synl-eval/data_{name}", ["synl-eval", "--checkpoint", str(missing), "--data", str(path),
                                                     "--output", str(root / "synl_out")],
                          [path.name, str(missing)], [str(root / "synl_out")]))

    # build-synl, plot-loss
    cases.append(Case("build-synl/unwritable_output", ["build-synl", "--output", str(blocked / "s.jsonl"),
                                                       "--num-samples", "1", "--no-progress"],
                      [str(blocked), "a_file"]))
    cases.append(Case("build-synl/invalid_config", ["build-synl", "--output", str(root / "s.jsonl"), "--config",
                                                    str(configs["invalid_yaml"][0])], ["job_invalid_yaml"],
                      [str(root / "s.jsonl")]))
    cases.append(Case("build-synl/zero_samples", ["build-synl", "--output", str(root / "s.jsonl"),
                                                  "--num-samples", "0", "--no-progress"], ["num_samples",
                                                                                           "num-samples"],
                      [str(root / "s.jsonl")]))
    metrics = _text_corpus(root, "loss", {"iteration": 1, "loss": 2.0})
    for name in ("empty", "invalid_utf8", "non_object", "wrong_type", "missing_key", "truncated_gzip", "deep_json"):
        path = metrics[name][0]
        cases.append(Case(f"plot-loss/{name}", ["plot-loss", str(path), "-o", str(root / f"loss_{name}.png")],
                          [path.name], [str(root / f"loss_{name}.png")]))
    cases.append(Case("plot-loss/missing", ["plot-loss", str(missing / "m.jsonl")], [str(missing / "m.jsonl")]))
    cases += _issue22_cases(root, good, byte_meta, docs)
    cases += _untrusted_value_cases(root, configs["bom"][0], missing)
    return cases


def _corrupt_copy(good: str, dst: Path, how: str) -> str:
    """A copy of ``good`` whose .idx breaks one invariant (same size, so only the validator sees it)."""
    _copy_dataset(good, dst)
    if not _WRITE["on"]:
        return str(dst)
    raw = bytearray(Path(good + ".idx").read_bytes())
    n, d = np.frombuffer(bytes(raw[18:34]), np.uint64).astype(np.int64)
    lengths, docs_at = 34, 34 + 12 * n
    if how == "negative_length":
        raw[lengths:lengths + 4] = np.int32(-5).tobytes()
    elif how == "doc_idx_decreasing":
        raw[docs_at + 8:docs_at + 24] = np.array([3, 1], np.int64).tobytes()
    elif how == "doc_idx_out_of_range":
        raw[docs_at + 8 * (d - 1):docs_at + 8 * d] = np.int64(n + 7).tobytes()
    Path(str(dst) + ".idx").write_bytes(bytes(raw))
    return str(dst)


def _issue22_cases(root: Path, good: str, byte_meta: dict, docs) -> list[Case]:
    """Issue 22: corrupt indices and sidecars for every reader, and outputs that collide with inputs."""
    cases: list[Case] = []
    cip_common = ["--seq-length", "64", "--docs-per-seq", "2", "--chunks-per-doc", "2"]
    for how in ("negative_length", "doc_idx_decreasing", "doc_idx_out_of_range"):
        bad = _corrupt_copy(good, root / f"idx_{how}", how)
        unchanged = [bad + ".idx", bad + ".bin"]
        out = str(root / f"merged_idx_{how}")
        cases.append(Case(f"merge-datasets/idx_{how}", ["merge-datasets", "--input", good, "--input", bad,
                                                         "--output-prefix", out], [f"idx_{how}.idx"],
                          [out + ".idx"], unchanged))
        out = str(root / f"cip_idx_{how}")
        cases.append(Case(f"build-cip/idx_{how}", ["build-cip", "--input-prefix", bad, "--output-prefix", out,
                                                    *cip_common], [f"idx_{how}.idx"], [out + ".idx"], unchanged))
    for name, content in (("invalid_json", b'{"tokenizer": '), ("wrong_shape", b'{"tokenizer": "byte"}'),
                          ("invalid_utf8", b'{"tokenizer": {"fingerprint": "\xff"}}'), ("list", b"[]")):
        bad = _copy_dataset(good, root / f"meta_{name}")
        _put(Path(bad + ".meta.json"), content)
        out = str(root / f"merged_meta_{name}")
        cases.append(Case(f"merge-datasets/meta_{name}", ["merge-datasets", "--input", good, "--input", bad,
                                                           "--output-prefix", out], [f"meta_{name}.meta.json"],
                          [out + ".idx"], [bad + ".meta.json"]))
        out = str(root / f"cip_meta_{name}")
        cases.append(Case(f"build-cip/meta_{name}", ["build-cip", "--input-prefix", good, bad, "--output-prefix",
                                                     out, *cip_common], [f"meta_{name}.meta.json"], [out + ".idx"],
                          [bad + ".meta.json"]))
    cases.append(Case("merge-datasets/same_input_twice", ["merge-datasets", "--input", good, "--input",
                                                          f"{root}/./good", "--output-prefix",
                                                          str(root / "twice")], ["good.idx"],
                      [str(root / "twice.idx")]))
    cases.append(Case("build-cip/eod_id_out_of_range", ["build-cip", "--input-prefix", good, "--output-prefix",
                                                        str(root / "cip_eod"), *cip_common, "--separator", "eod",
                                                        "eod_id=70000"], ["eod_id"], [str(root / "cip_eod.idx")]))
    cases.append(Case("build-cip/num_sequences_1e12", ["build-cip", "--input-prefix", good, "--output-prefix",
                                                       str(root / "cip_huge"), *cip_common, "--num-sequences",
                                                       "1000000000000"], ["num_sequences"],
                      [str(root / "cip_huge.idx")]))
    text = root / "prefix_input.jsonl"
    _put(text, b'{"text": "hello"}\n')
    for name, prefix in (("empty_prefix", ""), ("directory_prefix", str(root) + "/")):
        cases.append(Case(f"preprocess/{name}", ["preprocess", "--input", str(text), "--output-prefix", prefix],
                          ["--output-prefix"], [str(root / "_text_document.idx")], [str(text)]))
    metrics = root / "issue22_metrics.jsonl"
    _put(metrics, b'{"iteration": 1, "loss": 2.0}\n')
    cases.append(Case("plot-loss/output_is_input", ["plot-loss", str(metrics), "-o", f"{root}/./{metrics.name}",
                                                    "--overwrite"], [metrics.name], unchanged=[str(metrics)]))
    cases.append(Case("plot-loss/output_device", ["plot-loss", str(metrics), "-o", "/dev/null", "--overwrite"],
                      ["/dev/null"], unchanged=[str(metrics)]))
    hf = root / "hf_issue22"
    if _WRITE["on"]:
        hf.mkdir(exist_ok=True)
    _put(hf / "config.json", b"{}")
    for name, out in (("output_is_input", f"{hf}/."), ("output_is_parent", root)):
        cases.append(Case(f"convert-import/{name}", ["convert", "import", "--hf-dir", str(hf), "--output", str(out),
                                                     "--overwrite"], ["hf_issue22"], unchanged=[str(hf / "config.json")]))
    synl_jsonl = root / "o22_tokens_document.bin"
    _put(synl_jsonl, b"keep")
    cases.append(Case("build-synl/outputs_collide", ["build-synl", "--output", str(synl_jsonl), "--sft-output-prefix",
                                                     str(root / "o22"), "--overwrite", "--num-samples", "1",
                                                     "--no-progress"], ["o22_tokens_document.bin"],
                      unchanged=[str(synl_jsonl)]))
    return cases


def _untrusted_value_cases(root: Path, job: Path, missing: Path) -> list[Case]:
    """Values that were accepted silently or ended in a traceback (issue 22)."""
    _put(root / "job_duplicate_key.yaml", job.read_bytes() + b"seed: 1\nseed: 2\n" if _WRITE["on"] else b"")
    hf = root / "hf_tie_string"
    if _WRITE["on"]:
        hf.mkdir(exist_ok=True)
    _put(hf / "config.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100, "tie_word_embeddings": "false"}).encode())
    latest = str(root / "run" / "checkpoints" / "latest")
    cases = [Case(f"train/{name}", ["train", "--config", str(job), override], names, [latest])
             for name, override, names in (
                 ("rope_scalar", "model.rope=10000", ["model.rope"]),
                 ("seed_negative", "seed=-1", ["seed"]),
                 ("seed_2_32", "seed=4294967296", ["seed"]),
                 ("weights_zero", "data.weights=[0]", ["data.weights"]),
                 ("log_level", "logging.level=BOGUS", ["logging.level"]),
                 ("train_iters_huge", "train_iters=100000000000000000000", ["train_iters"]))]
    cases.append(Case("train/duplicate_yaml_key", ["train", "--config", str(root / "job_duplicate_key.yaml")],
                      ["job_duplicate_key.yaml"], [latest]))
    for flag in ("--gpu-memory-gb", "--peak-tflops"):
        cases.append(Case(f"plan/{flag[2:]}=inf", ["plan", "--config", str(job), "--nodes", "1", flag, "inf"],
                          [flag]))
    cases.append(Case("plan/dry_run_missing_recipe", ["plan", "--dry-run", "--recipe", str(missing)],
                      [str(missing)]))
    cases.append(Case("preprocess/unknown_lang", ["preprocess", "--input", str(root / "text_bom.jsonl"),
                                                  "--output-prefix", str(root / "o_lang"), "--lang", "klingon"],
                      ["--lang"], [str(root / "o_lang_text_document.idx")]))
    cases.append(Case("convert-import/tie_as_string", ["convert", "import", "--hf-dir", str(hf), "--output",
                                                       str(root / "conv_tie")], ["tie_word_embeddings"],
                      [str(root / "conv_tie")]))
    cases.append(Case("quickstart/negative_iters", ["quickstart", "--output", str(root / "qs"), "base_iters=-5"],
                      ["base_iters"], [str(root / "qs")]))
    return cases


# --- judging -----------------------------------------------------------------------------

def judge(case: Case, rc: int, err: str, before: dict[str, str], left_processes: list[int]) -> Outcome:
    lines = [line for line in err.splitlines()
             if line.strip() and not _LOG_LINE.match(line) and "it/s]" not in line and "\r" not in line]
    if "Traceback (most recent call last)" in err:
        return Outcome("traceback", rc, err.strip().splitlines()[-1] if err.strip() else "")
    problems = []
    if left_processes:
        problems.append(f"processes left: {left_processes}")
    changed = [p for p, digest in before.items() if _sha(p) != digest]
    if changed:
        problems.append(f"inputs changed: {changed}")
    if rc == 0:
        verdict = "accepted" if not problems else "unclear"
        return Outcome(verdict, rc, "; ".join(problems) or "exit 0")
    left = [p for p in case.outputs if Path(p).exists()]
    if left:
        problems.append(f"outputs left: {left}")
    if rc != 2:
        problems.append(f"exit status {rc}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines: {lines[:3]}")
    elif case.names and not any(n in lines[0] for n in case.names):
        problems.append(f"the line names none of {case.names}: {lines[0]}")
    return Outcome("unclear" if problems else "clean", rc, "; ".join(problems) or (lines[0] if lines else ""))


def _live_processes() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name, zombies left out (Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                found[int(entry.name)] = fields
    return found


def _descendants(pid: int) -> list[int]:
    """Live processes whose parent chain reaches ``pid``."""
    parents = {child: int(fields[1]) for child, fields in _live_processes().items()}
    found = []
    for child in parents:
        p, hops = child, 0
        while p in parents and hops < 64:
            p, hops = parents[p], hops + 1
            if p == pid:
                found.append(child)
                break
    return found


def _session_members(sid: int) -> list[int]:
    return [pid for pid, fields in _live_processes().items() if int(fields[3]) == sid]


def run_inprocess(case: Case) -> Outcome:
    from megatron_longsky.cli import main

    before = {p: _sha(p) for p in case.unchanged}
    children = set(_descendants(os.getpid()))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(case.argv))
        except SystemExit as exc:  # the wrapper lets nothing through; count it if it does
            rc = exc.code if isinstance(exc.code, int) else 1
            err.write(f"uncaught SystemExit({exc.code!r})\n")
        except Exception:  # noqa: BLE001 - an escaped exception is a traceback
            import traceback

            traceback.print_exc(file=err)
            rc = 1
    deadline = time.monotonic() + 10
    left = [p for p in _descendants(os.getpid()) if p not in children]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in _descendants(os.getpid()) if p not in children]
    return judge(case, rc, err.getvalue(), before, left)


def run_subprocess(case: Case, timeout: float = 600, repo: Optional[str] = None) -> Outcome:
    before = {p: _sha(p) for p in case.unchanged}
    repo = repo or str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_longsky.cli", *case.argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True, text=True, errors="replace")
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return Outcome("unclear", -9, f"hang: killed after {timeout:.0f} s")
    time.sleep(0.2)
    left = _session_members(proc.pid)
    for pid in left:
        os.kill(pid, 9)
    return judge(case, proc.returncode, err, before, left)


def main() -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-process", action="store_true", help="run in this process (fast) instead of subprocesses")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--skip", action="append", default=[], help="leave out cases whose name contains this")
    parser.add_argument("--repo", default=None, help="checkout whose longsky the subprocesses run (default: this one)")
    args = parser.parse_args()
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = [c for c in build_corpus(tmp) if args.k in c.name and not any(s in c.name for s in args.skip)]
        for case in cases:
            outcome = run_inprocess(case) if args.in_process else run_subprocess(case, repo=args.repo)
            counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
            flag = "" if outcome.verdict == "clean" or (outcome.verdict == "accepted" and case.may_succeed) else " <--"
            pending = f" [pending: {case.pending}]" if case.pending else ""
            print(f"{outcome.verdict:9s} rc={outcome.rc:<3d} {case.name}: {outcome.detail[:200]}{pending}{flag}",
                  flush=True)
    valid = sum(1 for c in cases if c.may_succeed)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f" ({valid} of the inputs are valid after all and may be accepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
