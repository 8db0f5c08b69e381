"""Vocabulary growth (convert/grow_vocab.py) and the alphabet tokenizer it grows from: every
token keeps its rows at its id in the larger tokenizer, the other rows are fresh, every other
tensor is unchanged, and nothing is left behind when the input is wrong."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longsky.convert.grow_vocab import grow_vocabulary, tokenizer_vocabulary
from megatron_longsky.convert.hf_weights import ConversionError
from megatron_longsky.data.retrieval_curriculum import Mix, SampleMaker, write_alphabet_tokenizer, write_curriculum
from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer, train_bpe_tokenizer

TEXTS = ["The parser reads one line at a time and splits it into fields 0123456789."] * 20 + [
    "Sockets connect two processes; a server listens on a port for requests."] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("bpe") / "tok", split_digits=True)


def _small_model(tmp_path, alphabet_dir, hidden=8):
    vocab = tokenizer_vocabulary(alphabet_dir)
    n = max(vocab.values()) + 1
    d = tmp_path / "small"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(n, hidden, generator=g),
               "model.norm.weight": torch.ones(hidden)}, d / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": torch.randn(n, hidden, generator=g),
               "model.layers.0.mlp.down_proj.weight": torch.randn(hidden, hidden, generator=g)},
              d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.norm.weight":
        "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors",
        "model.layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}}))
    (d / "config.json").write_text(json.dumps({"vocab_size": n, "bos_token_id": 0, "eos_token_id": 1}))
    for f in alphabet_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _weights(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_alphabet_tokenizer_and_growth_keep_every_token_row(tmp_path, bpe):
    full = build_tokenizer(TokenizerConfig(type="hf", model=str(bpe)))
    docs = TEXTS
    maker = SampleMaker(full, docs, 64, seed=1, induction_alphabet=12, induction_segment=4)
    alphabet = write_alphabet_tokenizer(bpe, maker.induction_ids, tmp_path / "alphabet")
    small_tok = build_tokenizer(TokenizerConfig(type="hf", model=alphabet["dir"]))
    assert small_tok.vocab_size == alphabet["vocab_size"] == 3 + 12  # specials + alphabet
    assert alphabet["remap"][full.bos_id] == small_tok.bos_id
    # induction samples written in the alphabet's ids decode to the same text
    prefix = tmp_path / "warm"
    stats = write_curriculum(maker, Mix(induction=1), 5, prefix, tokenizer=small_tok, remap=alphabet["remap"])
    assert stats["samples"] == 5
    from megatron_longsky.data.indexed import bin_path, index_dtype

    written = np.fromfile(bin_path(f"{prefix}_tokens_document"), dtype=index_dtype(f"{prefix}_tokens_document"))
    assert written.max() < small_tok.vocab_size
    with pytest.raises(ValueError, match="can be written in the alphabet's ids"):
        write_curriculum(maker, Mix(text=1), 2, tmp_path / "bad", tokenizer=small_tok, remap=alphabet["remap"])
    # keyed samples are alphabet tokens too (they need a longer sequence)
    long_maker = SampleMaker(full, docs, 128, seed=1, induction_alphabet=12, induction_segment=4)
    assert long_maker.induction_ids == maker.induction_ids
    stats = write_curriculum(long_maker, Mix(keyed=1, induction=1), 6, tmp_path / "keyed", tokenizer=small_tok,
                             remap=alphabet["remap"])
    assert stats["samples"] == 6

    small = _small_model(tmp_path, tmp_path / "alphabet")
    before = _weights(small)
    report = grow_vocabulary(small, tmp_path / "grown", bpe, seed=3, embedding_std=1.0, output_std=0.02)
    after = _weights(tmp_path / "grown")
    assert report["vocab"] == full.vocab_size and report["kept_rows"] == small_tok.vocab_size
    small_vocab, large_vocab = tokenizer_vocabulary(small), tokenizer_vocabulary(bpe)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == (full.vocab_size, 8)
        for token, i in small_vocab.items():
            assert torch.equal(after[name][large_vocab[token]], before[name][i]), (name, token)
    fresh = [i for i in range(full.vocab_size) if i not in {large_vocab[t] for t in small_vocab}]
    assert after["model.embed_tokens.weight"][fresh].std().item() == pytest.approx(1.0, rel=0.2)
    assert after["lm_head.weight"][fresh].std().item() == pytest.approx(0.02, rel=0.2)
    for name in ("model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(after[name], before[name])
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["vocab_size"] == full.vocab_size and config["bos_token_id"] == full.bos_id
    assert tokenizer_vocabulary(tmp_path / "grown") == large_vocab  # it carries the large tokenizer
    # same seed, same fresh rows
    grow_vocabulary(small, tmp_path / "again", bpe, seed=3, embedding_std=1.0, output_std=0.02)
    assert torch.equal(_weights(tmp_path / "again")["lm_head.weight"], after["lm_head.weight"])


def test_a_token_missing_from_the_target_is_refused_and_nothing_is_written(tmp_path, bpe):
    alphabet = tmp_path / "alphabet"
    full = build_tokenizer(TokenizerConfig(type="hf", model=str(bpe)))
    write_alphabet_tokenizer(bpe, [full.encode("The")[0]], alphabet)
    small = _small_model(tmp_path, alphabet)
    spec = json.loads((small / "tokenizer.json").read_text())
    spec["model"]["vocab"]["no-such-token"] = len(spec["model"]["vocab"]) + 3
    (small / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConversionError, match="no-such-token"):
        grow_vocabulary(small, tmp_path / "grown", bpe, seed=0, embedding_std=1.0, output_std=0.02)
    assert not (tmp_path / "grown").exists()
