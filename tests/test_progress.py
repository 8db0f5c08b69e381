"""Progress lines (rate, ETA) in batch logs, where stdout/stderr is not a terminal."""

from __future__ import annotations

import io
import json
import re

import pytest

from megatron_longsky.utils.progress import LineProgress, progress_bar

LINE = re.compile(r"^(?P<desc>[\w -]+): [\d.,kMG]+/[\d.,kMG]+ \S+ \([\d.]+%\) \| [\d.,kMG]+ \S+/s \| "
                  r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d")


def _progress_lines(text: str, desc: str) -> list[str]:
    return [line for line in text.splitlines() if LINE.match(line) and line.startswith(desc + ":")]


def test_line_progress_reports_rate_eta_and_a_final_line():
    out = io.StringIO()
    with progress_bar(total=4, desc="work", unit="item", file=out) as bar:
        assert isinstance(bar, LineProgress)
        bar.interval = 0
        for _ in range(4):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(_progress_lines(out.getvalue(), "work")) == 4 and "4/4 item (100.0%)" in lines[3]
    assert lines[-1].startswith("work: done, 4 item in 0:00:0")
    quiet = io.StringIO()
    with progress_bar(total=3, desc="work", file=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == "" and bar.n == 3


def test_interval_limits_the_lines(monkeypatch):
    monkeypatch.setenv("LONGSKY_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    with progress_bar(total=1000, desc="slow", file=out) as bar:
        for _ in range(1000):
            bar.update(1)
    # work shorter than one interval prints nothing, not even a final line
    assert out.getvalue() == ""


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("LONGSKY_PROGRESS_INTERVAL", "0")


def test_needle_and_ruler_print_progress_lines_without_a_terminal(every_update, capsys):
    from _eval_backends import CopyBackend
    from megatron_longsky.eval import Haystack, NeedleConfig, run_needle
    from megatron_longsky.eval.ruler import RulerConfig, run_ruler
    from megatron_longsky.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    run_needle(NeedleConfig(lengths=[300], depths=[0, 100], samples=1), CopyBackend(tok.vocab_size), tok,
               haystack=Haystack.default())
    run_ruler(RulerConfig(lengths=[300], samples=1, tasks=["niah_single"]), CopyBackend(tok.vocab_size), tok,
              haystack=Haystack.default())
    err = capsys.readouterr().err
    assert len(_progress_lines(err, "needle")) == 2 and "needle: done" in err
    assert _progress_lines(err, "ruler") and "ruler: done" in err


def test_data_commands_print_progress_lines_without_a_terminal(every_update, tmp_path, capsys):
    from megatron_longsky.data.preprocess import main as preprocess_main
    from megatron_longsky.synl.generate import SynLConfig, write_synl_jsonl
    from megatron_longsky.tokenizer import ByteTokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    assert preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "c"),
                            "--tokenizer-type", "byte", "--workers", "1"]) == 0
    write_synl_jsonl(SynLConfig(num_samples=3, min_tokens=300, max_tokens=400), ByteTokenizer(),
                     tmp_path / "synl.jsonl", progress=True)
    from megatron_longsky.data.cip import CIPConfig, build_cip

    build_cip(CIPConfig(input_prefixes=[str(tmp_path / "c_text_document")], output_prefix=str(tmp_path / "cip"),
                        seq_length=256, docs_per_seq=2, chunks_per_doc=2, num_sequences=4, separator="eod"),
              progress=True)
    err = capsys.readouterr().err
    assert _progress_lines(err, "build-cip planning") and "build-cip planning: done" in err
    assert _progress_lines(err, "build-cip") and "build-cip: done" in err
    assert _progress_lines(err, "preprocess") and "preprocess: done" in err
    assert len(_progress_lines(err, "build-synl")) == 3 and "build-synl: done" in err


def test_a_failed_run_gets_no_done_line():
    stream = io.StringIO()
    with pytest.raises(ValueError):
        with progress_bar(total=10, desc="job", unit="doc", file=stream) as bar:
            bar.update(3)
            raise ValueError("bad line")
    bar = progress_bar(total=10, desc="job", unit="doc", file=stream)
    try:
        raise ValueError("bad line")
    except ValueError:
        bar.close()  # as a finally block closes it while the error unwinds
    assert "done" not in stream.getvalue()
