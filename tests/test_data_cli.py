"""Data commands: accumulating flags, several paths per --input, Megatron-LM's command line,
outputs never over inputs (--overwrite), .bin checked against .idx, the dataset switch
failing at every step, deep JSON, and no megatron-core/torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longsky.data import cip
from megatron_longsky.data import indexed as indexed_mod
from megatron_longsky.data import merge as merge_mod
from megatron_longsky.data.index_format import BinIdxBuilder, IndexedDatasetError, check_pair
from megatron_longsky.data.indexed import dataset_prefix, open_indexed
from megatron_longsky.data.metadata import read_meta
from megatron_longsky.data.preprocess import main as preprocess_main
from megatron_longsky.sft.preprocess import main as sft_main
from megatron_longsky.sft.preprocess import sft_prefixes
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, build_tokenizer, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"Document {i}: tables, needles and long context. " * (1 + i % 3) for i in range(30)]


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line)
    return path


def docs_of(prefix) -> list[list[int]]:
    ds = open_indexed(prefix)
    di = ds.document_indices
    return [[int(t) for j in range(di[i], di[i + 1]) for t in ds[j]] for i in range(len(di) - 1)]


def chat(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(start, start + n)]


def pre(tmp_path, name, texts, *flags) -> str:
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts])
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / name), "--no-progress",
                            "--append-eod", *flags]) == 0
    return dataset_prefix(tmp_path / name, "text")


# ----------------------------------------------------------------------------- issue 14.9 / 14.10

def test_every_multi_valued_flag_accumulates_and_takes_several_paths(tmp_path, capsys):
    shards = [write_jsonl(tmp_path / "in" / f"s{i}.jsonl", [{"text": t, "title": f"t{i}"} for t in TEXTS[i::3]])
              for i in range(3)]
    # preprocess: several paths after one --input (an unquoted glob), plus a repeated --input and --json-keys
    out = tmp_path / "p"
    assert preprocess_main(["--input", str(shards[0]), str(shards[1]), "--input", str(shards[2]),
                            "--json-keys", "text", "--json-keys", "title", "--output-prefix", str(out),
                            "--no-progress"]) == 0
    assert len(docs_of(dataset_prefix(out, "text"))) == 30 and len(docs_of(dataset_prefix(out, "title"))) == 30

    # preprocess-sft: a repeated --input keeps every file (was: only the last)
    files = [write_jsonl(tmp_path / f"chat{i}.jsonl", chat(100, 100 * i)) for i in range(3)]
    assert sft_main(["--input", str(files[0]), "--input", str(files[1]), str(files[2]),
                     "--output-prefix", str(tmp_path / "sft"), "--no-progress"]) == 0
    assert len(docs_of(sft_prefixes(tmp_path / "sft")[0])) == 300

    # merge-datasets: several prefixes after one --input, and a shell glob naming .bin/.idx/.meta.json
    a, b = pre(tmp_path, "a", TEXTS[:5]), pre(tmp_path, "b", TEXTS[5:12])
    globbed = sorted(str(p) for p in tmp_path.glob("[ab]_text_document.*"))
    assert len(globbed) == 6
    assert merge_mod.main(["--input", *globbed, "--output-prefix", str(tmp_path / "m")]) == 0
    assert len(docs_of(tmp_path / "m")) == 12
    assert merge_mod.main(["--input", a, "--input", b, "--output-prefix", str(tmp_path / "m2")]) == 0
    assert docs_of(tmp_path / "m2") == docs_of(tmp_path / "m")

    # build-cip: repeated --input-prefix / --natural-prefix / --short-prefix all count
    cfg, overwrite = cip.parse_args(["--input-prefix", a, "--input-prefix", b, "--natural-prefix", a,
                                     "--natural-prefix", b, "--short-prefix", a, "--short-prefix", b, "seed=3",
                                     "--output-prefix", str(tmp_path / "c")])
    assert cfg.input_prefixes == [a, b] and cfg.natural_prefixes == [a, b] and cfg.short_prefixes == [a, b]
    assert cfg.seed == 3 and overwrite is False
    assert cip.main(["--input-prefix", a, "--input-prefix", b, "--output-prefix", str(tmp_path / "c"),
                     "--seq-length", "64", "--docs-per-seq", "2", "--chunks-per-doc", "2"]) == 0
    manifest = json.loads((tmp_path / "c.manifest.json").read_text())
    assert [s["prefix"] for s in manifest["sources"]] == [a, b]


# ----------------------------------------------------------------------------- issue 14.15

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 4, vocab_size=300, out_dir=tmp_path_factory.mktemp("bpe"))


def test_megatron_lm_command_line_runs_unchanged(tmp_path, bpe_dir):
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS])
    common = ["--input", str(src), "--json-keys", "text", "--append-eod", "--workers", "1"]
    assert preprocess_main([*common, "--output-prefix", str(tmp_path / "ours"), "--tokenizer-type", "hf",
                            "--tokenizer-model", str(bpe_dir), "--no-progress"]) == 0
    megatron_cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), *common,
                    "--output-prefix", str(tmp_path / "mlm"), "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", str(bpe_dir), "--partitions", "2", "--log-interval", "10",
                    "--keep-sequential-samples", "--keep-newlines"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(megatron_cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "processed 30 documents" in proc.stderr and "--partitions: accepted" in proc.stderr
    for suffix in (".bin", ".idx"):
        assert (Path(f"{tmp_path}/mlm_text_document{suffix}").read_bytes()
                == Path(f"{tmp_path}/ours_text_document{suffix}").read_bytes())


def test_megatron_tokenizer_names_map_to_the_same_ids(tmp_path, bpe_dir):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 4), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=80, model_type="bpe", minloglevel=2, num_threads=1)
    sp_model = str(tmp_path / "sp.model")
    ours = build_tokenizer(TokenizerConfig("sentencepiece", sp_model))
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        tok = build_tokenizer(TokenizerConfig(name, sp_model))
        assert tok.fingerprint == ours.fingerprint and tok.encode(TEXTS[1]) == ours.encode(TEXTS[1])
    assert build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", str(bpe_dir))).fingerprint == \
        build_tokenizer(TokenizerConfig("hf", str(bpe_dir))).fingerprint
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --vocab-file"):
        TokenizerConfig("GPT2BPETokenizer", str(bpe_dir))


def test_gpt2_bpe_from_vocab_and_merges_matches_gpt2_tokenization(tmp_path):
    """GPT2BPETokenizer (vocab.json + merges.txt) gives GPT-2's ids (transformers' slow GPT2Tokenizer
    implements the same algorithm as Megatron-LM's gpt2_tokenization)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TEXTS * 4, vocab_size=400, special_tokens=["<|endoftext|>"])
    trainer.save_model(str(tmp_path))
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    reference = GPT2Tokenizer(str(vocab), str(merges))
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(vocab), merges=str(merges)))
    assert tok.eod_id == json.loads(vocab.read_text())["<|endoftext|>"] and tok.vocab_size == len(reference)
    for text in TEXTS[:5] + ["  spaces\tand\nnewlines  ", "it's 12,345 — ünïcode 🙂", "<|endoftext|> in text"]:
        assert tok.encode(text) == reference.encode(text), text
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS[:4]])
    assert preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "g"), "--tokenizer-type",
                            "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges),
                            "--append-eod", "--workers", "1", "--no-progress"]) == 0
    assert docs_of(dataset_prefix(tmp_path / "g", "text"))[0] == reference.encode(TEXTS[0]) + [tok.eod_id]


