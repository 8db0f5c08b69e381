"""Long evaluation sweeps keep finished cells as they go and a rerun (a requeued job)
resumes from them instead of starting from zero."""

from __future__ import annotations

import json

import pytest

from _eval_backends import CopyBackend
from megatron_longsky.eval import Haystack, NeedleConfig, run_needle
from megatron_longsky.eval.distribute import finish_sweep
from megatron_longsky.eval.ruler import RulerConfig, run_ruler
from megatron_longsky.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
HAYSTACK = Haystack.default()


class Preempted(Exception):
    pass


class StoppingBackend(CopyBackend):
    """Counts forward calls; raises (the job is stopped) once ``stop_after`` were made."""

    def __init__(self, stop_after: int | None = None):
        super().__init__(TOK.vocab_size, window=250)
        self.stop_after = stop_after

    def logits(self, token_ids, last_n=None):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise Preempted()
        return super().logits(token_ids, last_n)


def test_needle_sweep_resumes_from_finished_samples(tmp_path):
    cfg = NeedleConfig(lengths=[400, 600], depths=[0, 50, 100], samples=2)  # 12 samples, base mode: 1 call each
    reference = run_needle(cfg, StoppingBackend(), TOK, haystack=HAYSTACK, progress=False)

    with pytest.raises(Preempted):
        run_needle(cfg, StoppingBackend(stop_after=5), TOK, haystack=HAYSTACK, progress=False,
                   journal_dir=tmp_path, model_source="model-a")
    journal = tmp_path / "needle.partial.jsonl"
    assert len(journal.read_text().splitlines()) == 1 + 5  # identity + the finished samples
    with journal.open("a") as f:
        f.write('{"key": "600/2/1", "resu')  # a line cut off when the job was killed
    again = StoppingBackend()
    resumed = run_needle(cfg, again, TOK, haystack=HAYSTACK, progress=False, journal_dir=tmp_path,
                         model_source="model-a")
    assert again.calls == 12 - 5
    assert resumed.to_dict() == reference.to_dict()
    finish_sweep(tmp_path, "needle")
    assert not journal.exists()


def test_journal_of_another_sweep_or_model_is_set_aside(tmp_path):
    cfg = NeedleConfig(lengths=[400], depths=[0, 100], samples=1)
    run_needle(cfg, StoppingBackend(), TOK, haystack=HAYSTACK, progress=False, journal_dir=tmp_path,
               model_source="model-a")
    for source, changed in (("model-b", cfg), ("model-a", NeedleConfig(lengths=[400], depths=[0, 100], seed=3))):
        backend = StoppingBackend()
        run_needle(changed, backend, TOK, haystack=HAYSTACK, progress=False, journal_dir=tmp_path,
                   model_source=source)
        assert backend.calls == 2  # nothing reused
        assert (tmp_path / "needle.partial.jsonl.stale").exists()


def test_ruler_sweep_resumes(tmp_path):
    cfg = RulerConfig(lengths=[700], samples=3, tasks=["niah_single", "niah_multikey"])
    reference = run_ruler(cfg, StoppingBackend(), TOK, haystack=HAYSTACK, progress=False)
    with pytest.raises(Preempted):
        run_ruler(cfg, StoppingBackend(stop_after=2), TOK, haystack=HAYSTACK, progress=False, journal_dir=tmp_path)
    again = StoppingBackend()
    resumed = run_ruler(cfg, again, TOK, haystack=HAYSTACK, progress=False, journal_dir=tmp_path)
    assert again.calls == 6 - 2
    assert json.dumps(resumed.to_dict(), sort_keys=True) == json.dumps(reference.to_dict(), sort_keys=True)
