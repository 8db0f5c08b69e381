"""CIP builder: C++ loop == numpy reference, token tracing, sampling, mixing, errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_longsky._ext_cip_index import build_cip_index as cpp_build
from megatron_longsky._ext_cip_index import gather_tokens
from megatron_longsky.config import ConfigError, from_dict, load_config
from megatron_longsky.data import cip
from megatron_longsky.data.cip import CIPConfig, CIPInputError, build_cip, plan_cip
from megatron_longsky.data.cip_reference import build_cip_index as ref_build
from megatron_longsky.data.metadata import TokenizerMismatchError, write_meta

EOD = 3
STRIDE = 100_000  # input token = (document tag) * STRIDE + offset: every token names its origin
REPO = Path(__file__).resolve().parents[1]


def make_dataset(prefix, lengths, tag_base, fingerprint="fp-A", append_eod=False):
    """Documents whose tokens encode (tag, offset); tags start at ``tag_base`` (>= 1)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for d, n in enumerate(lengths):
        tokens = (tag_base + d) * STRIDE + np.arange(n, dtype=np.int64)
        if append_eod and n:
            tokens[-1] = EOD
        builder.add_document(tokens.astype(np.int32), [n] if n else [])
    builder.finalize(f"{prefix}.idx")
    write_meta(prefix, {"tokenizer": {"type": "byte", "fingerprint": fingerprint, "eod_id": EOD,
                                      "vocab_size": 1 << 30}})
    return str(prefix)


def read_all(prefix):
    ds = IndexedDataset(str(prefix))
    return np.stack([ds[i] for i in range(len(ds))]).astype(np.int64), ds


# ----------------------------------------------------------------------------- the index loop

@st.composite
def loop_inputs(draw):
    num_docs = draw(st.integers(1, 25))
    lengths = np.array(draw(st.lists(st.integers(1, 120), min_size=num_docs, max_size=num_docs)), np.int64)
    sep = draw(st.integers(0, 1))
    n_lo = draw(st.integers(1, min(num_docs, 6)))
    n_hi = draw(st.integers(n_lo, min(num_docs, 6)))
    k_hi = draw(st.integers(1, 6))
    seq_tokens = draw(st.integers(n_hi * (k_hi + sep), 400))
    num_seqs = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    passes = draw(st.integers(1, 8))
    order = np.concatenate([rng.permutation(num_docs) for _ in range(passes)]).astype(np.int64)
    n_per_seq = rng.integers(n_lo, n_hi + 1, num_seqs).astype(np.int64)
    k_per_seq = rng.integers(1, k_hi + 1, num_seqs).astype(np.int64)
    seq_seed = rng.bit_generator.random_raw(num_seqs).astype(np.uint64)
    policy = draw(st.sampled_from([0, 1, 2]))
    chunk_size = draw(st.integers(1, 50))
    interleave = draw(st.booleans())
    return dict(lengths=lengths, order=order, n_per_seq=n_per_seq, k_per_seq=k_per_seq, seq_seed=seq_seed,
                seq_tokens=seq_tokens, sep=sep, policy=policy, chunk_size=chunk_size, interleave=interleave,
                cursor=0)


@settings(max_examples=120, deadline=None)
@given(loop_inputs())
def test_cpp_loop_agrees_with_reference(args):
    got, want = cpp_build(**args), ref_build(**args)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@settings(max_examples=80, deadline=None)
@given(loop_inputs())
def test_loop_segments_trace_to_document_prefixes(args):
    """Each sequence has seq_tokens tokens; each document contributes a prefix of itself,
    chunk after chunk in order; its documents are the next draws of the sampled order."""
    out = cpp_build(**args)
    if out["exhausted"]:
        return
    starts, cursor = out["seq_seg_start"], 0
    for s in range(len(starts) - 1):
        sl = slice(starts[s], starts[s + 1])
        docs, offs, lens = out["seg_doc"][sl], out["seg_off"][sl], out["seg_len"][sl]
        assert lens.sum() == args["seq_tokens"]
        drawn = []
        while len(drawn) < args["n_per_seq"][s] or sum(args["lengths"][x] + args["sep"] for x in drawn) < args["seq_tokens"]:
            drawn.append(int(args["order"][cursor]))
            cursor += 1
        assert set(docs[docs >= 0].tolist()) <= set(drawn)
        if len(set(drawn)) < len(drawn):
            continue  # a tiny pool can repeat a document across a pass boundary: slots are ambiguous
        seen = {}
        for d, o, n in zip(docs, offs, lens):
            if d < 0:
                assert n == 1 and args["sep"] == 1
                continue
            assert o == seen.get(d, 0), "a document continues exactly where its previous chunk ended"
            seen[d] = o + n
            assert o + n <= args["lengths"][d]
        if args["sep"]:
            assert (docs == -1).sum() == len(drawn)  # one EOD per document
    assert cursor == out["cursor"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loop_inputs(), st.integers(1, 3))
