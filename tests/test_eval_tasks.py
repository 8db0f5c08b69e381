"""Passkey, RULER-style tasks and perplexity by position."""

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from _eval_backends import CopyBackend, SolverBackend
from megatron_longsky.eval import Haystack, NeedleConfig
from megatron_longsky.eval.passkey import INSTRUCTION, passkey_config, passkey_haystack, run_passkey
from megatron_longsky.eval.perplexity import (
    PerplexityConfig, bucket_edges, perplexity_by_position, write_perplexity_report,
)
from megatron_longsky.eval.ruler import TASKS, RulerBuilder, RulerConfig, run_ruler, write_ruler_report
from megatron_longsky.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
HAYSTACK = Haystack.default()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# -- reference solvers: right, and deliberately wrong ------------------------------

def solve_vt(text, m, hops=True):
    held, order = set(), []
    for name, _, ref, number in re.findall(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|(\d+))\.", text):
        if number == m.group(1) or (hops and ref in held):
            held.add(name)
            order.append(name)
    return ", ".join(order)


def solve_cwe(text, m, by_count=True):
    words = re.findall(r"\n\d+\. ([a-z]+)", text)
    k = int(m.group(1))
    if by_count:
        counts = Counter(words)
        top = sorted(set(words), key=lambda w: -counts[w])[:k]
    else:
        top = list(dict.fromkeys(words))[:k]
    return ", ".join(sorted(top, key=words.index))


def solve_mv(text, m, all_values=True):
    values = re.findall(rf"special magic numbers for {re.escape(m.group(1))} is: (\d+)", text)
    return ", ".join(values if all_values else values[:1])


VT = re.compile(r"are assigned the value (\d+), they are:")
CWE = re.compile(r"The top (\d+) words that appear most often in the list are:")
MV = re.compile(r"The special magic numbers for ([\w-]+) mentioned in the provided text are")


def right_backend():
    return SolverBackend(BYTE, [(VT, solve_vt), (CWE, solve_cwe), (MV, solve_mv)])


def wrong_backend():
    return SolverBackend(BYTE, [(VT, lambda t, m: solve_vt(t, m, hops=False)),
                                (CWE, lambda t, m: solve_cwe(t, m, by_count=False)),
                                (MV, lambda t, m: solve_mv(t, m, all_values=False))], window=250)


# -- RULER ---------------------------------------------------------------------------

def test_ruler_prompts_are_exact_and_deterministic():
    cfg = RulerConfig(lengths=[900, 1300], samples=2)
    builder = RulerBuilder(cfg, BYTE, HAYSTACK)
    again = RulerBuilder(cfg, BYTE, Haystack.default())
    for task in TASKS:
        for length in cfg.lengths:
            cases = [builder.build(task, length, s) for s in range(2)]
            assert [c.prompt_ids for c in cases] == [again.build(task, length, s).prompt_ids for s in range(2)]
            assert cases[0].prompt_ids != cases[1].prompt_ids
            for case in cases:
                text = BYTE.decode(case.prompt_ids)
                if task == "common_words":
                    # The largest whole list that fits: one more rare word (its entries
                    # are at most 14 bytes each) would not.
                    assert length - cfg.cwe_rare_freq * 14 < len(case.prompt_ids) <= length
                    counts = Counter(re.findall(r"\n\d+\. ([a-z]+)", text))
                    assert all(counts[w] == cfg.cwe_common_freq for w in case.answers)
                    assert sorted(counts.values())[-cfg.cwe_common - 1] == cfg.cwe_rare_freq
                else:
                    assert len(case.prompt_ids) == length
                for answer in case.answers:
                    assert answer in text
                if task == "niah_multikey":
                    assert len(case.meta["needles"]) == 1 + cfg.multikey_distractors
                if task in ("niah_multivalue", "variable_tracking"):
                    for item in case.meta["inserted"]:
                        assert text.count(item["text"]) == 1
                if task == "variable_tracking":
                    assert len(case.answers) == cfg.vt_hops + 1


def test_ruler_scores_right_and_wrong_models(tmp_path):
    cfg = RulerConfig(lengths=[900], samples=2)
    right = run_ruler(cfg, right_backend(), BYTE, model_name="solver", haystack=HAYSTACK)
    assert right.accuracy() == 1.0, [(r["task"], r["prediction"], r["answers"]) for r in right.rows if not r["passed"]]
    wrong = run_ruler(cfg, wrong_backend(), BYTE, haystack=HAYSTACK)
    for task in ("niah_multivalue", "variable_tracking", "common_words"):
        assert wrong.accuracy(task) == 0.0, task
    paths = write_ruler_report(right, tmp_path)
    data = json.loads(open(paths["json"]).read())
    assert data["per_task"]["variable_tracking"]["900"] == 1.0 and len(data["rows"]) == 10
    assert "| common_words | 100.0% |" in open(paths["md"]).read()


