"""preprocess-sft end to end, and the packed training dataset built on its output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_longsky.data.metadata import TokenizerMismatchError, read_meta
from megatron_longsky.sft.dataset import PackedSFTDataset, collate_packed, plan_cache_path
from megatron_longsky.sft.formats import parse_record
from megatron_longsky.sft.preprocess import main, sft_prefixes
from megatron_longsky.sft.template import ChatTemplate
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, build_tokenizer, train_bpe_tokenizer


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = "question " * int(rng.integers(1, 6)) + str(i)
        a = "answer " * int(rng.integers(1, 12)) + str(i)
        shape = i % 3
        if shape == 0:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif shape == 1:
            out.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                          {"from": "human", "value": "more"}, {"from": "gpt", "value": a[::-1]}]})
        else:
            out.append({"instruction": q, "input": "ctx" if i % 2 else "", "output": a})
    return out


def _write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    records = _records(60)
    src = _write_jsonl(d / "chat.jsonl", records)
    assert main(["--input", str(src), "--output-prefix", str(d / "chat"), "--system-prompt", "Be brief.",
                 "--no-progress"]) == 0
    return d / "chat", records


def test_outputs_are_megatron_indexed_datasets_aligned_with_the_template(sft_data):
    prefix, records = sft_data
    tokens_prefix, mask_prefix = sft_prefixes(prefix)
    tokens = IndexedDataset(tokens_prefix)
    masks = IndexedDataset(mask_prefix)
    assert len(tokens) == len(masks) == len(records)
    template = ChatTemplate(ByteTokenizer())
    for i, record in enumerate(records):
        ids, mask = template.encode(parse_record(record, "x", system_prompt="Be brief."))
        assert np.array_equal(tokens[i], ids) and np.array_equal(masks[i], mask)
    meta = read_meta(tokens_prefix)
    assert meta["tokenizer"]["fingerprint"] == ByteTokenizer().fingerprint
    assert meta["kind"] == "sft_tokens" and read_meta(mask_prefix)["kind"] == "sft_loss_mask"
    assert meta["sft"]["chat_template"]["name"] == "longsky-v1"
    assert meta["sft"]["summary"]["samples"] == len(records)


def test_bad_lines_stop_with_file_and_line_or_are_skipped_and_counted(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _records(4),
                       ['{"messages": [{"role": "user", "content": "x"}]}', "{not json",
                        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}'])
    prefix = tmp_path / "out"
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--no-progress"]) == 2
    assert f"{src}:5:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [src], "a failed run must leave no output (not even temporary files)"
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--skip-bad-lines", "--no-progress"]) == 0
    summary = read_meta(sft_prefixes(prefix)[0])["sft"]["summary"]
    assert summary["samples"] == 4
    assert summary["bad_lines"] == {"no_assistant": 1, "invalid_json": 1, "empty_turn": 1}


def test_worker_processes_give_identical_output(sft_data, tmp_path):
    prefix, records = sft_data
    src = _write_jsonl(tmp_path / "chat.jsonl", records * 3)
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "w"), "--system-prompt", "Be brief.",
                 "--workers", "2", "--no-progress"]) == 0
    for ours, ref in zip(sft_prefixes(tmp_path / "w"), sft_prefixes(prefix)):
        a, b = IndexedDataset(ours), IndexedDataset(ref)
        assert len(a) == 3 * len(b)
        assert all(np.array_equal(a[i], b[i % len(b)]) for i in range(len(a)))


def test_overlong_samples_truncate_or_drop(tmp_path):
    records = [{"instruction": "q", "output": "a" * 10}, {"instruction": "q", "output": "long " * 50},
               {"instruction": "p" * 300, "output": "x"}]
    src = _write_jsonl(tmp_path / "in.jsonl", records)
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "t"), "--max-length", "100",
                 "--no-progress"]) == 0
    s = read_meta(sft_prefixes(tmp_path / "t")[0])["sft"]["summary"]
    # sample 1 is cut inside its answer; sample 2's prompt alone fills 100 tokens: nothing to learn
    assert (s["samples"], s["truncated"], s["dropped_no_target"]) == (2, 1, 1)
    assert int(IndexedDataset(sft_prefixes(tmp_path / "t")[0]).sequence_lengths.max()) <= 100
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "d"), "--max-length", "100",
                 "--overlong", "drop", "--no-progress"]) == 0
    s = read_meta(sft_prefixes(tmp_path / "d")[0])["sft"]["summary"]
    assert (s["samples"], s["dropped_overlong"], s["truncated"]) == (1, 2, 0)


def test_hf_tokenizer_flags(tmp_path):
    tok_dir = train_bpe_tokenizer(["question answer more ctx " * 20] * 10, 300, tmp_path / "tok")
    src = _write_jsonl(tmp_path / "in.jsonl", _records(5))
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "h"), "--tokenizer-type", "hf",
                 "--tokenizer-model", str(tok_dir), "--no-progress"]) == 0
    tok = build_tokenizer(TokenizerConfig(type="hf", model=str(tok_dir)))
    ds = PackedSFTDataset(tmp_path / "h", 256)
    ds.check_tokenizer(tok)
    with pytest.raises(TokenizerMismatchError):
        ds.check_tokenizer(ByteTokenizer())


def _segments(item):
    cu = item["cu_seqlens"].tolist()
    return [{k: item[k][a:b] for k in ("tokens", "labels", "loss_mask", "position_ids")}
            for a, b in zip(cu[:-1], cu[1:])]


@pytest.mark.parametrize("pad_to_multiple", [1, 4])
def test_packed_rows_hold_exactly_the_unpacked_samples(sft_data, pad_to_multiple):
    prefix, records = sft_data
    seq = 512
    packed = PackedSFTDataset(prefix, seq, pad_to_multiple=pad_to_multiple, seed=3)
    unpacked = PackedSFTDataset(prefix, seq, pad_to_multiple=pad_to_multiple, unpacked=True)
    assert len(unpacked) == len(records) and len(packed) < len(records) / 3
    tokens_ds = IndexedDataset(sft_prefixes(prefix)[0])
    masks_ds = IndexedDataset(sft_prefixes(prefix)[1])
    pad = ByteTokenizer().pad_id
    unpacked_row = {int(unpacked.samples_of_row(r)[0]): r for r in range(len(unpacked))}
    seen = []
    for i in range(len(packed)):
        item = packed[i]
        assert item["tokens"].shape == (seq,) and item["tokens"].dtype == torch.int64
        assert item["loss_mask"].dtype == torch.float32 and item["cu_seqlens"].dtype == torch.int32
        cu = item["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == seq and torch.all(cu % pad_to_multiple == 0)
        segments = _segments(item)
        samples = packed.samples_of_row(i)
        assert len(segments) in (len(samples), len(samples) + 1)
        for seg, sample in zip(segments, samples):
            seen.append(int(sample))
            ids, mask = tokens_ds[sample], masks_ds[sample]
            n = len(ids)
            assert np.array_equal(seg["tokens"][:n].numpy(), ids) and torch.all(seg["tokens"][n:] == pad)
            assert np.array_equal(seg["labels"][:n - 1].numpy(), ids[1:])  # next token of the same sample
            assert np.array_equal(seg["loss_mask"][:n - 1].numpy(), mask[1:].astype(np.float32))
            assert torch.all(seg["loss_mask"][n - 1:] == 0)  # last token and padding carry no loss
            assert torch.equal(seg["position_ids"], torch.arange(len(seg["tokens"])))
            ref = _segments(unpacked[unpacked_row[int(sample)]])[0]
            for key in seg:
                assert torch.equal(seg[key], ref[key]), key
        if len(segments) > len(samples):
            assert torch.all(segments[-1]["loss_mask"] == 0) and torch.all(segments[-1]["tokens"] == pad)
    assert sorted(seen) == list(range(len(records)))
    total_packed = sum(float(packed[i]["loss_mask"].sum()) for i in range(len(packed)))
    total_unpacked = sum(float(unpacked[i]["loss_mask"].sum()) for i in range(len(unpacked)))
    assert total_packed == total_unpacked > 0
    assert 0.5 < packed.fill_rate() <= 1.0


def test_plan_is_cached_beside_the_dataset_and_deterministic(sft_data):
    prefix, _ = sft_data
    first = PackedSFTDataset(prefix, 384, pad_to_multiple=2, seed=0)
    again = PackedSFTDataset(prefix, 384, pad_to_multiple=2, seed=0)
    other_seed = PackedSFTDataset(prefix, 384, pad_to_multiple=2, seed=1)
    from megatron_longsky.sft.dataset import dataset_fingerprint
    tokens_prefix = sft_prefixes(prefix)[0]
    assert plan_cache_path(tokens_prefix, 384, 2, dataset_fingerprint(tokens_prefix)).exists()
    assert again.plan_was_cached and not first.plan_was_cached
    assert np.array_equal(first.plan.sample_ids, again.plan.sample_ids)
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    assert sorted(map(tuple, (other_seed.samples_of_row(i) for i in range(len(first))))) == \
        sorted(map(tuple, (first.samples_of_row(i) for i in range(len(first)))))
    with pytest.raises(ValueError, match="multiple of pad_to_multiple"):
        PackedSFTDataset(prefix, 385, pad_to_multiple=2)


def test_long_samples_truncate_and_collate_gives_thd_boundaries(sft_data):
    prefix, _ = sft_data
    ds = PackedSFTDataset(prefix, 64, pad_to_multiple=4)
    assert ds.truncated_samples > 0
    batch = collate_packed([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 64)
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == 128 and torch.all(cu[1:] > cu[:-1])
    assert 64 in cu.tolist() and int(batch["max_seqlen"]) == int((cu[1:] - cu[:-1]).max())


class _TinyCausalLM(torch.nn.Module):
    """Embeddings + learned positions + one attention layer whose mask comes from cu_seqlens."""

    def __init__(self, vocab=259, dim=16, max_pos=512):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_pos, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, position_ids, cu_seqlens):
        s = tokens.shape[0]
        segment = torch.bucketize(torch.arange(s), cu_seqlens[1:].long(), right=True)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        mask = causal & (segment[:, None] == segment[None, :])
        h = self.embed(tokens) + self.pos(position_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None])[0]
        return self.out(h + attn)


def _loss_sum_and_count(model, ds):
    total, count = 0.0, 0.0
    for i in range(len(ds)):
        item = ds[i]
        logits = model(item["tokens"], item["position_ids"], item["cu_seqlens"])
        losses = torch.nn.functional.cross_entropy(logits, item["labels"], reduction="none")
        total = total + (losses * item["loss_mask"]).sum()
        count += float(item["loss_mask"].sum())
    return total, count


def test_packed_and_unpacked_sft_losses_and_gradients_are_equal(sft_data):
    prefix, _ = sft_data
    results = []
    for unpacked in (False, True):
        model = _TinyCausalLM()
        ds = PackedSFTDataset(prefix, 512, pad_to_multiple=4, unpacked=unpacked)
        total, count = _loss_sum_and_count(model, ds)
        loss = total / count  # per-token normalisation over the whole batch
        loss.backward()
        results.append((float(loss), count, [p.grad.clone() for p in model.parameters()], len(ds)))
    (packed_loss, packed_n, packed_grads, packed_rows), (ref_loss, ref_n, ref_grads, ref_rows) = results
    assert packed_rows < ref_rows and packed_n == ref_n > 0
    assert packed_loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(packed_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