def test_gathered_tokens_trace_back_to_document_and_offset(args, workers):
    """Tokens encode (document, offset); the gathered output matches the segments token by
    token, from two source files, for any number of gather threads."""
    out = cpp_build(**args)
    if out["exhausted"]:
        return
    lengths, seq_tokens = args["lengths"], args["seq_tokens"]
    doc_src = np.arange(len(lengths)) % 2
    doc_start = np.zeros(len(lengths), np.int64)
    sources = []
    for src in (0, 1):
        docs = np.nonzero(doc_src == src)[0]
        doc_start[docs] = np.concatenate([[0], np.cumsum(lengths[docs])[:-1]]) if len(docs) else []
        parts = [(d + 1) * STRIDE + np.arange(lengths[d]) for d in docs]
        sources.append(np.concatenate(parts or [np.zeros(0)]).astype(np.int32))
    num_seqs = len(out["seq_seg_start"]) - 1
    buffer = np.full(num_seqs * seq_tokens, -7, np.int32)
    gather_tokens(buffer.view(np.uint8), [x.view(np.uint8) for x in sources], 4, doc_src, doc_start,
                  out["seg_doc"], out["seg_off"], out["seg_len"], out["seq_seg_start"], 0, num_seqs,
                  seq_tokens, np.array([EOD], np.int32).tobytes(), workers)
    expected = [np.full(n, EOD) if d < 0 else (d + 1) * STRIDE + o + np.arange(n)
                for d, o, n in zip(out["seg_doc"], out["seg_off"], out["seg_len"])]
    np.testing.assert_array_equal(buffer, np.concatenate(expected or [np.zeros(0)]))


def test_round_robin_order_with_equal_chunks():
    lengths = np.full(10, 1000, np.int64)
    args = dict(lengths=lengths, order=np.arange(10, dtype=np.int64), n_per_seq=np.array([3, 3], np.int64),
                k_per_seq=np.array([4, 4], np.int64), seq_seed=np.array([1, 2], np.uint64), seq_tokens=120,
                sep=0, policy=0, chunk_size=1, interleave=True, cursor=0)
    for build in (cpp_build, ref_build):
        out = build(**args)
        first = slice(0, out["seq_seg_start"][1])
        assert out["seg_doc"][first].tolist() == [0, 1, 2] * 4  # d1c1 d2c1 d3c1 d1c2 ... d3c4
        assert out["seg_off"][first].tolist() == [0] * 3 + [10] * 3 + [20] * 3 + [30] * 3
        assert out["seg_len"][first].tolist() == [10] * 12
        assert out["distances"].tolist() == [20] * 18  # two other chunks between a document's chunks
        assert out["cut_documents"] == 6 and out["cut_tokens"] == 6 * 960
        concat = build(**{**args, "interleave": False})
        assert concat["seg_doc"][first].tolist() == [0] * 4 + [1] * 4 + [2] * 4


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cip")
    rng = np.random.default_rng(7)
    short = make_dataset(root / "short_text_document", rng.integers(5, 300, 60).tolist() + [0, 0], 1, append_eod=True)
    more = make_dataset(root / "more_text_document", rng.integers(5, 300, 20).tolist(), 500, append_eod=True)
    natural = make_dataset(root / "natural_text_document", rng.integers(1500, 5000, 8).tolist(), 1000)
    shortpool = make_dataset(root / "shortpool_text_document", rng.integers(5, 100, 40).tolist(), 700,
                             append_eod=True)
    lengths = {}
    for prefix, base in ((short, 1), (more, 500), (natural, 1000), (shortpool, 700)):
        ds = IndexedDataset(prefix)
        doc_lengths = np.add.reduceat(np.r_[ds.sequence_lengths, 0], ds.document_indices[:-1])
        doc_lengths[ds.document_indices[:-1] == ds.document_indices[1:]] = 0
        lengths.update({base + d: int(n) for d, n in enumerate(doc_lengths)})
    return {"root": root, "short": short, "more": more, "natural": natural, "shortpool": shortpool,
            "lengths": lengths}