def _megatron_lm_reference(records, keys, tokenizer, append_eod, out_prefix):
    """Megatron-LM's tools/preprocess_data.py Encoder.encode + writer, over megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builders = {k: IndexedDatasetBuilder(f"{out_prefix}_{k}_document.bin",
                                         dtype=DType.optimal_dtype(tokenizer.vocab_size)) for k in keys}
    for record in records:
        for key in keys:
            doc_ids, lens = [], []
            for sentence in [record[key]]:
                ids = tokenizer.encode(sentence)
                if ids:
                    doc_ids.extend(ids)
                    lens.append(len(ids))
            if doc_ids and append_eod:
                doc_ids.append(tokenizer.eod_id)
                lens[-1] += 1
            builders[key].add_document(doc_ids, lens)
    for key in keys:
        builders[key].finalize(f"{out_prefix}_{key}_document.idx")


@pytest.mark.parametrize("workers", [1, 2])
def test_empty_documents_kept_as_megatron_lm_does_byte_identical(tmp_path, workers):
    records = [{"text": t, "title": f"title {i}"} for i, t in enumerate(TEXTS[:8])]
    records[2]["text"] = ""
    records[5]["title"] = ""
    records[6]["text"] = "   "  # whitespace encodes to tokens with the byte tokenizer: a normal document
    src = write_jsonl(tmp_path / "in.jsonl", records)
    _megatron_lm_reference(records, ["text", "title"], ByteTokenizer(), True, tmp_path / "ref")
    flags = ["--input", str(src), "--json-keys", "text", "title", "--append-eod", "--no-progress",
             "--workers", str(workers), "--batch-lines", "3"]
    assert preprocess_main([*flags, "--output-prefix", str(tmp_path / "default")]) == 2  # empty is a bad line
    assert preprocess_main([*flags, "--output-prefix", str(tmp_path / "ours"), "--empty-documents", "keep"]) == 0
    for key in ("text", "title"):
        for suffix in (".bin", ".idx"):
            assert (Path(f"{tmp_path}/ours_{key}_document{suffix}").read_bytes()
                    == Path(f"{tmp_path}/ref_{key}_document{suffix}").read_bytes()), (key, suffix)
    assert docs_of(dataset_prefix(tmp_path / "ours", "text"))[2] == []


def test_numpy_writer_is_byte_identical_to_megatron_core_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int32, np.uint8):
        docs = []
        for _ in range(40):
            lengths = rng.integers(0, 9, size=int(rng.integers(0, 4))).tolist()
            docs.append((rng.integers(0, 200, size=sum(lengths)), [n for n in lengths if n] or []))
        docs = [(t[: sum(lengths)], lengths) for t, lengths in docs]
        theirs = IndexedDatasetBuilder(str(tmp_path / "t.bin"), dtype=dtype)
        ours = BinIdxBuilder(tmp_path / "o.bin", dtype)
        for tokens, lengths in docs:
            theirs.add_document(tokens, lengths)
            ours.add_document(tokens, lengths)
        theirs.finalize(str(tmp_path / "t.idx"))
        ours.finalize(tmp_path / "o.idx")
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"o{suffix}").read_bytes() == (tmp_path / f"t{suffix}").read_bytes()
        both = BinIdxBuilder(tmp_path / "b.bin", dtype)  # add_index, as merge-datasets uses it
        both.add_index(tmp_path / "o")
        both.add_index(tmp_path / "t")
        both.finalize(tmp_path / "b.idx")
        theirs = IndexedDatasetBuilder(str(tmp_path / "tb.bin"), dtype=dtype)
        theirs.add_index(str(tmp_path / "o"))
        theirs.add_index(str(tmp_path / "t"))
        theirs.finalize(str(tmp_path / "tb.idx"))
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"b{suffix}").read_bytes() == (tmp_path / f"tb{suffix}").read_bytes()


def test_data_commands_import_neither_torch_nor_megatron_core(tmp_path):
    a = pre(tmp_path, "a", TEXTS[:10])
    chats = write_jsonl(tmp_path / "chat.jsonl", chat(5))
    script = f"""
