"""The quickstart corpus built from the Python installation's own text."""

from __future__ import annotations

import json

from megatron_longsky.data.builtin_corpus import build_builtin_corpus, in_split
from megatron_longsky.data.indexed import dataset_prefix, open_indexed
from megatron_longsky.data.preprocess import PreprocessConfig, preprocess


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_deterministic_mostly_prose_varied_and_bounded(tmp_path):
    stats = build_builtin_corpus(tmp_path / "a.jsonl", max_bytes=400_000, seed=0)
    build_builtin_corpus(tmp_path / "b.jsonl", max_bytes=400_000, seed=0)
    build_builtin_corpus(tmp_path / "c.jsonl", max_bytes=400_000, seed=1)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    docs = read(tmp_path / "a.jsonl")
    assert len(docs) == stats["documents"] >= 100
    sizes = [len(d["text"].encode()) for d in docs]
    assert sum(sizes) == stats["bytes"] <= 400_000
    assert stats["bytes"] > 300_000
    # mostly English prose: topics and docstrings, code at most its share
    prose = sum(s for s, d in zip(sizes, docs) if d["source"] != "code")
    assert prose >= 0.65 * sum(sizes)
    assert {d["source"] for d in docs} == {"topic", "docstring", "code"}
    assert max(sizes) > 20 * sorted(sizes)[len(sizes) // 2]  # varied lengths, some long documents
    assert len({d["name"] for d in docs}) == len(docs)
    assert all(d["text"].strip() for d in docs)


def test_train_and_heldout_are_disjoint_by_name(tmp_path):
    build_builtin_corpus(tmp_path / "train.jsonl", max_bytes=300_000, split="train")
    heldout_stats = build_builtin_corpus(tmp_path / "heldout.jsonl", max_bytes=100_000, split="heldout")
    train = {d["name"] for d in read(tmp_path / "train.jsonl")}
    heldout = {d["name"] for d in read(tmp_path / "heldout.jsonl")}
    assert heldout and train and not train & heldout
    assert heldout_stats["documents"] == len(heldout)
    assert all(in_split(n, "heldout", 0.05) and not in_split(n, "train", 0.05) for n in heldout)


def test_corpus_preprocesses_into_a_dataset(tmp_path):
    stats = build_builtin_corpus(tmp_path / "corpus.jsonl", max_bytes=150_000)
    cfg = PreprocessConfig(inputs=[str(tmp_path / "corpus.jsonl")], output_prefix=str(tmp_path / "ds"),
                           append_eod=True, progress=False)
    result = preprocess(cfg)
    ds = open_indexed(dataset_prefix(cfg.output_prefix, "text"))
    assert len(ds) == stats["documents"] == result.documents
    assert result.tokens["text"] == stats["bytes"] + stats["documents"]  # bytes + one EOD each


def test_recall_documents_repeat_their_facts_further_on(tmp_path):
    import random
    import re

    from megatron_longsky.data.builtin_corpus import with_recalls

    text = "\n".join(f"Line {i} of an ordinary document, long enough to be repeated." for i in range(60))
    out = with_recalls(text, random.Random(0))
    facts = re.findall(r"(?:The|the) ([a-z ]+) (?:of|for) ([A-Z][a-z]+(?:-[A-Z][a-z]+)?) is (\d+)\.", out)
    assert facts
    for attr, key, value in facts:
        first = out.index(f"{attr} of {key} is {value}" if f"{attr} of {key}" in out else f"{attr} for {key} is {value}")
        assert out.count(value) >= 2 and out.rindex(value) > first  # recalled further on
    assert all(3 <= len(v) <= 6 for v in re.findall(r"\b\d+\b", out) if not out.count(f"Line {v} "))
    assert "Check: " in out  # the key/value list block
    assert all(line in out for line in text.split("\n"))  # the document itself is kept, in order


def test_recall_fraction_changes_training_documents_only(tmp_path):
    stats = build_builtin_corpus(tmp_path / "train.jsonl", max_bytes=200_000, seed=0, recall_fraction=0.5)
    docs = read(tmp_path / "train.jsonl")
    recall = [d for d in docs if d["source"] == "recall"]
    assert 0.3 * len(docs) < len(recall) < 0.7 * len(docs)
    assert all(d["name"].startswith("recall:") for d in recall)
    assert stats["documents_by_source"]["recall"] == len(recall)
    plain = build_builtin_corpus(tmp_path / "plain.jsonl", max_bytes=200_000, seed=0)
    assert "recall" not in plain["documents_by_source"]