def base_cfg(corpus, name, **kw):
    args = dict(input_prefixes=[corpus["short"], corpus["more"]], output_prefix=str(corpus["root"] / name),
                seq_length=1024, docs_per_seq=3, docs_per_seq_max=5, chunks_per_doc=2, chunks_per_doc_max=4,
                chunking="random", separator="eod", num_sequences=10, seed=11)
    args.update(kw)
    return CIPConfig(**args)


def test_every_output_token_traces_back_to_its_document_and_offset(corpus):
    cfg = base_cfg(corpus, "mix", natural_prefixes=[corpus["natural"]], natural_ratio=1.0,
                   short_prefixes=[corpus["shortpool"]], short_ratio=1.0, cip_ratio=2.0, num_sequences=8, workers=2)
    manifest = build_cip(cfg)
    tokens, ds = read_all(cfg.output_prefix)
    assert tokens.shape == (8, 1024)
    assert ds.document_indices.tolist() == list(range(9))  # one stored document per sequence
    stats = manifest["statistics"]
    assert [stats[k]["sequences"] for k in ("cip", "natural", "short")] == [4, 2, 2]
    assert stats["tokens"] == 8 * 1024

    kinds = check_traces(tokens, corpus["lengths"], "eod")
    assert sorted(kinds) == sorted(["cip"] * 4 + ["natural"] * 2 + ["short"] * 2)
    dist = stats["cip"]["chunk_distance"]
    assert dist["count"] > 0 and dist["max"] < 1024
    assert sum(b["count"] for b in dist["histogram"]) == dist["count"]
    meta = json.loads(Path(cfg.output_prefix + ".meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == "fp-A" and meta["sequences"] == 8
    on_disk = json.loads(Path(cfg.output_prefix + ".manifest.json").read_text())
    assert on_disk["seed"] == 11 and len(on_disk["sources"]) == 4
    assert all(len(s["idx_sha256"]) == 64 for s in on_disk["sources"])


def check_traces(tokens, source_lengths, separator):
    """Every token is (document tag, offset) of a real input token. CIP rows: each document
    slot reads its document front to back without gaps (a slot starts at offset 0), and with
    separator=eod every slot is closed by one EOD. Natural/short rows: one continuous stream
    per kind, a document left only when finished, a cut one continued in the next row.
    Returns the kind of each row."""
    kinds, stream = [], {}
    for row in tokens:
        tags, offsets = row // STRIDE, row % STRIDE
        real = row != EOD
        kind = "natural" if (tags[real] >= 1000).all() else "short" if (tags[real] >= 700).all() else "cip"
        kinds.append(kind)
        slots, previous = {}, None
        for tag, off, is_real in zip(tags, offsets, real):
            if not is_real:
                if kind == "cip" and separator == "eod" and previous is not None:
                    slots[previous[0]].remove(previous[1] + 1)  # that slot is finished
                previous = None
                continue
            assert off < source_lengths[tag], f"document {tag} has no offset {off}"
            if kind == "cip":
                open_slots = slots.setdefault(tag, [])
                if off in open_slots:
                    open_slots[open_slots.index(off)] = off + 1
                else:
                    assert off == 0, f"document {tag}: offset {off} does not continue any slot {open_slots}"
                    open_slots.append(1)
            else:
                last = stream.get(kind)
                if last is None or last[0] != tag or last[1] + 1 != off:
                    if last is not None:  # leaving a document: it must be finished
                        real_length = source_lengths[last[0]] - (1 if last[0] < 1000 else 0)  # minus its EOD
                        assert last[1] + 1 == real_length, f"document {last[0]} left at offset {last[1]}"
                    assert off == 0, f"document {tag} enters at offset {off}"
                stream[kind] = (tag, off)
            previous = (tag, off)
        if kind == "cip" and separator == "eod":
            assert not any(slots.values()), f"document slots without their EOD: {slots}"
    return kinds


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.data())
def test_random_builds_trace_back_to_inputs(corpus, data):
    draw = data.draw
    n_lo, k_lo = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    chunking = draw(st.sampled_from(["equal", "fixed", "random"]))
    kw = dict(seq_length=draw(st.sampled_from([128, 512, 1024])), docs_per_seq=n_lo,
              docs_per_seq_max=draw(st.integers(n_lo, n_lo + 3)), chunks_per_doc=k_lo,
              chunks_per_doc_max=draw(st.integers(k_lo, k_lo + 3)), chunking=chunking,
              chunk_size=draw(st.integers(4, 40)), separator=draw(st.sampled_from(["none", "eod"])),
              mode=draw(st.sampled_from(["cip", "concat"])), num_sequences=draw(st.integers(1, 6)),
              seed=draw(st.integers(0, 10**6)), workers=draw(st.integers(1, 2)),
              natural_ratio=draw(st.sampled_from([0.0, 1.0])), short_ratio=draw(st.sampled_from([0.0, 1.0])),
              natural_prefixes=[corpus["natural"]], short_prefixes=[corpus["shortpool"]])
    name = f"random_{abs(hash(tuple(sorted((k, str(v)) for k, v in kw.items()))))}"
    try:
        cfg = base_cfg(corpus, name, **kw)
    except ValueError:
        return  # N x K does not fit this length: rejected by the config, tested elsewhere
    manifest = build_cip(cfg)
    tokens, _ = read_all(cfg.output_prefix)
    assert tokens.shape == (cfg.num_sequences, cfg.seq_length)
    kinds = check_traces(tokens, corpus["lengths"], cfg.separator)
    stats = manifest["statistics"]
    for kind, key in (("cip", cfg.mode), ("natural", "natural"), ("short", "short")):
        assert kinds.count(kind) == (stats[key]["sequences"] if key in stats else 0)
    assert ("cip" in stats) == (cfg.mode == "cip") and ("concat" in stats) == (cfg.mode == "concat")


def test_deterministic_and_independent_of_workers(corpus):
    one = build_cip(base_cfg(corpus, "w1", workers=1))
    three = build_cip(base_cfg(corpus, "w3", workers=3))
    other_seed = build_cip(base_cfg(corpus, "seed2", seed=12))
    build_cip(base_cfg(corpus, "ref", index_backend="numpy"))
    bins = {n: Path(corpus["root"] / f"{n}.bin").read_bytes() for n in ("w1", "w3", "seed2", "ref")}
    assert bins["w1"] == bins["w3"] == bins["ref"]
    assert bins["w1"] != bins["seed2"]
    assert one["statistics"] == three["statistics"]
    assert other_seed["seed"] == 12


def test_concat_mode_uses_the_same_data(corpus):
    build_cip(base_cfg(corpus, "as_cip"))
    build_cip(base_cfg(corpus, "as_concat", mode="concat"))
    cip_tokens, _ = read_all(corpus["root"] / "as_cip")
    concat_tokens, _ = read_all(corpus["root"] / "as_concat")
    assert not np.array_equal(cip_tokens, concat_tokens)
    np.testing.assert_array_equal(np.sort(cip_tokens, axis=1), np.sort(concat_tokens, axis=1))
    for row in concat_tokens:  # whole documents one after another: tags never come back
        tags = row[row != EOD] // STRIDE
        changes = tags[np.r_[True, tags[1:] != tags[:-1]]]
        assert len(changes) == len(set(changes.tolist()))


def test_sampling_without_replacement_then_new_passes(corpus):
    cfg = base_cfg(corpus, "unused", num_sequences=40)
    table = cip._build_table(cfg, {"cip": cfg.input_prefixes}, EOD)
    pool = table.pool_ids["cip"]
    assert len(pool) == 80 and table.pool_empty["cip"] == 2  # two empty documents are skipped
    plan = plan_cip(cfg, table.content_len, pool, 40)
    order = plan["order"]
    assert len(order) > 2 * len(pool)  # several passes over the pool
    for p in range(len(order) // len(pool)):
        assert sorted(order[p * len(pool):(p + 1) * len(pool)].tolist()) == sorted(pool.tolist())
    stats = cip._pool_stats(plan, pool, 2, 40)
    assert stats["passes"] == -(-len(order) // len(pool)) and stats["documents_used"] == 80


def test_readable_by_gpt_dataset_one_sample_per_sequence(corpus):
    """megatron-core's GPTDataset: each sample is one whole CIP sequence, with or without its
    extra label token (samples start every seq_length tokens and every sequence has that length)."""
    from types import SimpleNamespace

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    cfg = base_cfg(corpus, "gpt", num_sequences=6)
    build_cip(cfg)
    tokens, ds = read_all(cfg.output_prefix)
    stored = sorted(tuple(r) for r in tokens.tolist())
    tok = SimpleNamespace(eod=EOD, pad=-1, vocab_size=1 << 30, unique_identifiers={"class": "test"})
    for extra in (False, True):
        gcfg = GPTDatasetConfig(random_seed=1, sequence_length=1024, blend=None, split="1,0,0", tokenizer=tok,
                                reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                                add_extra_token_to_sequence=extra, create_attention_mask=False,
                                path_to_cache=str(corpus["root"] / f"cache{extra}"))
        num = 5 if extra else 6  # the extra token of the last sample would need a 7th sequence
        gpt = GPTDataset(ds, cfg.output_prefix, np.arange(6, dtype=np.int32), num, Split.train, gcfg)
        samples = [gpt[i] for i in range(num)]
        assert all(tuple(x["tokens"].tolist()) in stored for x in samples)
        assert len({tuple(x["tokens"].tolist()) for x in samples}) == num
        if extra:  # the last label is the first token of the next sequence in the shuffled order
            assert all(x["loss_mask"].all() for x in samples)
            firsts = {r[0] for r in stored}
            assert all(int(x["labels"][-1]) in firsts for x in samples)
        else:  # the last position has no label
            assert all(x["loss_mask"][-1] == 0 and x["loss_mask"][:-1].all() for x in samples)


def test_add_extra_token_and_fixed_chunks(corpus):
    cfg = base_cfg(corpus, "extra", add_extra_token=True, chunking="fixed", chunk_size=50, separator="none",
                   num_sequences=3, docs_per_seq=4, docs_per_seq_max=None)
    manifest = build_cip(cfg)
    tokens, _ = read_all(cfg.output_prefix)
    assert tokens.shape == (3, 1025) and manifest["output"]["sequence_tokens"] == 1025


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="chunks would be empty"):
        CIPConfig(input_prefixes=["x"], output_prefix="o", seq_length=100, docs_per_seq=20, chunks_per_doc=6)
    with pytest.raises(ValueError, match="less than one chunk"):
        CIPConfig(seq_length=100, docs_per_seq=4, chunking="fixed", chunk_size=30)
    with pytest.raises(ConfigError, match="docs_per_seq_max"):
        from_dict(CIPConfig, {"docs_per_seq": 5, "docs_per_seq_max": 3})

    empty = make_dataset(tmp_path / "empty", [0, 0], 1)
    with pytest.raises(CIPInputError, match="no non-empty documents"):
        build_cip(base_cfg(corpus, "bad", input_prefixes=[empty], output_prefix=str(tmp_path / "o1")))
    few = make_dataset(tmp_path / "few", [400, 400], 1)
    with pytest.raises(CIPInputError, match="fewer than docs_per_seq"):
        build_cip(base_cfg(corpus, "bad", input_prefixes=[few], output_prefix=str(tmp_path / "o2")))
    tiny = make_dataset(tmp_path / "tiny", [10] * 6, 1)
    with pytest.raises(CIPInputError, match="less than one sequence"):
        build_cip(base_cfg(corpus, "bad", input_prefixes=[tiny], output_prefix=str(tmp_path / "o3")))
    other = make_dataset(tmp_path / "other", [100] * 10, 1, fingerprint="fp-B")
    with pytest.raises(TokenizerMismatchError, match="fp-B"):
        build_cip(base_cfg(corpus, "bad", input_prefixes=[corpus["short"], other], output_prefix=str(tmp_path / "o4")))
    Path(tiny + ".meta.json").unlink()
    with pytest.raises(TokenizerMismatchError, match="missing"):
        build_cip(base_cfg(corpus, "bad", input_prefixes=[tiny], output_prefix=str(tmp_path / "o5")))
    with pytest.raises(ConfigError, match="natural_prefixes is empty"):
        build_cip(base_cfg(corpus, "bad", natural_ratio=0.5, output_prefix=str(tmp_path / "o6")))
    assert not list(tmp_path.glob("o[0-9]*"))


def test_interrupted_build_leaves_nothing_that_looks_finished(corpus, tmp_path, monkeypatch):
    def crash(plan, table, tmps, *args, **kwargs):
        Path(tmps[0]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cip, "write_sequences", crash)
    with pytest.raises(KeyboardInterrupt):
        build_cip(base_cfg(corpus, "crash", output_prefix=str(tmp_path / "crash")))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI and configs

def test_command_line_and_example_configs(corpus, capsys):
    out = corpus["root"] / "cli"
    argv = ["--output-prefix", str(out), "--seq-length", "512", "--docs-per-seq", "2-4", "--chunks-per-doc", "3",
            "--seed", "5", "--input-prefix", corpus["short"], corpus["more"], "num_sequences=4", "separator=eod"]
    assert cip.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 sequences x 512 tokens" in printed and "distance between consecutive chunks" in printed
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["parameters"]["docs_per_seq_max"] == 4 and manifest["parameters"]["separator"] == "eod"
    assert cip.main(argv[:-2] + ["chunks_per_doc=300"]) == 2
    assert "chunks would be empty" in capsys.readouterr().err

    configs = sorted((REPO / "examples/configs/cip").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(CIPConfig, path)
        assert cfg.input_prefixes and cfg.output_prefix