import sys
from megatron_longsky.cli import main
src = {str(tmp_path / 'a.jsonl')!r}
assert main(["preprocess", "--input", src, "--output-prefix", {str(tmp_path / 'x')!r}, "--workers", "2",
             "--no-progress"]) == 0
assert main(["merge-datasets", "--input", {a!r}, "--output-prefix", {str(tmp_path / 'm')!r}]) == 0
assert main(["build-cip", "--input-prefix", {a!r}, "--output-prefix", {str(tmp_path / 'c')!r},
             "--seq-length", "64", "--docs-per-seq", "2", "--chunks-per-doc", "2"]) == 0
assert main(["preprocess-sft", "--input", {str(chats)!r}, "--output-prefix", {str(tmp_path / 's')!r},
             "--no-progress"]) == 0
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("megatron.core"))
print("HEAVY", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "Transformer Engine" not in proc.stderr  # megatron-core's import warnings


# ----------------------------------------------------------------------------- issue 16.1

def test_truncated_bin_is_refused_naming_the_file(tmp_path, capsys):
    a = pre(tmp_path, "a", TEXTS[:10])
    b = pre(tmp_path, "b", TEXTS[10:20])
    bin_b = Path(b + ".bin")
    bin_b.write_bytes(bin_b.read_bytes()[:-7])
    with pytest.raises(IndexedDatasetError, match=r"b_text_document\.bin: .* truncated"):
        check_pair(b)
    assert merge_mod.main(["--input", a, b, "--output-prefix", str(tmp_path / "m")]) == 2
    assert "b_text_document.bin" in capsys.readouterr().err and not (tmp_path / "m.idx").exists()
    assert cip.main(["--input-prefix", a, b, "--output-prefix", str(tmp_path / "c"), "--seq-length", "64"]) == 2
    assert "b_text_document.bin" in capsys.readouterr().err and not (tmp_path / "c.idx").exists()
    with pytest.raises(IndexedDatasetError, match="truncated"):
        open_indexed(b)
    from megatron_longsky.training.config import DataConfig
    from megatron_longsky.training.data import check_dataset_tokenizers

    with pytest.raises(IndexedDatasetError, match=r"b_text_document\.bin"):
        check_dataset_tokenizers(DataConfig(prefixes=[a, b]), ByteTokenizer())
    Path(a + ".idx").write_bytes(Path(a + ".idx").read_bytes()[:-8])  # a truncated .idx as well
    with pytest.raises(IndexedDatasetError, match=r"a_text_document\.idx: .*truncated"):
        check_pair(a)


# ----------------------------------------------------------------------------- issue 16.2

def test_outputs_never_replace_inputs_and_need_overwrite(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:6]])
    a = pre(tmp_path, "a", TEXTS[:6])
    chats = write_jsonl(tmp_path / "chat.jsonl", chat(4))
    cip_flags = ["--seq-length", "64", "--docs-per-seq", "2", "--chunks-per-doc", "2"]
    commands = {
        "preprocess": (preprocess_main, ["--input", str(src), "--output-prefix", str(tmp_path / "p"),
                                         "--no-progress"], tmp_path / "p_text_document.idx"),
        "preprocess-sft": (sft_main, ["--input", str(chats), "--output-prefix", str(tmp_path / "s"),
                                      "--no-progress"], Path(sft_prefixes(tmp_path / "s")[1] + ".idx")),
        "merge-datasets": (merge_mod.main, ["--input", a, "--output-prefix", str(tmp_path / "m")],
                           tmp_path / "m.idx"),
        "build-cip": (cip.main, ["--input-prefix", a, "--output-prefix", str(tmp_path / "c"), *cip_flags],
                      tmp_path / "c.idx"),
    }
    for name, (main, argv, marker) in commands.items():
        assert main(argv) == 0, name
        capsys.readouterr()
        before = marker.stat().st_mtime_ns
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "already exists: pass --overwrite" in err and err.count("\n") == 1, (name, err)
        assert marker.stat().st_mtime_ns == before
        assert main([*argv, "--overwrite"]) == 0, name
    # an output over an input is refused even with --overwrite
    before = Path(a + ".bin").read_bytes()
    assert cip.main(["--input-prefix", a, "--output-prefix", a, "--overwrite", *cip_flags]) == 2
    assert "is also an input" in capsys.readouterr().err and Path(a + ".bin").read_bytes() == before
    assert cip.main(["--input-prefix", str(tmp_path / "c"), "--natural-prefix", a, "--natural-ratio", "0.5",
                     "--output-prefix", a, "--overwrite", *cip_flags]) == 2
    assert "is also an input" in capsys.readouterr().err
    jsonl_named_like_output = write_jsonl(tmp_path / "q_text_document.bin", [{"text": "x"}])
    assert preprocess_main(["--input", str(jsonl_named_like_output), "--output-prefix", str(tmp_path / "q"),
                            "--overwrite", "--no-progress"]) == 2
    assert "is also an input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 16.3