def test_ruler_chat_mode_generation():
    cfg = RulerConfig(lengths=[1000], samples=1, mode="chat", tasks=["variable_tracking", "niah_multikey"])
    tok = ByteTokenizer()
    tok.chat_template = CHAT_TEMPLATE
    backend = SolverBackend(tok, [(VT, solve_vt)])
    result = run_ruler(cfg, backend, tok, haystack=HAYSTACK)
    assert result.accuracy() == 1.0
    one_hop = SolverBackend(tok, [(VT, lambda t, m: solve_vt(t, m, hops=False))])
    assert run_ruler(cfg, one_hop, tok, haystack=HAYSTACK).accuracy("variable_tracking") == 0.0


def test_ruler_rejects_unknown_tasks_and_short_lengths():
    with pytest.raises(ValueError, match="unknown RULER task"):
        RulerConfig(tasks=["niah_single", "summarise"])
    with pytest.raises(ValueError, match="too short"):
        RulerBuilder(RulerConfig(lengths=[100]), BYTE, HAYSTACK).build("variable_tracking", 100, 0)


# -- passkey -------------------------------------------------------------------------

def test_passkey_prompt_and_scoring():
    base = NeedleConfig(lengths=[500, 800], depths=[0, 50, 100], samples=1)
    cfg = passkey_config(base)
    from megatron_longsky.eval.needle import NeedleBuilder

    sample = NeedleBuilder(cfg, BYTE, passkey_haystack()).build(800, 1, 50.0, 0)
    text = BYTE.decode(sample.cases[0].prompt_ids)
    value = sample.needles[0]["value"]
    assert len(sample.cases[0].prompt_ids) == 800 and len(value) == 5
    assert text.startswith("<bos>" + INSTRUCTION) and text.count(f"The pass key is {value}.") == 1
    assert "The grass is green." in text and text.endswith("What is the pass key?\nThe pass key is")
    result = run_passkey(base, CopyBackend(BYTE.vocab_size), BYTE)
    assert result.accuracy == 1.0
    windowed = run_passkey(base, CopyBackend(BYTE.vocab_size, window=150), BYTE)
    assert windowed.cell(800, 0.0).accuracy == 0.0 and windowed.cell(800, 100.0).accuracy == 1.0


# -- perplexity by position ------------------------------------------------------------

