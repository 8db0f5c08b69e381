"""Preprocessing: jsonl inputs -> Megatron indexed datasets readable by megatron-core."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_longsky.data import indexed as indexed_mod
from megatron_longsky.data.indexed import dataset_prefix, open_indexed
from megatron_longsky.data.jsonl import CorpusError, expand_inputs
from megatron_longsky.data.metadata import TokenizerMismatchError, check_tokenizer, read_meta
from megatron_longsky.data.preprocess import PreprocessConfig, build_parser, main, preprocess
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, build_tokenizer, train_bpe_tokenizer

DOCS = [
    {"text": f"This is document {i} of the set. It talks about tables and needles! Does it end? Yes, it does. " * (1 + i % 4),
     "title": f"Title {i}"}
    for i in range(40)
]


def write_jsonl(path: Path, records=(), raw_lines=(), gz=False) -> Path:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    data += b"".join(raw_lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def documents(prefix) -> list[np.ndarray]:
    ds = open_indexed(prefix)
    docs = ds.document_indices
    return [np.concatenate([ds[j] for j in range(docs[i], docs[i + 1])]) for i in range(len(docs) - 1)]


def run(tmp_path, inputs, **kwargs) -> tuple:
    cfg = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / "out" / "corpus"),
                           progress=False, **kwargs)
    return preprocess(cfg), cfg


def test_inputs_files_gz_dirs_globs_and_two_keys(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:10])
    write_jsonl(tmp_path / "in" / "sub" / "b.jsonl.gz", DOCS[10:25], gz=True)
    write_jsonl(tmp_path / "in" / "c.jsonl", DOCS[25:])
    (tmp_path / "in" / "notes.txt").write_text("not a corpus file")
    # a directory is searched recursively in sorted order; a glob expands sorted
    assert [p.name for p in expand_inputs([str(tmp_path / "in")])] == ["a.jsonl", "c.jsonl", "b.jsonl.gz"]
    assert [p.name for p in expand_inputs([str(tmp_path / "in" / "*.jsonl")])] == ["a.jsonl", "c.jsonl"]
    with pytest.raises(CorpusError, match="matches no files"):
        expand_inputs([str(tmp_path / "in" / "*.parquet")])
    with pytest.raises(CorpusError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])

    inputs = [tmp_path / "in" / "a.jsonl", tmp_path / "in" / "sub" / "b.jsonl.gz", tmp_path / "in" / "c.jsonl"]
    stats, cfg = run(tmp_path, inputs, json_keys=["text", "title"], append_eod=True)
    tok = ByteTokenizer()
    assert stats.documents == len(DOCS) and stats.bad_lines == {}
    for key in ("text", "title"):
        prefix = dataset_prefix(cfg.output_prefix, key)
        assert prefix.endswith(f"corpus_{key}_document")
        got = documents(prefix)
        assert [tok.decode(d[:-1]) for d in got] == [d[key] for d in DOCS]
        assert all(d[-1] == tok.eod_id for d in got)
        ds = open_indexed(prefix)
        assert ds.index.dtype == np.uint16 and len(ds) == len(DOCS)
        meta = read_meta(prefix)
        assert meta["tokenizer"] == tok.metadata() and meta["json_key"] == key
        assert meta["documents"] == len(DOCS) and meta["tokens"] == stats.tokens[key] == int(ds.sequence_lengths.sum())
        check_tokenizer(prefix, tok.fingerprint, required=True)
        with pytest.raises(TokenizerMismatchError):
            check_tokenizer(prefix, "hf-0000000000000000")
    # no temporary files left behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe_tokenizer([d["text"] for d in DOCS], vocab_size=320, out_dir=tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("split", [True, False], ids=["sentences", "documents"])
def test_output_identical_for_any_worker_count_with_hf(tmp_path, bpe_dir, split):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    outputs = {}
    for workers in (1, 2):
        cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / f"w{workers}"), workers=workers,
                               tokenizer=TokenizerConfig("hf", str(bpe_dir)), split_sentences=split,
                               append_eod=True, batch_lines=3, progress=False)
        preprocess(cfg)
        prefix = dataset_prefix(cfg.output_prefix, "text")
        outputs[workers] = (Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes())
    assert outputs[1] == outputs[2]
    tok = build_tokenizer(TokenizerConfig("hf", str(bpe_dir)))
    ds = open_indexed(dataset_prefix(str(tmp_path / "w2"), "text"))
    assert (len(ds) > len(DOCS)) == split
    got = documents(dataset_prefix(str(tmp_path / "w2"), "text"))
    assert [tok.decode(d[:-1]) for d in got] == [d["text"] for d in DOCS]


def test_split_sentences_makes_each_sentence_an_item(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    stats, cfg = run(tmp_path, [src], split_sentences=True, append_eod=True)
    assert stats.sentence_splitter and "punkt" in stats.sentence_splitter
    prefix = dataset_prefix(cfg.output_prefix, "text")
    ds = open_indexed(prefix)
    tok = ByteTokenizer()
    assert len(ds) > stats.documents  # more items (sentences) than documents
    assert read_meta(prefix)["sequences"] == len(ds)
    for i, doc in enumerate(DOCS[:8]):
        start, end = ds.document_indices[i], ds.document_indices[i + 1]
        items = [ds[j] for j in range(start, end)]
        assert len(items) >= 4 * (1 + i % 4) - 1  # about four sentences per repeat
        # the items concatenate back to the document; only the last ends with EOD
        assert tok.decode(np.concatenate(items)) == doc["text"] + "<eod>"
        assert all(tok.eod_id not in it for it in items[:-1]) and items[-1][-1] == tok.eod_id
        assert tok.decode(items[0]).strip() == f"This is document {i} of the set."


BAD_LINES = {
    "invalid_json": b'{"text": "unterminated\n',
    "invalid_utf8": b'{"text": "caf\xe9 latin-1"}\n',
    "missing_key": b'{"body": "no text key"}\n',
    "non_string": b'{"text": 42}\n',
    "empty": b'{"text": "   "}\n',
    "not_object": b'["a", "list"]\n',
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tmp_path, kind):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS[:3], raw_lines=[BAD_LINES[kind]])
    with pytest.raises(CorpusError, match=rf"in\.jsonl:4: .*--skip-bad-lines"):
        run(tmp_path, [src])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_skip_bad_lines_counts_by_kind_and_keeps_good_documents(tmp_path, capsys):
    raw = [BAD_LINES[k] for k in sorted(BAD_LINES)]
    raw += [b'{"text": "lone \\ud800 surrogate"}\n', b"\n", b'{"text": "good last"}\n']
    src = write_jsonl(tmp_path / "in.jsonl", DOCS[:5], raw_lines=raw, gz=True)
    prefix = str(tmp_path / "cli")
    assert main(["--input", str(src), "--output-prefix", prefix, "--no-progress"]) == 2
    assert "in.jsonl:6:" in capsys.readouterr().err  # first bad line, named by file and line
    assert main(["--input", str(src), "--output-prefix", prefix, "--skip-bad-lines", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "45 documents" not in out and "6 documents" in out
    for kind in BAD_LINES:
        assert f"{kind}=" in out
    assert "invalid_utf8=2" in out and "blank lines ignored: 1" in out
    meta = read_meta(dataset_prefix(prefix, "text"))
    assert meta["bad_lines"]["invalid_utf8"] == 2 and meta["documents"] == 6
    got = documents(dataset_prefix(prefix, "text"))
    assert ByteTokenizer().decode(got[-1]) == "good last"


def test_exception_mid_write_leaves_no_finished_or_temporary_file(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    calls = {"n": 0}
    original = indexed_mod.IndexedDatasetWriter.add_document

    def failing(self, tokens, lengths):
        calls["n"] += 1
        if calls["n"] == 25:
            raise RuntimeError("disk full (injected)")
        return original(self, tokens, lengths)

    monkeypatch.setattr(indexed_mod.IndexedDatasetWriter, "add_document", failing)
    with pytest.raises(RuntimeError, match="injected"):
        run(tmp_path, [src], json_keys=["text", "title"], batch_lines=4)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_no_file_that_looks_finished(tmp_path, sig):
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_longsky.cli", "preprocess", "--input", str(fifo),
         "--output-prefix", str(prefix), "--batch-lines", "1", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    temp_bin = tmp_path / f".killed_text_document.bin.tmp-{proc.pid}"
    try:
        with open(fifo, "wb") as writer:  # blocks until the tool opens the pipe
            for record in DOCS:
                writer.write(json.dumps(record).encode() + b"\n")
            writer.flush()
            deadline = time.monotonic() + 60
            # wait until the run is mid-write (its temporary .bin holds data), then kill it
            # while it waits for more input: the pipe is still open, so it cannot finish
            while not (temp_bin.exists() and temp_bin.stat().st_size > 0):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir() if p != fifo)
    assert not [n for n in names if not n.startswith(".")], names  # nothing under a final name
    if sig == signal.SIGTERM:
        assert names == [] and proc.returncode != 0  # cleaned up on the way out
    else:
        assert temp_bin.name in names
        # the next run over the same prefix removes what the killed one left and completes
        src = write_jsonl(tmp_path / "in.jsonl", DOCS[:3])
        preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(prefix), progress=False))
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        assert len(documents(dataset_prefix(prefix, "text"))) == 3


def test_dataset_works_with_megatron_gpt_dataset_builder(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_longsky.tokenizer.megatron import to_megatron_tokenizer

    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    stats, cfg = run(tmp_path, [src], append_eod=True)
    prefix = dataset_prefix(cfg.output_prefix, "text")
    tok = ByteTokenizer()
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=64, blend=([prefix], None), split="100,0,0",
        tokenizer=to_megatron_tokenizer(tok), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"), mid_level_dataset_surplus=0.005,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [16, None, None], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= 16
    stream = np.concatenate(documents(prefix))
    for i in range(4):
        sample = train[i]
        tokens = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
        assert len(tokens) == 65
        text = tok.decode(tokens)
        # every sample is a window of the (shuffled) document stream: its pieces are real text
        assert any(piece and piece in tok.decode(stream) for piece in text.split("<eod>"))


def test_command_line_has_megatron_flag_names(tmp_path):
    args = build_parser().parse_args([
        "--input", "a.jsonl", "--input", "dir", "--output-prefix", "p", "--json-keys", "text", "title",
        "--tokenizer-type", "hf", "--tokenizer-model", "tok", "--append-eod", "--workers", "3",
        "--split-sentences", "--skip-bad-lines"])
    assert args.input == ["a.jsonl", "dir"] and args.json_keys == ["text", "title"] and args.workers == 3
    assert args.append_eod and args.split_sentences and args.skip_bad_lines
    with pytest.raises(ValueError, match="workers"):
        PreprocessConfig(inputs=["a"], output_prefix="p", workers=0)
    assert main(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "p")]) == 2


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(min_size=1).filter(lambda t: t.strip()), min_size=1, max_size=6), st.booleans())
def test_roundtrip_property(texts, append_eod):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        stats, cfg = run(tmp, [src], append_eod=append_eod, batch_lines=2)
        tok = ByteTokenizer()
        got = [tok.decode(d) for d in documents(dataset_prefix(cfg.output_prefix, "text"))]
        assert got == [t + ("<eod>" if append_eod else "") for t in texts]