def _version(prefix, expected: dict) -> str:
    """'old' / 'new' when the files read as one complete version, 'refused' when readers refuse
    them, 'mix' when they read as complete but mix versions (the failure to prevent)."""
    try:
        check_pair(prefix)
    except IndexedDatasetError:
        return "refused"
    docs = docs_of(prefix)
    meta = read_meta(prefix)
    sources = json.dumps(meta.get("sources") or meta.get("inputs"))
    described = "old" if "old.jsonl" in sources else "new"
    # (loss masks of the two versions may be equal: the content must match what the sidecar describes)
    return described if expected[described][prefix] == docs else "mix"


@pytest.mark.parametrize("kind", ["preprocess-two-keys", "sft-pair"])
def test_overwrite_switches_every_file_together_when_failing_at_each_step(tmp_path, monkeypatch, kind):
    # old and new data have the same lengths, so only the switch order (not the size check) keeps them apart
    if kind == "sft-pair":
        old_src = write_jsonl(tmp_path / "old.jsonl", chat(6))
        new_src = write_jsonl(tmp_path / "new.jsonl", [json.loads(json.dumps(r).replace('"q', '"Q'))
                                                       for r in chat(6)])
        prefixes = list(sft_prefixes(tmp_path / "out"))

        def run(src):
            return sft_main(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--overwrite",
                             "--no-progress"])
    else:
        records = [{"text": t, "title": f"title {i}"} for i, t in enumerate(TEXTS[:6])]
        old_src = write_jsonl(tmp_path / "old.jsonl", records)
        new_src = write_jsonl(tmp_path / "new.jsonl", [{k: v.upper() for k, v in r.items()} for r in records])
        prefixes = [dataset_prefix(tmp_path / "out", k) for k in ("text", "title")]

        def run(src):
            return preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--json-keys",
                                    "text", "title", "--overwrite", "--no-progress"])

    real_replace, real_unlink = os.replace, Path.unlink
    steps = {"n": 0, "fail_at": None}

    def step():
        steps["n"] += 1
        if steps["n"] == steps["fail_at"]:
            raise OSError(f"injected failure at step {steps['n']}")

    def replace(a, b):
        step()
        return real_replace(a, b)

    def unlink(self, missing_ok=False):
        if ".tmp-" not in self.name and not self.name.endswith(".lock"):  # removing an old marker or a
            # journal is a step; cleaning temporaries or releasing the output lock is not
            step()
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(indexed_mod.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    expected = {}
    for version, src in (("old", old_src), ("new", new_src)):
        steps["n"] = 0
        assert run(src) == 0
        expected[version] = {p: docs_of(p) for p in prefixes}
    assert expected["old"] != expected["new"]
    total = steps["n"]  # the steps of one switch over an existing output
    seen = set()
    for fail_at in range(1, total + 1):
        steps.update(n=0, fail_at=None)
        assert run(old_src) == 0
        steps.update(n=0, fail_at=fail_at)
        assert run(new_src) == 2
        states = [_version(p, expected) for p in prefixes]
        seen.update(states)
        # both datasets old or both new: never a mix, never one refused (issue 22: never neither)
        assert len(set(states)) == 1 and states[0] in ("old", "new"), (fail_at, states)
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".switch" in p.name], fail_at
    assert seen == {"old", "new"}
    # two journals written, two old markers removed, 3 renames per dataset, two journals removed
    assert total == 2 + 2 + 3 * 2 + 2