def test_bucket_edges():
    assert bucket_edges(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert bucket_edges(101, "linear", 4) == [1, 26, 51, 76, 101]


def test_perplexity_by_position_measures_context_use(tmp_path):
    # A periodic document: the copying model can only predict it after one period,
    # so the first positions are expensive and the rest nearly free (ASCII: the
    # jsonl text round-trips to the same bytes).
    period = [int(b) for b in np.random.default_rng(0).integers(32, 127, 40)]
    docs = [period * 8, period * 2, (period * 8)[3:] + period]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": BYTE.decode(d)}) + "\n" for d in docs[:1]))
    backend = CopyBackend(BYTE.vocab_size)
    cfg = PerplexityConfig(data=str(jsonl), length=257, buckets="log2", add_bos=True)
    result = perplexity_by_position(cfg, backend, BYTE)
    # 256 body tokens after BOS: the short second document would be skipped.
    assert result.documents == 1 and result.edges == [1, 2, 4, 8, 16, 32, 64, 128, 256, 257]
    nll = backend.token_nll([BYTE.bos_id] + docs[0][:256]).double()
    buckets = result.buckets()
    for b in buckets:
        assert b["tokens"] == b["end"] - b["start"]
        assert b["nll"] == pytest.approx(float(nll[b["start"] - 1:b["end"] - 1].mean()), rel=1e-6)
    correct = math.log1p((BYTE.vocab_size - 1) * math.exp(-10.0))
    assert buckets[0]["nll"] > 5 and buckets[-2]["nll"] == pytest.approx(correct, rel=1e-4)
    assert buckets[-2]["ppl"] < 1.02 < buckets[2]["ppl"]

    # In-memory documents and an indexed dataset give the same numbers.
    from megatron_longsky.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(tmp_path / "held_out", np.uint16)
    for d in docs:
        writer.add_document(np.asarray(d + [BYTE.eod_id], dtype=np.uint16), [len(d) + 1])
    writer.finalize({})
    writer.commit()
    indexed = perplexity_by_position(PerplexityConfig(data=f"indexed:{tmp_path / 'held_out'}", length=257),
                                     backend, BYTE)
    in_memory = perplexity_by_position(PerplexityConfig(length=257), backend, BYTE, documents=docs)
    assert indexed.documents == in_memory.documents == 2
    assert indexed.nll_sum == pytest.approx(in_memory.nll_sum) and indexed.tokens == in_memory.tokens
    paths = write_perplexity_report(result, tmp_path / "out")
    assert json.loads(open(paths["json"]).read())["buckets"][-2]["tokens"] == 128
    with pytest.raises(ValueError, match="no document"):
        perplexity_by_position(PerplexityConfig(data=str(jsonl), length=5000), backend, BYTE)


def test_perplexity_random_windows_are_seeded_slices(tmp_path):
    # Each document contributes one window at a seeded offset: the same seed the same
    # windows, another seed other ones, and every window a contiguous slice of its document.
    docs = [list(range(10 + d, 10 + d + 200)) for d in range(4)] + [list(range(50))]
    seen = {}

    class Recorder(CopyBackend):
        def token_nll(self, ids):
            seen.setdefault(self.tag, []).append(list(ids))
            return super().token_nll(ids)

    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        backend = Recorder(BYTE.vocab_size)
        backend.tag = tag
        cfg = PerplexityConfig(length=101, window="random", seed=seed, add_bos=True)
        result = perplexity_by_position(cfg, backend, BYTE, documents=docs)
        assert result.documents == 4  # the 50-token document is too short
    assert sorted(seen["a"]) == sorted(seen["b"]) and sorted(seen["a"]) != sorted(seen["c"])
    starts = set()
    for window in seen["a"] + seen["c"]:
        assert window[0] == BYTE.bos_id and len(window) == 101
        body = window[1:]
        assert body == list(range(body[0], body[0] + 100))  # contiguous
        starts.add(body[0])
    assert len(starts - {10, 11, 12, 13}) > 2  # not all at the documents' starts
    first = PerplexityConfig(length=101)
    backend = Recorder(BYTE.vocab_size)
    backend.tag = "start"
    perplexity_by_position(first, backend, BYTE, documents=docs)
    assert sorted(w[1] for w in seen["start"]) == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="window"):
        PerplexityConfig(window="middle")


# -- command lines (tiny Hugging Face model) --------------------------------------------

def test_command_lines_on_a_hf_model(tmp_path, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_longsky.cli import main

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BYTE.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    model = ["--hf-model", str(tmp_path / "hf"), "--tokenizer-type", "byte"]
    out = tmp_path / "out"
    assert main(["needle", *model, "--lengths", "600,700", "--depths", "0,100", "--distractors", "1",
                 "--output", str(out), "needle=The secret code of {key} is {value}."]) == 0
    data = json.loads((out / "needle.json").read_text())
    assert data["config"]["depths"] == [0.0, 100.0] and data["config"]["num_distractors"] == 1
    assert {c["length"] for c in data["cells"]} == {600, 700}
    assert all(n["key"] for c in data["cells"] for s in c["samples"] for n in s["needles"])
    assert "# Needle in a haystack: hf" in capsys.readouterr().out

    assert main(["eval", "passkey", *model, "--lengths", "400", "--depths", "2", "--output", str(out)]) == 0
    assert json.loads((out / "passkey.json").read_text())["config"]["needle"].startswith("The pass key is")
    assert main(["eval", "ruler", *model, "--lengths", "900", "--samples", "1", "--tasks",
                 "variable_tracking,common_words", "--output", str(out), "vt_hops=2"]) == 0
    rows = json.loads((out / "ruler.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["variable_tracking", "common_words"] and len(rows[0]["answers"]) == 3
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "abc " * 200}) + "\n")
    assert main(["eval", "ppl", *model, "--data", str(tmp_path / "docs.jsonl"), "--length", "256",
                 "--output", str(out)]) == 0
    assert json.loads((out / "perplexity.json").read_text())["documents"] == 1

    # Bad input: a clear message and exit code 2, or an argparse error.
    assert main(["needle", *model, "--output", str(out), "samples=zero"]) == 2
    assert "samples" in capsys.readouterr().err
    assert main(["needle", "--output", str(out)]) == 2  # neither --checkpoint nor --hf-model
    assert "one of the arguments --checkpoint --hf-model is required" in capsys.readouterr().err
    assert main(["needle", "--hf-model", str(tmp_path / "hf"), "--output", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
