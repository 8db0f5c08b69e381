"""Megatron backend: a checkpoint evaluated at TP=2 / PP=2 / CP=2 gives the TP=1 scores.

One 2-process gloo job saves a tiny random model as a checkpoint at TP=1 and
evaluates it at every layout in turn (re-initialising megatron-core's groups), then
runs the ``longsky needle`` command at TP=2, so the imports are paid once.
"""

import json

import pytest
import torch

from megatron_longsky.testing.multiprocess import run_distributed

# Multi-process / end-to-end: run by `make test`, not by `make test-fast`.
pytestmark = pytest.mark.slow

# (TP, PP, CP, sequence parallel). Sequence parallelism needs TE or apex norms (GPU):
# megatron-core's torch LayerNorm refuses it, so it is not tested here.
LAYOUTS = [(1, 1, 1, 0), (2, 1, 1, 0), (1, 2, 1, 0), (1, 1, 2, 0)]


def _evaluate_layouts(ckpt_root, layouts, cli_output=None):
    from megatron.core import parallel_state

    from megatron_longsky.checkpoint import save_model_weights, write_checkpoint_config, write_latest
    from megatron_longsky.checkpoint.layout import iteration_dir
    from megatron_longsky.config import to_dict
    from megatron_longsky.eval import NeedleConfig, run_needle
    from megatron_longsky.eval.backends import LogitsBackend
    from megatron_longsky.eval.distribute import data_parallel_layout
    from megatron_longsky.eval.megatron_backend import MegatronBackend
    from megatron_longsky.eval.perplexity import PerplexityConfig, perplexity_by_position
    from megatron_longsky.eval.scoring import Case, score_case
    from megatron_longsky.model import build_model, model_config_from_dict
    from megatron_longsky.runtime.distributed import ParallelConfig, initialize
    from megatron_longsky.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model_dict = {"preset": "tiny", "init_method_std": 0.2, "rope": {"base": 10000.0}}

    # Save at TP=1 (both ranks hold replicas; dist_checkpointing writes each tensor once).
    initialize(ParallelConfig(), seed=7)
    model = build_model(model_config_from_dict(model_dict), ParallelConfig(), tok.padded_vocab_size(128))
    target = iteration_dir(ckpt_root, 1)
    save_model_weights([model], target)
    if torch.distributed.get_rank() == 0:
        write_checkpoint_config(target, {"model": model_dict, "tokenizer": tok.metadata(),
                                         "parallel": to_dict(ParallelConfig())})
        write_latest(ckpt_root, 1)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()

    gen = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, 256, (77,), generator=gen).tolist()  # odd length: exercises padding
    cfg = NeedleConfig(lengths=[300], depths=[0, 100], samples=1, value_digits=3)
    results = {}
    for tp, pp, cp, sp in layouts:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  context_parallel_size=cp, sequence_parallel=bool(sp))
        initialize(parallel, seed=11)
        backend = MegatronBackend.from_checkpoint(ckpt_root, parallel)
        needle = run_needle(cfg, backend, tok, progress=False)
        chat = score_case(backend, tok, Case(sequence[:40], ["x"]), "chat", max_new_tokens=5)
        results[(tp, pp, cp, sp)] = {
            "logits": backend.logits([sequence], last_n=9),
            "logits_batch": backend.logits([sequence[:30], sequence[30:60]]),
            "nll": backend.token_nll(sequence),
            "needle": [(c.prediction, c.correct_tokens) for cell in needle.cells for s in cell.samples
                       for c in s.cases],
            "generated": chat.prediction,
            # KV-cached greedy decoding (PP=1, CP=1) against recomputing the prefix each token.
            "kv_cache": backend.kv_cache,
            "greedy": backend.generate_greedy(sequence, 24),
            "greedy_recomputed": LogitsBackend.generate_greedy(backend, sequence, 24),
            # Three documents over DP=2 at TP=1 (uneven shards), all on one replica elsewhere.
            "ppl": perplexity_by_position(PerplexityConfig(length=40, num_buckets=3, buckets="linear"), backend,
                                          tok, documents=[sequence[i:i + 40] for i in (0, 10, 30)],
                                          progress=False).nll_sum,
            "data_parallel": data_parallel_layout() is not None,
        }
        if (tp, pp, cp, sp) == (1, 1, 1, 0):
            # Reference NLL straight from the model's full (padded) vocabulary logits.
            with torch.no_grad():
                ids = torch.tensor([sequence])
                raw = backend.model(ids, torch.arange(len(sequence)).unsqueeze(0), None)[0]
            results[(tp, pp, cp, sp)]["nll_direct"] = torch.nn.functional.cross_entropy(raw[:-1], ids[0, 1:],
                                                                                  reduction="none")
        parallel_state.destroy_model_parallel()
    if cli_output:
        # The command line at TP=2 under this 2-process launch; the tokenizer comes
        # from the checkpoint's config.
        from megatron_longsky.eval.needle_cli import main

        results["cli_exit"] = main(["--checkpoint", ckpt_root, "--tp", "2", "--lengths", "300",
                                    "--depths", "0,100", "--output", cli_output, "value_digits=3"])
    return results


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    return out, run_distributed(_evaluate_layouts, 2, str(tmp_path_factory.mktemp("ckpt")), LAYOUTS, str(out))


