"""Context parallelism on gloo: CP=2/4 (with TP=2, with DP=2), packed and unpacked, equal CP=1.

One 4-process run (4 ranks on 2 cores is slow) re-initialises megatron-core's parallel
groups for each layout and computes, on the same global batch, the per-token loss
normalised by the global token count and the full (TP-gathered, DP/CP-reduced)
gradients. The tests below compare those results.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longsky.testing.multiprocess import run_distributed

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

SEQ = 32
VOCAB = 128
ROWS = 2
# Documents of each packed row (lengths divide by 2*CP = 8 for CP=4).
ROW_DOCS = [[16, 8, 8], [24, 8]]
SEED = 1234


def _model_config(recompute: str | None = None):
    from megatron_longsky.model.config import ModelConfig

    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        extra = dict(recompute_granularity="selective")
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, seq_length=SEQ, vocab_size=VOCAB, transformer_impl="local", **extra)


def _rows():
    """Two rows: tokens, labels, loss_mask (CP=4 rank 0 holds only masked tokens), cu_seqlens."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    loss_mask = (torch.rand(ROWS, SEQ, generator=g) > 0.2).float()
    loss_mask[:, :4] = 0  # chunks 0 and 7 of 8 (CP=4 rank 0): no loss tokens at all there
    loss_mask[:, -4:] = 0
    items = []
    for r, docs in enumerate(ROW_DOCS):
        cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
        items.append(dict(tokens=tokens[r], labels=labels[r], loss_mask=loss_mask[r], cu_seqlens=cu))
    return items


