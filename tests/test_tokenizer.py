"""Tokenizers: byte / HF / SentencePiece behind one interface, padding, fingerprints."""

from __future__ import annotations

import argparse
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longsky.data.metadata import TokenizerMismatchError, check_tokenizer, write_meta
from megatron_longsky.tokenizer import (
    ByteTokenizer,
    TokenizerConfig,
    add_tokenizer_args,
    build_tokenizer,
    pad_vocab_size,
    tokenizer_config_from_args,
    train_bpe_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Long context training needs long documents and careful data. ",
    "Tables, numbers 12345 and unicode: héllo wörld, 日本語, emoji 🙂.",
    "def f(x):\n    return x * 2  # code is text too\n",
] * 20


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, vocab_size=400, out_dir=tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(out / "sp"), vocab_size=120,
        model_type="bpe", character_coverage=1.0, pad_id=3, minloglevel=2, num_threads=1,
    )
    return out / "sp.model"


def test_byte_tokenizer_roundtrip_and_specials():
    tok = build_tokenizer(TokenizerConfig())
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eod_id, tok.pad_id} == {256, 257, 258}
    assert tok.decode([104, 105, tok.eod_id]) == "hi<eod>"
    assert tok.token_to_id("<eod>") == tok.eod_id and tok.token_to_id("a") == 97
    assert tok.token_to_id("é") is None and tok.token_to_id("<nope>") is None
    # a window cut inside a multi-byte character decodes with U+FFFD, not an exception
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    assert tok.decode(tok.encode("日本")[1:]) .endswith("本")
    assert [list(a) for a in tok.encode_batch_arrays(["ab", ""])] == [[97, 98], []]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([999])


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_roundtrip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "vocab,divisible,expected",
    [(32000, 128, 32000), (32001, 128, 32128), (259, 128, 384), (128256, 128, 128256),
     (50257, 128, 50304), (65519, 128, 65536), (7, 1, 7)],
)
def test_padded_vocab_size_is_fixed_by_the_model_config(vocab, divisible, expected):
    # A multiple of make_vocab_size_divisible_by only: never of the TP size (issue 15.1).
    assert pad_vocab_size(vocab, divisible) == expected
    with pytest.raises(ValueError):
        pad_vocab_size(vocab, 0)


def test_bpe_training_and_hf_tokenizer(bpe_dir):
    tok = build_tokenizer(TokenizerConfig(type="hf", model=str(bpe_dir)))
    same_file = build_tokenizer(TokenizerConfig(type="hf", model=str(bpe_dir / "tokenizer.json")))
    assert tok.type == "hf" and tok.vocab_size <= 400
    assert (tok.bos_id, tok.eod_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_to_id("</s>") == tok.eod_id and tok.token_to_id("no-such-token") is None
    text = "The quick brown fox 🙂 héllo"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eod_id not in ids  # never adds specials
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "", "dog."]) == [ids, [], tok.encode("dog.")]
    assert [list(a) for a in tok.encode_batch_arrays([text])] == [ids]
    assert same_file.fingerprint == tok.fingerprint and same_file.encode(text) == ids
    assert tok.chat_template is None
    meta = tok.metadata()
    assert set(meta) == {"type", "model", "fingerprint", "vocab_size", "eod_id", "bos_id", "pad_id"}
    json.dumps(meta)


