"""Merging indexed datasets: order kept, mismatched tokenizers or dtypes refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_longsky.data.indexed import IndexedDatasetError, IndexedDatasetWriter, dataset_prefix, open_indexed
from megatron_longsky.data.merge import MergeError, main, merge_datasets
from megatron_longsky.data.metadata import TokenizerMismatchError, read_meta
from megatron_longsky.data.preprocess import PreprocessConfig, preprocess
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, train_bpe_tokenizer


def make_dataset(tmp_path: Path, name: str, texts, **kwargs) -> str:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / name), progress=False, **kwargs)
    preprocess(cfg)
    return dataset_prefix(cfg.output_prefix, "text")


def decoded_documents(prefix) -> list[str]:
    ds = open_indexed(prefix)
    tok = ByteTokenizer()
    di = ds.document_indices
    return ["|".join(tok.decode(ds[j]) for j in range(di[i], di[i + 1])) for i in range(len(di) - 1)]


def test_merge_keeps_documents_items_and_order(tmp_path, capsys):
    a = make_dataset(tmp_path, "a", ["alpha one. Alpha two.", "beta"], append_eod=True)
    b = make_dataset(tmp_path, "b", ["gamma. Gamma again. And more.", "delta"], append_eod=True, split_sentences=True)
    c = make_dataset(tmp_path, "c", ["epsilon"], append_eod=True)
    out = str(tmp_path / "merged")
    result = merge_datasets([a, b + ".idx", c], out)
    expected = decoded_documents(a) + decoded_documents(b) + decoded_documents(c)
    assert decoded_documents(out) == expected
    assert "gamma. |Gamma again. |And more.<eod>" in expected  # sentence items survive the merge
    ds = open_indexed(out)
    assert result["documents"] == 5 and result["sequences"] == len(ds) == 7
    assert result["tokens"] == int(ds.sequence_lengths.sum())
    meta = read_meta(out)
    assert meta["tokenizer"] == ByteTokenizer().metadata() and meta["merged_from"] == [a, b, c]
    assert meta["append_eod"] is True and meta["split_sentences"] is None  # inputs disagree
    assert meta["documents"] == 5
    # a directory of datasets merges its *.idx in sorted order; the CLI reports counts
    (tmp_path / "dir").mkdir()
    for name, texts in (("y", ["second"]), ("x", ["first"])):
        make_dataset(tmp_path / "dir", name, texts)
    assert main(["--input", str(tmp_path / "dir"), "--output-prefix", str(tmp_path / "from_dir")]) == 0
    assert "2 documents" in capsys.readouterr().out
    assert decoded_documents(tmp_path / "from_dir") == ["first", "second"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_merge_refuses_mismatched_tokenizers(tmp_path, capsys):
    bpe = train_bpe_tokenizer(["some text for a tiny tokenizer"] * 10, 280, tmp_path / "bpe")
    a = make_dataset(tmp_path, "a", ["hello"])
    b = make_dataset(tmp_path, "b", ["hello"], tokenizer=TokenizerConfig("hf", str(bpe)))
    with pytest.raises(TokenizerMismatchError, match="cannot merge.*byte.*hf"):
        merge_datasets([a, b], str(tmp_path / "m"))
    assert main(["--input", a, "--input", b, "--output-prefix", str(tmp_path / "m")]) == 2
    assert "cannot merge" in capsys.readouterr().err
    assert not list(tmp_path.glob("m*")) and not list(tmp_path.glob(".m*"))


def test_merge_refuses_mismatched_dtypes_and_missing_inputs(tmp_path):
    a = make_dataset(tmp_path, "a", ["hello"])
    wide = str(tmp_path / "wide")
    writer = IndexedDatasetWriter(wide, np.int32)  # same tokenizer record, other token dtype
    writer.add_document(np.array([104, 105], dtype=np.int32), [2])
    writer.finalize({"tokenizer": ByteTokenizer().metadata()})
    writer.commit()
    with pytest.raises(MergeError, match="uint16.*int32"):
        merge_datasets([a, wide], str(tmp_path / "m"))
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        merge_datasets([a, str(tmp_path / "nope")], str(tmp_path / "m"))
    Path(a + ".meta.json").unlink()
    with pytest.raises(MergeError, match="meta.json is missing"):
        merge_datasets([a, wide], str(tmp_path / "m"))
    with pytest.raises(MergeError, match="listed twice"):
        merge_datasets([wide, wide], str(tmp_path / "m"))
    with pytest.raises(MergeError, match="also an input"):
        merge_datasets([wide], wide)