def _batch(rows, packed: bool):
    """A loader batch: packed rows through the SFT dataset's collate (THD cu_seqlens)."""
    from megatron_longsky.attention.packed import document_positions
    from megatron_longsky.sft.dataset import collate_packed

    if packed:
        return collate_packed([{**r, "position_ids": document_positions(r["cu_seqlens"])} for r in rows])
    return {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask")}


def _reinit(tp: int, cp: int):
    from megatron.core import parallel_state as ps

    from megatron_longsky.runtime.distributed import set_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    set_seed(SEED)


def _build(tp: int, cp: int, recompute=None, megatron_local_attention=False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_longsky.model.build import build_model, transformer_config
    from megatron_longsky.runtime.distributed import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
    cfg = _model_config(recompute)
    if megatron_local_attention:  # megatron-core's own DotProductAttention, CP=1 only
        return GPTModel(config=transformer_config(cfg, parallel),
                        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")
    model = build_model(cfg, parallel, vocab_size=VOCAB)
    if cp > 1:  # CP runs take the blockwise path (tiny blocks); the CP=1 references the SDPA one
        from megatron_longsky.attention.core_attention import LongSkyCoreAttention

        for module in model.modules():
            if isinstance(module, LongSkyCoreAttention):
                module.block_size = 4
    return model


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the whole model: TP shards gathered into the TP=1 layout."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            if "linear_fc1" in name:  # each shard is [gate_i; up_i]
                halves = [part.chunk(2, dim=0) for part in parts]
                parts = [h[0] for h in halves] + [h[1] for h in halves]
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def _loss_and_grads(model, rows, split_rows: bool, per_document: bool = False):
    """Global per-token loss and full gradients; with ``per_document`` per-document loss sums
    and gradients too. Gradients are summed over the data+context-parallel group."""
    from megatron.core import parallel_state as ps

    from megatron_longsky.attention.packed import positions_and_segments
    from megatron_longsky.training.batch import prepare_batch

    group = ps.get_data_parallel_group(with_context_parallel=True) if split_rows else \
        ps.get_context_parallel_group()
    if split_rows:  # each data-parallel rank takes its share of the global batch's rows
        rows = rows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
    packed = "cu_seqlens" in rows[0]
    inputs = prepare_batch(_batch(rows, packed))
    def forward():
        model.zero_grad()
        return model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
                     packed_seq_params=inputs.packed_seq_params)

    losses = forward()
    mask = inputs.loss_mask
    count = mask.sum().reshape(1)
    torch.distributed.all_reduce(count, group=group)
    loss_sum = (losses * mask).sum()
    (loss_sum / count).backward()
    for p in model.parameters():
        torch.distributed.all_reduce(p.grad, group=group)
    total = loss_sum.detach().reshape(1)
    torch.distributed.all_reduce(total, group=group)
    result = {"loss": float(total / count), "local_tokens": float(mask.sum()), "grads": _full_grads(model)}
    if per_document:
        cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        _, seg = positions_and_segments(inputs.packed_seq_params.cu_seqlens_q, cp, cp_rank)
        docs = []
        for d in range(len(inputs.packed_seq_params.cu_seqlens_q) - 1):
            # megatron's cross entropy backward works in place: one forward per document.
            doc_loss = (forward() * mask * (seg == d).view_as(mask)).sum()
            doc_loss.backward()
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, group=group)
            total = doc_loss.detach().reshape(1)
            torch.distributed.all_reduce(total, group=group)
            docs.append({"loss": float(total), "grads": _full_grads(model)})
        result["docs"] = docs
    return result


def _documents_one_at_a_time(model, rows):
    """Each document of the packed rows as its own unpacked batch (CP=1): loss sum and grads."""
    from megatron_longsky.training.batch import prepare_batch

    out = []
    for row in rows:
        cu = row["cu_seqlens"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            inputs = prepare_batch({k: row[k][a:b].unsqueeze(0) for k in ("tokens", "labels", "loss_mask")})
            model.zero_grad()
            losses = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels)
            loss = (losses * inputs.loss_mask).sum()
            loss.backward()
            out.append({"loss": float(loss), "grads": _full_grads(model)})
    return out


def _embedding_gradient_reach(model, rows, packed: bool) -> torch.Tensor:
    """|d logits(last token of row 0) / d embedding(token i)| for every token i of row 0 (CP=1)."""
    from megatron_longsky.training.batch import prepare_batch

    row = rows[0]
    batch = _batch([row], packed)
    inputs = prepare_batch(batch)
    emb = model.embedding(input_ids=inputs.tokens, position_ids=inputs.position_ids).detach().requires_grad_()
    logits = model(inputs.tokens, inputs.position_ids, None, decoder_input=emb,
                   packed_seq_params=inputs.packed_seq_params)
    logits[0, -1].sum().backward()
    return emb.grad[:, 0].abs().sum(-1)


def _cp_worker():
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize

    initialize(ParallelConfig())
    rank = torch.distributed.get_rank()
    rows = _rows()
    packed_rows, plain_rows = rows, [{k: v for k, v in r.items() if k != "cu_seqlens"} for r in rows]
    results = {}

    # CP=1 references (every rank computes the whole batch itself).
    _reinit(1, 1)
    model = _build(1, 1)
    results["ref"] = _loss_and_grads(model, plain_rows, split_rows=False)
    results["ref_packed"] = _loss_and_grads(model, packed_rows, split_rows=False, per_document=True)
    results["alone"] = _documents_one_at_a_time(model, packed_rows)
    results["reach_causal"] = _embedding_gradient_reach(model, plain_rows, packed=False)
    results["reach_packed"] = _embedding_gradient_reach(model, packed_rows, packed=True)
    _reinit(1, 1)
    results["megatron_local"] = _loss_and_grads(_build(1, 1, megatron_local_attention=True), plain_rows,
                                                split_rows=False)

    for name, tp, cp, recompute in [("cp4", 1, 4, None), ("cp2_tp2", 2, 2, None), ("cp2_dp2", 1, 2, None),
                                    ("cp2_tp2_full", 2, 2, "full"), ("cp2_dp2_selective", 1, 2, "selective")]:
        split = name.startswith("cp2_dp2")
        _reinit(tp, cp)
        model = _build(tp, cp, recompute)
        model.train()
        results[name] = _loss_and_grads(model, plain_rows, split_rows=split)
        results[name + "_packed"] = _loss_and_grads(model, packed_rows, split_rows=split,
                                                    per_document=(name == "cp2_tp2"))
    # Only rank-independent values are compared; rank 0's copy is enough, plus each rank's token count.
    return results if rank == 0 else {k: {"local_tokens": v["local_tokens"]} for k, v in results.items()
                                      if isinstance(v, dict) and "local_tokens" in v}


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_cp_worker, 4, timeout=900)


def _assert_same(a, b, what, atol=2e-5):
    assert a["loss"] == pytest.approx(b["loss"], abs=atol), f"{what}: loss {a['loss']} != {b['loss']}"
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], atol=atol, rtol=1e-4,
                                   msg=lambda m: f"{what}: grad {name}: {m}")


