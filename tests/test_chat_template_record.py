"""Chat mode evaluates a model with the chat template it was trained with: SFT records the
template in the checkpoint, and needle/eval/synl-eval build their prompts with it, even for
a tokenizer that has no template of its own (SentencePiece, bytes)."""

from __future__ import annotations

import json

import pytest
import yaml

from _eval_backends import CopyBackend
from megatron_longsky.eval import Haystack, NeedleConfig, run_needle
from megatron_longsky.eval.prompt import make_frame, use_trained_chat_template
from megatron_longsky.sft.formats import Turn
from megatron_longsky.sft.template import BUILTIN_NAME, ChatTemplate, recorded_jinja, template_from_record
from megatron_longsky.tokenizer import ByteTokenizer

from _training_fixtures import tiny_config_dict, write_sft_dataset

BUILTIN = {"name": BUILTIN_NAME, "source": "builtin"}


def test_builtin_template_as_jinja_builds_the_training_prompt_exactly():
    tok = ByteTokenizer()
    context = "Some long context. The special magic number is 42."
    question = "What is the special magic number?"
    frame = make_frame(tok, question, "The number is", "chat", recorded_jinja(BUILTIN))
    trained = ChatTemplate(tok, "builtin").encode_prompt([Turn("user", f"{context}\n\n{question}")])
    assert frame.assemble(tok.encode(context)) == trained + tok.encode("The number is")


def test_needle_chat_mode_without_a_tokenizer_template_uses_the_recorded_one():
    tok = ByteTokenizer()
    assert tok.chat_template is None
    cfg = NeedleConfig(lengths=[500], depths=[50], samples=1, mode="chat")
    with pytest.raises(ValueError, match="needs a chat template"):
        run_needle(cfg, CopyBackend(tok.vocab_size), tok, haystack=Haystack.default(), progress=False)
    assert use_trained_chat_template(tok, BUILTIN) and not use_trained_chat_template(ByteTokenizer(), None)
    result = run_needle(cfg, CopyBackend(tok.vocab_size), tok, haystack=Haystack.default(), progress=False)
    assert result.accuracy == 1.0


def test_recorded_jinja_template_round_trips():
    tok = ByteTokenizer()
    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    recorded = ChatTemplate(tok, text=text).describe()
    assert recorded_jinja(recorded) == text
    turns = [Turn("user", "hi")]
    assert template_from_record(tok, recorded).encode_prompt(turns) == ChatTemplate(tok, text=text).encode_prompt(turns)
    assert template_from_record(tok, BUILTIN).name == BUILTIN_NAME


@pytest.mark.slow
def test_sft_checkpoint_records_its_template_and_needle_chat_mode_runs_on_it(tmp_path, capsys):
    from megatron_longsky.cli import main
    from megatron_longsky.training.config import train_config_from_dict
    from megatron_longsky.training.loop import train

    prefix = write_sft_dataset(tmp_path)
    cfg = tiny_config_dict(tmp_path, prefix, train_iters=2, output_dir=str(tmp_path / "sft"),
                           data={"kind": "sft", "prefixes": [prefix], "split": "100,0,0", "pad_to_multiple": 16})
    result = train(train_config_from_dict(cfg))
    recorded = yaml.safe_load((result.checkpoint_dir / "config.yaml").read_text())["chat_template"]
    assert recorded == BUILTIN
    # The byte tokenizer has no template: chat mode used to fail after loading the model.
    out = tmp_path / "needle"
    assert main(["needle", "--checkpoint", str(tmp_path / "sft" / "checkpoints"), "--mode", "chat",
                 "--lengths", "400", "--depths", "50,", "--samples", "1", "--output", str(out)]) == 0
    data = json.loads((out / "needle.json").read_text())
    assert data["config"]["mode"] == "chat" and len(data["cells"]) == 1
    assert not (out / "needle.partial.jsonl").exists()
    # synl-eval on the same checkpoint: --examples keeps that many generated answers (-1: all).
    from megatron_longsky.synl import SynLConfig, build_synl

    records = build_synl(SynLConfig(num_samples=3, min_tokens=200, max_tokens=300, seed=3), ByteTokenizer())
    data_path = tmp_path / "synl.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for examples, kept in (("-1", 3), ("1", 1)):
        out = tmp_path / f"synl_{examples}"
        assert main(["synl-eval", "--checkpoint", str(tmp_path / "sft" / "checkpoints"), "--data", str(data_path),
                     "--output", str(out), "--examples", examples]) == 0
        report = json.loads((out / "synl_eval.json").read_text())
        assert report["total"] == 3 and len(report["examples"]) == kept
        assert [e["id"] for e in report["examples"]] == [r["meta"]["id"] for r in records][:kept]