def test_hf_directory_loads_in_transformers_and_reads_chat_template(bpe_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = build_tokenizer(TokenizerConfig(type="hf", model=str(bpe_dir)))
    assert hf("hello world", add_special_tokens=False)["input_ids"] == tok.encode("hello world")
    assert hf.eos_token_id == tok.eod_id

    templated = tmp_path / "templated"
    templated.mkdir()
    (templated / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    assert build_tokenizer(TokenizerConfig("hf", str(templated))).chat_template == config["chat_template"]


def test_hf_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(TokenizerConfig("hf", str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer(TokenizerConfig("hf", str(tmp_path)))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        build_tokenizer(TokenizerConfig("hf", str(bad)))


def test_sentencepiece_tokenizer(sp_model):
    tok = build_tokenizer(TokenizerConfig(type="sentencepiece", model=str(sp_model)))
    assert tok.vocab_size == 120 and tok.eod_id == 2 and tok.bos_id == 1 and tok.pad_id == 3
    text = "The quick brown fox jumps."
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eod_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "lazy dog"]) == [ids, tok.encode("lazy dog")]
    assert tok.token_to_id("</s>") == tok.eod_id and tok.token_to_id("zzzzqqq") is None
    assert tok.padded_vocab_size(64) == 128
    assert tok.fingerprint.startswith("sentencepiece-")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        bad = sp_model.parent / "bad.model"
        bad.write_bytes(b"garbage")
        build_tokenizer(TokenizerConfig("sentencepiece", str(bad)))


def test_fingerprints_distinguish_tokenizers_and_are_stable(bpe_dir, sp_model, tmp_path):
    byte = ByteTokenizer()
    hf = build_tokenizer(TokenizerConfig("hf", str(bpe_dir)))
    sp = build_tokenizer(TokenizerConfig("sentencepiece", str(sp_model)))
    assert len({byte.fingerprint, hf.fingerprint, sp.fingerprint}) == 3
    assert ByteTokenizer().fingerprint == byte.fingerprint
    # re-serialising the same tokenizer.json (formatting only) keeps the fingerprint
    compact = tmp_path / "compact"
    compact.mkdir()
    (compact / "tokenizer.json").write_text(json.dumps(json.loads((bpe_dir / "tokenizer.json").read_text())))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (compact / name).write_bytes((bpe_dir / name).read_bytes())
    assert build_tokenizer(TokenizerConfig("hf", str(compact))).fingerprint == hf.fingerprint
    # a different vocabulary changes it
    other = train_bpe_tokenizer(TEXTS[:4], vocab_size=300, out_dir=tmp_path / "other")
    assert build_tokenizer(TokenizerConfig("hf", str(other))).fingerprint != hf.fingerprint


def test_dataset_tokenizer_mismatch_is_a_clear_error(tmp_path, bpe_dir):
    prefix = tmp_path / "corpus_text_document"
    byte = ByteTokenizer()
    hf = build_tokenizer(TokenizerConfig("hf", str(bpe_dir)))
    write_meta(prefix, {"tokenizer": byte.metadata()})
    check_tokenizer(prefix, byte.fingerprint)  # same tokenizer: fine
    with pytest.raises(TokenizerMismatchError, match="re-run preprocessing") as err:
        check_tokenizer(prefix, hf.fingerprint)
    assert byte.fingerprint in str(err.value) and hf.fingerprint in str(err.value)
    with pytest.raises(TokenizerMismatchError, match="missing"):
        check_tokenizer(tmp_path / "nothing", byte.fingerprint, required=True)


def test_config_and_command_line_args(sp_model):
    parser = argparse.ArgumentParser()
    add_tokenizer_args(parser)
    cfg = tokenizer_config_from_args(parser.parse_args([]))
    assert cfg == TokenizerConfig("byte", None)
    cfg = tokenizer_config_from_args(parser.parse_args(
        ["--tokenizer-type", "sentencepiece", "--tokenizer-model", str(sp_model)]))
    assert build_tokenizer(cfg).type == "sentencepiece"
    with pytest.raises(SystemExit, match="needs a model path"):
        tokenizer_config_from_args(parser.parse_args(["--tokenizer-type", "hf"]))
    with pytest.raises(ValueError, match="takes no model"):
        TokenizerConfig("byte", "x.model")
    with pytest.raises(ValueError, match="not one of"):
        TokenizerConfig("gpt2")


def test_bpe_split_digits_gives_one_token_per_digit(tmp_path):
    directory = train_bpe_tokenizer(TEXTS + ["order 123456 and 98765 again 4242"] * 20, vocab_size=400,
                                    out_dir=tmp_path / "digits", split_digits=True)
    tok = build_tokenizer(TokenizerConfig(type="hf", model=str(directory)))
    text = "The code of Kelvo is 4829301."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("4829301")
    # The value on its own (how the needle scorer encodes answers) has the same digit tokens.
    assert [tok.decode([i]) for i in tok.encode(" 4829301")][-7:] == list("4829301")
