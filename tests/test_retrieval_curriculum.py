"""The retrieval curriculum: fixed-length samples whose loss falls only on what copying predicts,
never the needle test's wording, keys or values, readable by the SFT training dataset."""

import re

import numpy as np
import pytest

from megatron_longsky.data.retrieval_curriculum import Mix, SampleMaker, write_curriculum
from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer

DOCS = [
    "The parser reads one line at a time.\nEach line is split into fields.\nFields are stripped of spaces.\n"
    "A missing field raises an error.\nThe error names the line number.\n",
    "Sockets connect two processes.\nA server listens on a port.\nThe client sends a request.\n"
    "Timeouts close idle connections.\nLogging records every request.\n",
] * 5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(type="byte"))


def maker(tok, seq_length=256, seed=0):
    return SampleMaker(tok, DOCS, seq_length, seed=seed, alphabet=8)


def test_every_kind_is_exactly_seq_length_with_targets(tok):
    m = maker(tok)
    for kind in ("induction", "repeat_small", "repeat_words", "recall", "keyed", "text"):
        for _ in range(20):
            ids, mask = m.sample(kind)
            assert len(ids) == len(mask) == 256, kind
            assert sum(mask) > 0, kind
    _, mask = m.sample("text")
    assert all(mask)


def test_recall_loss_is_on_values_found_earlier_after_their_key(tok):
    m = maker(tok)
    for _ in range(30):
        ids, mask = m.recall()
        text = tok.decode(ids)
        targets = tok.decode([i for i, keep in zip(ids, mask) if keep])
        values = targets.split()
        assert values and all(re.fullmatch(r"\d{3,6}", v) for v in values), targets
        for value in values:
            # each value is stated once in a fact before the questions, then answered
            assert text.count(value) >= 2, (value, text)
        # the masked tokens are exactly the answers: the last token of the sample is a value digit
        assert mask[-1] == 1


def test_repeat_loss_is_on_the_repeat_only(tok):
    m = maker(tok)
    ids, mask = m.repeat(small=True)
    start = mask.index(1)
    repeat = ids[start:]
    assert all(mask[start:]) and not any(mask[:start])
    assert tok.decode(repeat) in tok.decode(ids[:start])  # the copy's source is earlier


def test_induction_targets_are_exactly_the_tokens_a_content_match_predicts(tok):
    m = SampleMaker(tok, DOCS, 128, seed=5, induction_alphabet=16, induction_segment=8)
    assert len(m.induction_ids) == 16
    digits = {tok.encode(d)[0] for d in "0123456789"}
    assert digits <= set(m.induction_ids)  # the needle's values are digits
    assert not {tok.eod_id, tok.bos_id} & set(m.induction_ids)
    source_end = len(m.bos) + (128 - len(m.bos)) // 4
    for _ in range(50):
        ids, mask = m.induction()
        assert len(ids) == len(mask) == 128 and set(ids[len(m.bos):]) <= set(m.induction_ids)
        assert not any(mask[:source_end + 1]) and sum(mask) > 128 // 2
        source = ids[len(m.bos):source_end]
        # every target continues a run (its predecessor and itself) that occurs in the source
        for i, keep in enumerate(mask):
            if keep:
                assert any(source[j:j + 2] == ids[i - 1:i + 1] for j in range(len(source) - 1)), (i, ids)
        # and each chunk's first token (no target) starts a copy of the source
        starts = [i for i in range(source_end, 128) if not mask[i]]
        assert starts[0] == source_end and all(ids[i] in source for i in starts)


def test_never_the_needle_wording_or_seven_digit_values(tok):
    m = maker(tok)
    for _ in range(200):
        text = tok.decode(m.recall()[0])
        assert "magic number" not in text and "provided text" not in text
        assert not re.search(r"(?<!\d)\d{7,}(?!\d)", text)


def test_deterministic_for_a_seed(tok):
    a = [m for m in maker(tok, seed=3).samples(Mix(recall=1, repeat_small=1), 12)]
    b = [m for m in maker(tok, seed=3).samples(Mix(recall=1, repeat_small=1), 12)]
    c = [m for m in maker(tok, seed=4).samples(Mix(recall=1, repeat_small=1), 12)]
    assert a == b and a != c