def _check_against_reference(results, layouts):
    for rank_results in results:
        ref = rank_results[(1, 1, 1, 0)]
        assert ref["logits"].shape == (1, 9, 259) and ref["nll"].shape == (76,)
        assert ref["logits_batch"].shape == (2, 30, 259)
        for layout in layouts:
            got = rank_results[layout]
            assert torch.allclose(got["logits"], ref["logits"], atol=1e-4), layout
            assert torch.allclose(got["logits_batch"], ref["logits_batch"], atol=1e-4), layout
            assert torch.allclose(got["nll"], ref["nll"], atol=1e-4), layout
            assert got["needle"] == ref["needle"], layout
            assert got["generated"] == ref["generated"], layout
            assert got["greedy"] == got["greedy_recomputed"] == ref["greedy"], layout
            assert len(got["greedy"]) == 24
            assert got["ppl"] == pytest.approx(ref["ppl"], abs=1e-3), layout
    # At TP=1 the two ranks are data-parallel replicas that split the cases; each
    # returns all of them.
    assert results[0][(1, 1, 1, 0)]["data_parallel"]
    assert results[0][(1, 1, 1, 0)]["kv_cache"]
    assert {layout: results[0][layout]["kv_cache"] for layout in layouts} == {
        layout: layout[1] == layout[2] == 1 for layout in layouts}
    assert results[0][(1, 1, 1, 0)]["needle"] == results[1][(1, 1, 1, 0)]["needle"]
    assert results[0][(1, 1, 1, 0)]["ppl"] == results[1][(1, 1, 1, 0)]["ppl"]


def test_tp2_and_pp2_match_tp1(layout_results):
    _, layout_results = layout_results
    _check_against_reference(layout_results, [(2, 1, 1, 0), (1, 2, 1, 0)])
    # The NLL path (labels through vocab-parallel cross entropy) equals the cross
    # entropy of the model's logits.
    ref = layout_results[0][(1, 1, 1, 0)]
    assert torch.allclose(ref["nll"], ref["nll_direct"], atol=1e-4)


def test_cp2_matches_cp1(layout_results):
    # Zig-zag sharded input, LongSkyCoreAttention's K/V all-gather, rows reassembled.
    _check_against_reference(layout_results[1], [(1, 1, 2, 0)])


def test_needle_command_on_a_checkpoint_at_tp2(layout_results):
    out, results = layout_results
    assert [r["cli_exit"] for r in results] == [0, 0]
    data = json.loads((out / "needle.json").read_text())
    # Same prompts and model as the library run above: the same predictions.
    cli = [(c["prediction"], c["correct_tokens"]) for cell in data["cells"] for s in cell["samples"]
           for c in s["cases"]]
    assert cli == results[0][(1, 1, 1, 0)]["needle"]
    assert (out / "needle.png").stat().st_size > 0 and (out / "needle.md").exists()