def test_our_attention_matches_megatron_local_attention_at_cp1(cp_results):
    ref = cp_results[0]
    _assert_same(ref["ref"], ref["megatron_local"], "LongSkyCoreAttention vs DotProductAttention")


@pytest.mark.parametrize("layout", ["cp4", "cp2_tp2", "cp2_dp2", "cp2_tp2_full", "cp2_dp2_selective"])
@pytest.mark.parametrize("packed", [False, True])
def test_context_parallel_equals_cp1(cp_results, layout, packed):
    ref = cp_results[0]
    suffix = "_packed" if packed else ""
    _assert_same(ref[layout + suffix], ref["ref" + suffix], f"{layout}{suffix} vs CP=1")


def test_rank_without_loss_tokens_gives_finite_loss(cp_results):
    # CP=4 rank 0 holds chunks 0 and 7 of every row: all masked in the unpacked batch.
    assert cp_results[0]["cp4"]["local_tokens"] == 0
    assert torch.isfinite(torch.tensor(cp_results[0]["cp4"]["loss"]))
    assert all(r["cp4"]["local_tokens"] > 0 for r in cp_results[1:])


def test_packed_documents_equal_documents_alone_at_cp1_and_cp2(cp_results):
    ref = cp_results[0]
    alone = ref["alone"]
    assert len(alone) == sum(len(d) for d in ROW_DOCS)
    for packed_name in ("ref_packed", "cp2_tp2_packed"):
        docs = ref[packed_name]["docs"]
        assert len(docs) == len(alone)
        for i, (p, a) in enumerate(zip(docs, alone)):
            _assert_same(p, a, f"{packed_name} document {i}")


def test_cip_full_causal_reaches_back_packed_does_not(cp_results):
    ref = cp_results[0]
    causal, packed = ref["reach_causal"], ref["reach_packed"]
    # Unpacked (CIP): the last token depends on the very first token of the row.
    assert causal[0] > 1e-6 and bool((causal > 0).all())
    # Packed row 0 = documents [0,16), [16,24), [24,32): the last token sees only its own document.
    assert float(packed[:24].abs().max()) == 0.0
    assert bool((packed[24:] > 0).all())


# ------------------------------------------------------------- through the trainer (issue 4 config)
def _trainer_runs(tmp: str, prefix: str):
    """C's trainer, same job at CP=1 (DP=2), CP=2, and CP=2 with full recomputation."""
    from _training_fixtures import tiny_config_dict

    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    from megatron_longsky.attention import sharding
    from megatron_longsky.training import batch as batch_module

    seen_cp_sizes = set()

    def recording_shard(*args, **kwargs):  # which CP size the trainer's batches were cut for
        seen_cp_sizes.add(sharding.context_parallel_topology()[0])
        return sharding.shard_for_context_parallel(*args, **kwargs)

    batch_module.shard_for_context_parallel = recording_shard
    torch.distributed.init_process_group("gloo", init_method="env://")
    out = {}
    for name, parallel, model in [
        ("cp1", {}, {}),
        ("cp2", {"context_parallel_size": 2, "cp_comm_type": "a2a"}, {}),
        ("cp2_full_recompute", {"context_parallel_size": 2},
         {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    ]:
        cfg = tiny_config_dict(tmp, prefix, train_iters=2, parallel=parallel, output_dir=f"{tmp}/{name}",
                               checkpoint={"save": f"{tmp}/{name}/ckpt", "save_at_end": False})
        cfg["model"] = {**cfg["model"], **model}
        seen_cp_sizes.clear()
        result = train(train_config_from_dict(cfg))
        out[name] = {"losses": result.losses, "grad_norms": result.grad_norms, "cp_sizes": sorted(seen_cp_sizes)}
    return out


def test_trainer_with_context_parallel_matches_cp1(tmp_path):
    from _training_fixtures import write_token_dataset

    prefix = write_token_dataset(tmp_path / "ds")
    runs = run_distributed(_trainer_runs, 2, str(tmp_path), prefix, timeout=900)
    for rank_runs in runs:
        ref = rank_runs["cp1"]
        for name in ("cp2", "cp2_full_recompute"):
            assert rank_runs[name]["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
            assert rank_runs[name]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4), name
        assert rank_runs["cp1"]["cp_sizes"] == [1] and rank_runs["cp2"]["cp_sizes"] == [2]
    assert runs[0]["cp1"]["losses"][0] != runs[0]["cp1"]["losses"][1]