@pytest.mark.slow  # a subprocess / megatron-core import: tens of seconds on a loaded machine
def test_written_dataset_feeds_the_sft_training_rows(tok, tmp_path):
    from megatron_longsky.sft.dataset import PackedSFTDataset

    out = write_curriculum(maker(tok, seq_length=256), Mix(recall=0.5, text=0.5), 40, tmp_path / "cur",
                           tmp_path / "cur.jsonl")
    assert out["samples"] == 40 and sum(out["counts"].values()) == 40
    assert len((tmp_path / "cur.jsonl").read_text().splitlines()) == out["counts"]["recall"]
    ds = PackedSFTDataset(tmp_path / "cur", 256, unpacked=True)
    assert len(ds) == 40
    masked = sum(int(ds[i]["loss_mask"].sum()) for i in range(len(ds)))
    # each sample's first token is never a target (the mask is shifted onto the labels)
    assert masked == out["target_tokens"] - sum(1 for i in range(40) if ds._masks.get(i, 0, 1)[0])
    assert np.isclose(out["target_tokens"] / out["tokens"], out["target_tokens"] / (40 * 256))


def test_a_mix_needs_a_kind():
    with pytest.raises(ValueError):
        Mix().kinds()


def test_quickstart_report_and_summary_name_the_curriculum(tmp_path):
    """REPORT.md names the curriculum as the stand-in for a pretrained model that retrieves, with
    its share of base iterations; nothing is said when it is off."""
    from megatron_longsky.quickstart.config import QuickstartConfig
    from megatron_longsky.quickstart.context import Context
    from megatron_longsky.quickstart.report_builder import _curriculum_section
    from megatron_longsky.quickstart.runner import StageRecord, StageRunner

    cfg = QuickstartConfig(retrieval_curriculum=True, copy_warmup_iters=200, base_iters=800)
    runner = StageRunner(tmp_path, fingerprint={})
    ctx = Context(cfg, tmp_path, runner)
    assert _curriculum_section(ctx) == ""
    runner.records["curriculum"] = StageRecord("curriculum", 1.0, {
        "warmup": {"samples": 3200, "tokens": 409600, "target_tokens": 90000, "tokenizer": "t", "vocab_size": 67,
                   "counts": {"recall": 1000, "repeat_small": 2000, "repeat_words": 200}},
        "base": {"samples": 12800, "tokens": 1638400, "target_tokens": 1300000,
                 "counts": {"recall": 3200, "induction": 1600, "text": 8000}}})
    text = _curriculum_section(ctx)
    assert "stand-in for a pretrained model that already retrieves" in text
    assert "200 of 1000 base iterations (20%)" in text
    assert "vocabulary is the alphabet's 67 tokens" in text
    assert "recall 3200, induction 1600 of 12800 samples" in text
    # tokens of retrieval samples: the whole warm-up plus the base mix's recall and induction share
    assert f"{(409600 + 1638400 * 4800 / 12800) / (409600 + 1638400):.0%} of the base stage's tokens" in text


def test_aligned_text_samples_are_whole_sequences_of_the_stream(tok):
    stream = np.arange(10 * 64, dtype=np.int64) % 200 + 3  # ten 64-token "CIP sequences" back to back
    m = SampleMaker(tok, DOCS, 64, seed=2, stream=stream, aligned_text=True)
    sequences = {tuple(stream[i * 64:(i + 1) * 64].tolist()) for i in range(10)}
    for _ in range(30):
        ids, mask = m.text()
        assert tuple(ids) in sequences and all(mask)
    with pytest.raises(ValueError, match="aligned"):
        SampleMaker(tok, DOCS, 64, stream=stream[:10], aligned_text=True)


def test_induction_skip_leaves_out_the_most_frequent_tokens_but_keeps_the_digits(tok):
    import numpy as np

    base = SampleMaker(tok, DOCS, 128, seed=5, induction_alphabet=16, induction_segment=8)
    skipped = SampleMaker(tok, DOCS, 128, seed=5, induction_alphabet=16, induction_segment=8, induction_skip=4)
    digits = {tok.encode(d)[0] for d in "0123456789"}
    assert len(skipped.induction_ids) == 16 and digits <= set(skipped.induction_ids)
    counts = np.bincount(base.stream, minlength=1)
    specials = {tok.eod_id, tok.bos_id}
    ranked = [t for t in np.argsort(-counts, kind="stable").tolist()
              if counts[t] and t not in specials and t not in digits]
    assert set(base.induction_ids) - digits == set(ranked[:6])
    assert set(skipped.induction_ids) - digits == set(ranked[4:10])
    with pytest.raises(ValueError, match="induction_skip 100000"):
        SampleMaker(tok, DOCS, 128, seed=5, induction_alphabet=16, induction_skip=100000)
    with pytest.raises(ValueError, match="induction_skip must be >= 0"):
        SampleMaker(tok, DOCS, 128, seed=5, induction_alphabet=16, induction_skip=-1)


