"""Needle sweep: exact prompt construction, deterministic scoring, reports, HF backend."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _eval_backends import CopyBackend
from megatron_longsky.eval import (
    Haystack, HFBackend, LogitsBackend, NeedleConfig, depth_grid, exact_match, load_result,
    run_needle, write_comparison, write_report,
)
from megatron_longsky.eval.needle import NeedleBuilder
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, build_tokenizer, train_bpe_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

BYTE = ByteTokenizer()
HAYSTACK = Haystack.default()
LONGEST_SENTENCE = 1 + max(len(s.encode()) for s in HAYSTACK.sentences)  # tokens <= bytes + the space


def count_subsequence(seq, sub):
    n = len(sub)
    return sum(1 for i in range(len(seq) - n + 1) if seq[i:i + n] == sub)


@pytest.fixture(scope="module")
def bpe():
    from megatron_longsky.eval.haystack import default_sentences

    texts = [" ".join(default_sentences(200, seed=s)) for s in range(3)] + ["0123456789 special magic number"]
    directory = train_bpe_tokenizer(texts, 400, __import__("tempfile").mkdtemp(prefix="needle-bpe-"))
    return build_tokenizer(TokenizerConfig("hf", str(directory)))


def check_sample(tok, cfg, sample, length, depth):
    context = sample.context
    targets = [n for n in sample.needles if n["role"] == "target"]
    assert len(targets) == cfg.num_needles
    assert len(sample.needles) == cfg.num_needles + cfg.num_distractors
    budget = len(context) - sum(n["tokens"] for n in sample.needles)
    for case in sample.cases:
        # The whole prompt is exactly the requested length, context spliced unchanged.
        assert len(case.prompt_ids) == length
        offset = case.meta["context_offset"]
        assert case.prompt_ids[offset:offset + len(context)] == context
    text = tok.decode(context)
    for needle in sample.needles:
        ids = tok.encode(" " + cfg.needle.format(key=needle["key"], value=needle["value"]))
        # Present exactly once, at the recorded offset, as its own encoding (no specials).
        assert count_subsequence(context, ids) == 1
        assert context[needle["offset"]:needle["offset"] + len(ids)] == ids
        assert not set(ids) & {tok.bos_id, tok.eod_id, tok.pad_id}
        assert text.count(cfg.needle.format(key=needle["key"], value=needle["value"])) == 1
        assert text.count(needle["value"]) == 1
        # At a sentence boundary: the start, or right after a sentence's final period.
        before = tok.decode(context[:needle["offset"]])
        assert needle["offset"] == 0 or before.rstrip().endswith(".")
    # The first target sits at the boundary nearest the requested depth.
    first = targets[0]
    longest_sentence = LONGEST_SENTENCE
    assert abs(first["depth"] * budget - depth / 100 * budget) <= longest_sentence
    if depth == 0:
        # The start, or just after a leading sentence fragment of the window.
        assert first["offset"] <= longest_sentence
        assert tok.decode(context[first["offset"] + first["tokens"]:])[:1] in (" ", "")
    if depth == 100 and cfg.num_distractors == 0:
        assert first["offset"] + first["tokens"] == len(context)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(700, 2000), depth=st.sampled_from([0.0, 10.0, 33.3, 50.0, 90.0, 100.0]),
       needles=st.integers(1, 3), distractors=st.integers(0, 3), seed=st.integers(0, 10_000))
def test_prompt_construction_is_exact_byte(length, depth, needles, distractors, seed):
    cfg = NeedleConfig(lengths=[length], depths=[depth], num_needles=needles, num_distractors=distractors, seed=seed)
    builder = NeedleBuilder(cfg, BYTE, HAYSTACK)
    check_sample(BYTE, cfg, builder.build(length, 0, depth, 0), length, depth)


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_prompt_construction_is_exact_bpe(bpe, mode):
    cfg = NeedleConfig(lengths=[300, 777], num_depths=5, num_needles=2, num_distractors=2, mode=mode, samples=2)
    if mode == "chat":
        bpe.chat_template = CHAT_TEMPLATE
    builder = NeedleBuilder(cfg, bpe, HAYSTACK)
    for length, j, depth, s in builder.grid():
        sample = builder.build(length, j, depth, s)
        check_sample(bpe, cfg, sample, length, depth)
        prompt = sample.cases[0].prompt_ids
        if mode == "chat":
            # The template's BOS text became the BOS id, once, at the start only.
            assert prompt[0] == bpe.bos_id and prompt.count(bpe.bos_id) == 1
            assert bpe.decode(prompt).rstrip().endswith(cfg.answer_prefix.format(key=sample.cases[0].meta["key"]))
        else:
            assert prompt[0] == bpe.bos_id and prompt.count(bpe.bos_id) == 1
    bpe.chat_template = None


def test_chat_template_special_tokens_become_ids(tmp_path):
    # Byte and SentencePiece tokenizers do not parse "<bos>" / "<s>" in text: the
    # template's BOS must still be the BOS id, once, at the start.
    import sentencepiece as spm

    from megatron_longsky.eval.haystack import default_sentences

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(default_sentences(300) + ["0123456789 - abcdefghijklmnopqrstuvwxyz ?"]),
        model_prefix=str(tmp_path / "sp"), vocab_size=150,
        model_type="bpe", character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    sp = build_tokenizer(TokenizerConfig("sentencepiece", str(tmp_path / "sp.model")))
    for tok in (ByteTokenizer(), sp):
        cfg = NeedleConfig(lengths=[700], depths=[50], mode="chat", chat_template=None)
        tok.chat_template = CHAT_TEMPLATE
        sample = NeedleBuilder(cfg, tok, HAYSTACK).build(700, 0, 50.0, 0)
        prompt = sample.cases[0].prompt_ids
        assert len(prompt) == 700 and prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1
        check_sample(tok, cfg, sample, 700, 50.0)


def test_fixed_seed_gives_identical_prompts_and_seed_changes_them():
    cfg = NeedleConfig(lengths=[400], num_depths=3, samples=2, num_distractors=1)
    a = [NeedleBuilder(cfg, BYTE, HAYSTACK).build(*g) for g in NeedleBuilder(cfg, BYTE, HAYSTACK).grid()]
    b = [NeedleBuilder(cfg, BYTE, Haystack.default()).build(*g) for g in NeedleBuilder(cfg, BYTE, HAYSTACK).grid()]
    assert [c.prompt_ids for s in a for c in s.cases] == [c.prompt_ids for s in b for c in s.cases]
    # Samples within a cell differ from each other.
    assert a[0].cases[0].prompt_ids != a[1].cases[0].prompt_ids
    other = NeedleConfig(lengths=[400], num_depths=3, samples=2, num_distractors=1, seed=1)
    c = [NeedleBuilder(other, BYTE, HAYSTACK).build(*g) for g in NeedleBuilder(other, BYTE, HAYSTACK).grid()]
    assert all(x.cases[0].prompt_ids != y.cases[0].prompt_ids for x, y in zip(a, c))


def test_too_short_length_is_a_clear_error():
    cfg = NeedleConfig(lengths=[40], depths=[50])
    with pytest.raises(ValueError, match="length 40 is too short"):
        NeedleBuilder(cfg, BYTE, HAYSTACK).build(40, 0, 50.0, 0)


def test_depth_grids():
    assert depth_grid(11) == [float(10 * i) for i in range(11)]
    sig = depth_grid(11, "sigmoid")
    assert sig[0] == 0.0 and sig[-1] == 100.0 and sig == sorted(sig)
    # Sigmoid spacing: finer steps near both ends than in the middle.
    assert sig[1] - sig[0] < 10 < sig[6] - sig[5]
    assert depth_grid(1) == [50.0]
    with pytest.raises(ValueError):
        depth_grid(3, "cubic")


def test_exact_match_rules():
    assert exact_match(" 4821739.", ["4821739"])
    assert exact_match("4821739\nmore text", ["4821739"])
    assert exact_match(" 4821739. Every gardener follows", ["4821739"])
    assert exact_match("12, 34 and 56.", ["56", "12", "34"])
    assert not exact_match("about 4821739", ["4821739"])
    assert not exact_match("482173", ["4821739"])
    assert not exact_match("12, 34", ["12", "34", "56"])


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_copying_model_passes_every_cell(mode):
    cfg = NeedleConfig(lengths=[600, 1000], num_depths=3, samples=2, num_needles=2, num_distractors=2,
                       mode=mode, chat_template=None)
    tok = ByteTokenizer()
    tok.chat_template = CHAT_TEMPLATE
    result = run_needle(cfg, CopyBackend(tok.vocab_size), tok, model_name="copy", haystack=HAYSTACK)
    assert result.accuracy == 1.0 and result.longest_length_all_passed() == 1000
    case = result.cells[0].samples[0].cases[0]
    assert case.passed and case.answers[0] in case.prediction


def test_short_window_model_fails_deep_needles_only():
    # Sees 250 tokens back: a needle at the end of a 600-token context (about 190
    # tokens before the answer) is found, needles at 0% and 50% are not.
    cfg = NeedleConfig(lengths=[600], depths=[0, 50, 100], samples=2)
    result = run_needle(cfg, CopyBackend(BYTE.vocab_size, window=250), BYTE, haystack=HAYSTACK)
    assert result.cell(600, 0.0).accuracy == 0.0
    assert result.cell(600, 50.0).accuracy == 0.0
    assert result.cell(600, 100.0).accuracy == 1.0
    assert result.longest_length_all_passed() is None
    failed = result.cell(600, 0.0).samples[0].cases[0]
    assert failed.correct_tokens < failed.answer_tokens


def test_report_files(tmp_path):
    cfg = NeedleConfig(lengths=[600, 900], depths=[0, 100], samples=1)
    result = run_needle(cfg, CopyBackend(BYTE.vocab_size, window=250), BYTE, model_name="win250", haystack=HAYSTACK)
    paths = write_report(result, tmp_path / "report")
    assert set(paths) == {"png", "json", "md"}
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads(open(paths["json"]).read())
    assert len(data["cells"]) == 4 and data["cells"][0]["samples"][0]["needles"][0]["role"] == "target"
    assert data["accuracy"] == result.accuracy == 0.5
    again = load_result(paths["json"])
    assert again.to_dict() == result.to_dict()
    md = open(paths["md"]).read()
    assert "overall accuracy: **50.0%**" in md and "longest length with all cells passed: **none**" in md
    assert "| 600 | 50.0% | 1/2 |" in md
    assert not list((tmp_path / "report").glob(".*tmp*"))
    # Several runs (e.g. training stages) side by side with one accuracy table.
    perfect = run_needle(cfg, CopyBackend(BYTE.vocab_size), BYTE, haystack=HAYSTACK)
    both = write_comparison({"stage 1": result, "stage 2": perfect}, tmp_path / "report")
    assert open(both["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(both["md"]).read()
    assert "| stage 1 | 50.0% | 50.0% | 50.0% | none |" in table
    assert "| stage 2 | 100.0% | 100.0% | 100.0% | 900 |" in table


def test_hf_backend_matches_transformers_and_recompute(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    backend = HFBackend.from_pretrained(tmp_path / "hf")
    ids = BYTE.encode("The special magic number for amber-otter is 4821739.")
    with torch.no_grad():
        reference = backend.model(torch.tensor([ids])).logits
    assert torch.allclose(backend.logits([ids]), reference, atol=1e-5)
    assert torch.allclose(backend.logits([ids], last_n=3), reference[:, -3:], atol=1e-5)
    # KV-cache generation equals step-by-step recomputation.
    assert backend.generate_greedy(ids, 6) == LogitsBackend.generate_greedy(backend, ids, 6)
    nll = backend.token_nll(ids)
    assert nll.shape == (len(ids) - 1,) and torch.isfinite(nll).all()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFBackend.from_pretrained(tmp_path)


def test_needle_values_never_occur_in_the_haystack():
    # One-digit values and a haystack containing "1": the value is redrawn, never "1".
    haystack = Haystack(["The code is 1.", "Nothing else is here."], "digits")
    cfg = NeedleConfig(lengths=[300], depths=[50], samples=12, value_digits=1)
    builder = NeedleBuilder(cfg, BYTE, haystack)
    values = [builder.build(*g).needles[0]["value"] for g in builder.grid()]
    assert "1" not in values and len(set(values)) > 1
    every_digit = Haystack([f"The code is {d}." for d in range(10)], "all digits")
    with pytest.raises(ValueError, match="keeps containing"):  # a window of 20+ sentences
        NeedleBuilder(cfg, BYTE, every_digit).build(700, 0, 50.0, 0)


def test_haystack_sources(tmp_path):
    import numpy as np

    from megatron_longsky.data.indexed import IndexedDatasetWriter

    docs = ["Dr. Smith went to Washington. He arrived at noon! Was it raining? Nobody knew.",
            "A second document starts here. It has two sentences."]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    writer = IndexedDatasetWriter(tmp_path / "docs", np.uint16)
    for d in docs:
        ids = BYTE.encode(d) + [BYTE.eod_id]
        writer.add_document(np.asarray(ids, dtype=np.uint16), [len(ids)])
    writer.finalize({})
    writer.commit()
    for spec, key in ((str(tmp_path / "corpus.txt"), "text"), (str(tmp_path / "corpus.jsonl"), "body"),
                      (f"indexed:{tmp_path / 'docs'}", "text")):
        haystack = Haystack.from_spec(spec, BYTE, key)
        # Every character kept (whitespace normalised), split into several sentences.
        assert " ".join(haystack.sentences) == " ".join(" ".join(docs).split())
        assert len(haystack.sentences) >= 5 and "Nobody knew." in haystack.sentences
        full = [haystack.sentence_ids(BYTE, i) for i in range(len(haystack.sentences))]
        for n in (50, 51, 52):
            pieces, fragment = haystack.window(BYTE, n, 0)
            assert sum(map(len, pieces)) == n and all(p in full for p in pieces[1:])
            # The first piece is a whole sentence, or (fragment) the tail of one.
            assert (pieces[0] in full) != fragment
            assert any(f[-len(pieces[0]):] == pieces[0] for f in full)
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: no string field 'text'"):
        Haystack.from_file(tmp_path / "corpus.jsonl")
    with pytest.raises(FileNotFoundError):
        Haystack.from_spec(str(tmp_path / "missing.txt"), BYTE)


class PaddedVocabBackend(CopyBackend):
    """A copying model whose vocabulary is padded past the tokenizer's, with the padded
    rows' logits above everything else (as untrained padding rows can be)."""

    def __init__(self, tokenizer_vocab: int, padded: int):
        super().__init__(tokenizer_vocab)
        self.padded = padded

    def logits(self, token_ids, last_n=None):
        real = super().logits(token_ids, last_n)
        out = torch.full((*real.shape[:2], self.padded), 50.0)
        out[..., : real.shape[-1]] = real
        return out


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_ids_beyond_the_tokenizer_are_never_picked(mode):
    tok = ByteTokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = NeedleConfig(lengths=[400], depths=[50], samples=1, mode=mode)
    result = run_needle(cfg, PaddedVocabBackend(tok.vocab_size, tok.vocab_size + 125), tok, haystack=HAYSTACK)
    assert result.accuracy == 1.0


def test_hf_generation_with_a_padded_vocabulary_stays_in_the_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE.vocab_size + 125, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[BYTE.vocab_size:] = 0.0
        model.lm_head.bias = None
        model.model.norm.weight.fill_(1.0)
    # Padding rows win every argmax unless the limit applies: make them dominate.
    with torch.no_grad():
        model.lm_head.weight[BYTE.vocab_size + 3] = model.lm_head.weight[: BYTE.vocab_size].abs().sum(0) * 100
    backend = HFBackend(model)
    ids = BYTE.encode("The special magic number is")
    assert any(t >= BYTE.vocab_size for t in backend.generate_greedy(ids, 4))  # the crash of issue 14.14
    limited = backend.generate_greedy(ids, 8, vocab_size=BYTE.vocab_size)
    assert limited and all(t < BYTE.vocab_size for t in limited)
    BYTE.decode(limited)
    assert LogitsBackend.generate_greedy(backend, ids, 8, vocab_size=BYTE.vocab_size) == limited