# ----------------------------------------------------------------------------- issue 16.10

def test_json_nested_100000_deep_is_a_bad_line(tmp_path, capsys):
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:3]], raw_lines=[deep])
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "p"), "--no-progress"]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{src}:4: invalid JSON: nested too deeply" in err and err.count("\n") == 1
    assert preprocess_main([*argv, "--skip-bad-lines"]) == 0
    assert "invalid_json=1" in capsys.readouterr().out
    deep_chat = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    chats = write_jsonl(tmp_path / "chat.jsonl", chat(3), raw_lines=[deep_chat])
    argv = ["--input", str(chats), "--output-prefix", str(tmp_path / "s"), "--no-progress"]
    assert sft_main(argv) == 2
    assert f"{chats}:4: invalid JSON: nested too deeply" in capsys.readouterr().err
    assert sft_main([*argv, "--skip-bad-lines"]) == 0


# ----------------------------------------------------------------------------- issue 16.6 (the pool)

def test_worker_pool_keeps_order_raises_in_order_and_reports_a_dead_worker():
    from megatron_longsky.data.workers import WorkerError, ordered_map

    assert list(ordered_map(abs, range(-40, 0), workers=2)) == list(range(40, 0, -1))
    with pytest.raises(ValueError, match="invalid literal"):
        list(ordered_map(int, ["1", "2", "x", "4"], workers=2))
    with pytest.raises(WorkerError, match="died"):  # a worker killed (here: exits) is an error, never a hang
        list(ordered_map(os._exit, [3, 3, 3], workers=2))