def test_keyed_values_are_told_apart_by_the_key_alone(tok):
    """Every asked value follows the same separator as every other record's value, so one token
    of context never picks it; key + separator picks exactly one record."""
    from megatron_longsky.data.retrieval_curriculum import KEYED_RECORDS, KEYED_VALUE_TOKENS

    m = SampleMaker(tok, DOCS, 128, seed=7, induction_alphabet=24)
    for _ in range(50):
        ids, mask = m.keyed()
        assert len(ids) == len(mask) == 128 and set(ids[len(m.bos):]) <= set(m.induction_ids)
        starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
        assert KEYED_RECORDS[0] <= len(starts) <= KEYED_RECORDS[1]
        assert all(mask[s:s + KEYED_VALUE_TOKENS] == [1] * KEYED_VALUE_TOKENS for s in starts)
        assert sum(mask) == len(starts) * KEYED_VALUE_TOKENS
        first = starts[0] - 2  # the queries start here: nothing before them is a target
        assert not any(mask[:first])
        seps = {ids[s - 1] for s in starts}
        assert len(seps) == 1  # one separator for all records
        for s in starts:
            key, sep, value = ids[s - 2], ids[s - 1], ids[s:s + KEYED_VALUE_TOKENS]
            context = ids[:first]
            after_sep = [context[j + 1:j + 1 + KEYED_VALUE_TOKENS] for j in range(len(context)) if context[j] == sep]
            assert len(after_sep) == len(starts) >= 3  # the separator alone: every record
            after_key = [context[j + 2:j + 2 + KEYED_VALUE_TOKENS] for j in range(len(context) - 2)
                         if context[j:j + 2] == [key, sep]]
            assert after_key == [value]  # key + separator: the asked record only


def test_quickstart_report_names_the_keyed_warmup(tmp_path):
    from megatron_longsky.quickstart.config import QuickstartConfig
    from megatron_longsky.quickstart.context import Context
    from megatron_longsky.quickstart.report_builder import _curriculum_section
    from megatron_longsky.quickstart.runner import StageRecord, StageRunner

    cfg = QuickstartConfig(copy_warmup_iters=400, keyed_warmup_iters=200, base_iters=800, base_keyed_share=0.1)
    runner = StageRunner(tmp_path, fingerprint={})
    runner.records["curriculum"] = StageRecord("curriculum", 1.0, {
        "warmup": {"samples": 6400, "tokens": 819200, "target_tokens": 500000, "counts": {"induction": 6400}},
        "keyed": {"samples": 3200, "tokens": 409600, "target_tokens": 60000, "counts": {"keyed": 3200}},
        "base": {"samples": 12800, "tokens": 1638400, "target_tokens": 1300000,
                 "counts": {"recall": 3200, "keyed": 1280, "text": 8320}}})
    text = _curriculum_section(Context(cfg, tmp_path, runner))
    assert "400 of 1400 base iterations" in text and "200 of 1400 base iterations (14%) on keyed samples" in text
    assert "recall 3200, keyed 1280 of 12800 samples" in text
    share = (819200 + 409600 + 1638400 * 4480 / 12800) / (819200 + 409600 + 1638400)
    assert f"{share:.0%} of the base stage's tokens" in text


@pytest.mark.parametrize("overrides", [dict(keyed_warmup_iters=100, copy_warmup_iters=0),
                                       dict(keyed_warmup_iters=100, retrieval_curriculum=False),
                                       dict(base_keyed_share=0.7), dict(base_keyed_share=-0.1)])
def test_quickstart_refuses_keyed_settings_it_would_ignore(overrides):
    from megatron_longsky.quickstart.config import QuickstartConfig

    with pytest.raises(ValueError, match="keyed"):
        QuickstartConfig(**overrides)


@pytest.mark.parametrize("seq_length,alphabet", [(100, 64), (128, 6)])
def test_keyed_samples_that_cannot_fit_are_a_config_error(tok, seq_length, alphabet):
    from megatron_longsky.config import ConfigError

    m = SampleMaker(tok, DOCS, seq_length, seed=1, induction_alphabet=alphabet)
    with pytest.raises(ConfigError, match="too small for a keyed sample"):
        m.keyed()
